#!/usr/bin/env node
// A tiny "AI app" metered by quotad.
//
// For each prompt it reserves a token budget before the (simulated) LLM call,
// switches to a cheaper model when quotad says "degrade", commits the tokens
// the call really used, and tells the user when they are out of quota.
//
// Run a daemon on the shipped quotad.toml (`cargo run --release` in the repo),
// build this package (`npm ci && npm run build`), then:
//
//   node examples/ai-app.mjs --url http://127.0.0.1:7878
//   node examples/ai-app.mjs --socket ./quotad.sock

import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";

import { Denied, InvalidRequest, QuotadClient, QuotadError, Unavailable } from "quotad";

const PROMPTS = [
  ["Summarise this contract", 6000],
  ["Write a haiku about rate limits", 2000],
  ["Translate the user manual to French", 9000],
  ["Explain token buckets to a five-year-old", 4000],
  ["Draft the quarterly report", 8000],
  ["Rewrite the whole codebase in Rust", 150000], // more than a day's quota
];

class ModelError extends Error {}

// A seeded generator, so runs are repeatable.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

/** Stands in for a provider call: resolves text and the tokens it used. */
async function fakeLlm(prompt, model, maxTokens, random) {
  await new Promise((r) => setTimeout(r, 20));
  if (random() < 0.1) throw new ModelError(`${model} timed out`);
  let used = Math.floor(maxTokens / 2 + random() * (maxTokens / 2));
  if (model.endsWith("-mini")) used = Math.floor(used / 2);
  return { text: `[${model}] answer to ${JSON.stringify(prompt)}`, used };
}

async function answer(q, user, prompt, budget, random) {
  let model = "gpt-4o";
  let hold;
  try {
    hold = await q.reserve({ subject: user, event: "llm.chat", attributes: { model }, amounts: { tokens: budget }, ttlMs: 60000 });
    if (hold.degraded) {
      // Over the gpt-4o budget: give the hold back and use the cheaper model.
      await hold.release();
      model = "gpt-4o-mini";
      budget = Math.floor(budget / 2);
      hold = await q.reserve({ subject: user, event: "llm.chat", attributes: { model }, amounts: { tokens: budget } });
      console.log(`  degrade -> switching to ${model} with ${budget} tokens`);
    }
  } catch (e) {
    if (!(e instanceof Denied)) throw e;
    const d = e.decision;
    const why = d.reasons.map((r) => `${r.limit} ${r.code}`).join(", ");
    const wait = d.retryAfter ? `, retry in ${d.retryAfter}s` : ", no retry will help";
    console.log(`  DENIED  ${JSON.stringify(prompt)}: ${why}${wait}`);
    return;
  }

  try {
    const { text, used } = await fakeLlm(prompt, model, budget, random);
    const fin = await hold.commit({ tokens: used }); // null for a fallback hold (quotad unavailable)
    if (!fin) console.log(`  OK      ${text} (quotad unavailable: not metered)`);
    else {
      const cost = fin.charged.cost_micros; // when the daemon has [pricing]
      const spent = cost !== undefined ? `, $${(cost / 1e6).toFixed(4)}` : "";
      console.log(`  OK      ${text}: held ${budget}, used ${used} tokens${spent} (${fin.status})`);
    }
  } catch (e) {
    if (!(e instanceof ModelError)) throw e;
    await hold.release(); // the call failed: give the whole hold back
    console.log(`  FAILED  ${JSON.stringify(prompt)}: ${e.message}; ${hold.fallback ? "nothing was held" : `the ${budget}-token hold was released`}`);
  }
}

async function main() {
  const { values: args } = parseArgs({
    options: {
      url: { type: "string" },
      socket: { type: "string" },
      token: { type: "string", default: process.env.QUOTAD_TOKEN },
      user: { type: "string", default: `user:demo-${randomBytes(3).toString("hex")}` },
      "fail-open": { type: "boolean", default: false },
      seed: { type: "string", default: "7" },
    },
  });
  if (args.url && args.socket) {
    console.error("pass --url or --socket, not both");
    return 2;
  }
  const q = new QuotadClient({
    url: args.url,
    socketPath: args.socket,
    token: args.token,
    onUnavailable: args["fail-open"] ? "allow" : "throw",
  });
  const random = rng(Number(args.seed));
  console.log(`quotad at ${q.where}, user ${args.user}`);
  try {
    for (const [prompt, budget] of PROMPTS) await answer(q, args.user, prompt, budget, random);

    // The same flow with withReservation: commit on success, release on error.
    const summary = await q.withReservation(
      { subject: args.user, event: "llm.chat", attributes: { model: "gpt-4o-mini" }, amounts: { tokens: 1000 } },
      async (hold) => {
        const { text, used } = await fakeLlm("Summarise today's usage", "gpt-4o-mini", 1000, () => 0.5);
        hold.actual = { tokens: used };
        return `${text}: used ${used} tokens`;
      },
    );
    console.log(`  OK      ${summary} (withReservation)`);

    let s;
    try {
      s = await q.subject(args.user);
    } catch (e) {
      if (e instanceof Unavailable && args["fail-open"]) {
        console.log("usage: quotad unavailable");
        return 0;
      }
      throw e;
    }
    console.log(`usage of ${s.subject} (plan ${s.plan}):`);
    for (const c of s.counters) {
      if (c.metric === "tokens" && c.scope === s.subject) console.log(`  ${c.limit.padEnd(24)} ${String(c.used).padStart(7)} / ${c.max}`);
    }
    await printUsageByModel(q, args.user);
    return 0;
  } catch (e) {
    if (e instanceof Unavailable) {
      console.error(`quotad is unavailable (${e.message}); rerun with --fail-open to serve users anyway`);
      return 2;
    }
    if (e instanceof QuotadError) {
      console.error(`quotad refused the request: ${e.message}`);
      return 1;
    }
    throw e;
  } finally {
    q.close();
  }
}

// Today's tokens per model, from the usage history (the daemon keeps usage per
// model with `[history] dimensions = ["model"]`, as the shipped config does).
async function printUsageByModel(q, user) {
  const day = 86400000;
  const from = new Date(Math.floor(Date.now() / day) * day);
  let u;
  try {
    u = await q.usage(user, { from, to: new Date(from.getTime() + day), groupBy: "model" });
  } catch (e) {
    if (e instanceof InvalidRequest) return; // this daemon does not keep usage per model
    if (e instanceof QuotadError) {
      console.log(`usage by model: ${e.message}`);
      return;
    }
    throw e;
  }
  console.log("tokens today by model:");
  const rows = [...u.totalsByGroup()].sort((a, b) => (b[1].tokens ?? 0) - (a[1].tokens ?? 0));
  for (const [model, sums] of rows) console.log(`  ${(model ?? "(none)").padEnd(24)} ${String(sums.tokens ?? 0).padStart(7)}`);
}

process.exitCode = await main();
