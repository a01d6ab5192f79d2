// Analytics and end-user reads: top usage, the fullest counters, events newest
// first, usage split per attribute (groupBy) and subject tokens. Each test has
// a daemon of its own (auth on, `[history] dimensions = ["model"]`), so the
// answers that span every subject are exact.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Forbidden, InvalidRequest, QuotadClient, Unauthorized } from "../dist/index.js";
import { ADMIN_TOKEN, CLIENT_TOKEN, Daemon, Proxy, uniqueSubject } from "./helpers.mjs";

// A top-level limit with alerts: each "alert.ping" of a subject crosses one
// threshold (1/4, 2/4, 3/4 of max), so each records one threshold.crossed event.
const PING_ALERTS = `
[[limits]]
name = "pings"
match = { event = "alert.ping" }
period = "1d"
max = 4
alerts = [0.25, 0.5, 0.75]
`;

const today = () => new Date().toISOString().slice(0, 10);
const tomorrow = () => new Date(Date.now() + 86400000).toISOString().slice(0, 10);
const yesterday = () => new Date(Date.now() - 86400000).toISOString().slice(0, 10);
const range = () => ({ from: today(), to: tomorrow() });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Runs `fn(daemon)` with a daemon of its own, stopped and removed after. */
async function withDaemon(options, fn) {
  const d = new Daemon({ auth: true, dimensions: ["model"], ...options });
  try {
    await d.start();
    return await fn(d);
  } finally {
    await d.cleanup();
  }
}

async function collect(gen) {
  const out = [];
  for await (const x of gen) out.push(x);
  return out;
}

function add(into, amounts) {
  for (const [k, v] of Object.entries(amounts)) into[k] = (into[k] ?? 0) + v;
  return into;
}

const isForbidden = (e) => e instanceof Forbidden && e.status === 403 && e.code === "forbidden";

for (const transport of ["tcp", "unix"]) {
  describe(`analytics over ${transport}`, () => {
    test("usageTop: exact rows, most first, ties by subject", () =>
      withDaemon({}, async (d) => {
        const q = d.client(transport, { token: ADMIN_TOKEN });
        await q.consume({ subject: "t:bob", amounts: { tokens: 900 } });
        await q.consume({ subject: "t:amy", amounts: { tokens: 200 } });
        await q.consume({ subject: "t:amy", amounts: { tokens: 300 } }); // 500 in all, tied with t:cal
        await q.withReservation({ subject: "t:cal", amounts: { tokens: 2000 } }, (h) => {
          h.actual = { tokens: 500 }; // a commit counts what it charged
        });
        await (await q.reserve({ subject: "t:dan", amounts: { tokens: 5000 } })).release(); // adds nothing
        await q.consume({ subject: "t:dan", amounts: { tokens: 100 } });
        await q.consume({ subject: "t:eve", amounts: { tokens: 0 } }); // none of the metric: left out

        const top = await q.usageTop("tokens", range());
        assert.equal(top.metric, "tokens");
        assert.deepEqual(
          top.rows.map((r) => [r.subject, r.amount]),
          [
            ["t:bob", 900],
            ["t:amy", 500],
            ["t:cal", 500],
            ["t:dan", 100],
          ],
        );
        assert.deepEqual(top.rows[0].raw, { subject: "t:bob", amount: 900 });
        const two = await q.usageTop("tokens", { ...range(), limit: 2 });
        assert.deepEqual(
          two.rows.map((r) => [r.subject, r.amount]),
          [
            ["t:bob", 900],
            ["t:amy", 500],
          ],
        );
        const reqs = await q.usageTop("requests", { ...range(), limit: 1000 });
        assert.deepEqual(Object.fromEntries(reqs.rows.map((r) => [r.subject, r.amount])), { "t:amy": 2, "t:bob": 1, "t:cal": 1, "t:dan": 1, "t:eve": 1 });
        // The same amounts the export sums per subject.
        const exported = {};
        for await (const row of q.iterUsageExport(range())) exported[row.subject] = (exported[row.subject] ?? 0) + (row.amounts.tokens ?? 0);
        assert.deepEqual(
          Object.fromEntries(Object.entries(exported).filter(([, a]) => a > 0)),
          Object.fromEntries(top.rows.map((r) => [r.subject, r.amount])),
        );
        assert.deepEqual((await q.usageTop("tokens", { from: yesterday(), to: today() })).rows, []);
        await assert.rejects(q.usageTop("tokens", { ...range(), limit: 0 }), (e) => e instanceof InvalidRequest && /limit/.test(e.detail));
        await assert.rejects(q.usageTop("", range()), TypeError);
        q.close();
        const c = d.client(transport, { token: CLIENT_TOKEN });
        await assert.rejects(c.usageTop("tokens", range()), isForbidden);
        c.close();
      }));

    test("counters: fullest first, with their fraction", () =>
      withDaemon({}, async (d) => {
        const q = d.client(transport, { token: ADMIN_TOKEN });
        for (let i = 0; i < 3; i++) await q.consume({ subject: "c:dora", event: "image.render" }); // image-credits: 3 of 3
        await q.consume({ subject: "c:erin", amounts: { tokens: 9500 } }); // tokens-per-day: 9500 of 10000
        await q.consume({ subject: "c:abel", amounts: { tokens: 9500 } }); // the same fraction: by scope
        await q.consume({ subject: "c:bert", amounts: { tokens: 8500 } });
        await q.consume({ subject: "c:carl", amounts: { tokens: 5000 } }); // half full: not listed at 0.8

        const full = await q.counters({ minFraction: 0.8 });
        assert.deepEqual(
          full.map((c) => [c.scope, c.limit, c.fraction]),
          [
            ["c:dora", "image-credits", 1],
            ["c:abel", "tokens-per-day", 0.95],
            ["c:erin", "tokens-per-day", 0.95],
            ["c:bert", "tokens-per-day", 0.85],
          ],
        );
        const bert = full[3];
        assert.deepEqual([bert.metric, bert.max, bert.used, bert.remaining, bert.mode], ["tokens", 10000, 8500, 1500, "enforce"]);
        assert.ok(bert.resetsAt instanceof Date && bert.resetsAt.getTime() > Date.now());
        assert.deepEqual([full[0].max, full[0].used, full[0].remaining, full[0].resetsAt], [3, 3, 0, null]); // lifetime: no reset
        for (const c of full) assert.ok(Math.abs(c.fraction - c.used / c.max) < 1e-9);
        assert.equal(full[0].raw.fraction, 1);

        // The server's default is 0.8.
        assert.deepEqual(
          (await q.counters()).map((c) => [c.scope, c.limit]),
          full.map((c) => [c.scope, c.limit]),
        );
        assert.deepEqual(
          (await q.counters({ minFraction: 0.9, limit: 2 })).map((c) => [c.scope, c.limit]),
          [
            ["c:dora", "image-credits"],
            ["c:abel", "tokens-per-day"],
          ],
        );
        const low = await q.counters({ minFraction: 0.4, limit: 1000 });
        assert.deepEqual(
          low.filter((c) => c.limit === "tokens-per-day").map((c) => c.scope),
          ["c:abel", "c:erin", "c:bert", "c:carl"],
        );
        const fractions = low.map((c) => c.fraction);
        assert.deepEqual(fractions, [...fractions].sort((a, b) => b - a));
        const everything = await q.counters({ minFraction: 0.003, limit: 1000 });
        assert.ok(everything.some((c) => c.scope === "c:dora" && c.limit === "requests-per-day" && c.fraction === 0.003));
        await assert.rejects(q.counters({ minFraction: 0 }), (e) => e instanceof InvalidRequest && /min_fraction/.test(e.detail));
        await assert.rejects(q.counters({ limit: 1001 }), (e) => e instanceof InvalidRequest && /limit/.test(e.detail));
        q.close();
        const c = d.client(transport, { token: CLIENT_TOKEN });
        await assert.rejects(c.counters(), isForbidden);
        c.close();
      }));

    test("events newest first, across page boundaries", () =>
      withDaemon({ extra: PING_ALERTS }, async (d) => {
        const q = d.client(transport, { token: ADMIN_TOKEN });
        for (const s of ["e:one", "e:two", "e:three"]) {
          for (let i = 0; i < 3; i++) assert.ok((await q.consume({ subject: s, event: "alert.ping" })).allowed);
        }
        // Events are read once durable.
        let oldestFirst = [];
        for (const deadline = Date.now() + 10000; Date.now() < deadline; await sleep(20)) {
          oldestFirst = await collect(q.iterEvents());
          if (oldestFirst.length >= 9) break;
        }
        assert.equal(oldestFirst.length, 9);
        assert.ok(oldestFirst.every((e) => e.type === "threshold.crossed"));
        const seqs = oldestFirst.map((e) => e.seq);
        assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
        const newestFirst = [...seqs].reverse();

        // Pages of 4, newest first: 4, 4, then the oldest one.
        const p1 = await q.events({ order: "desc", limit: 4 });
        assert.deepEqual(p1.events.map((e) => e.seq), newestFirst.slice(0, 4));
        assert.equal(p1.nextAfter, seqs[8]); // the newest seq in the page
        assert.equal(p1.nextBefore, p1.events[3].seq);
        const p2 = await q.events({ order: "desc", before: p1.nextBefore, limit: 4 });
        assert.deepEqual(p2.events.map((e) => e.seq), newestFirst.slice(4, 8));
        assert.equal(p2.nextAfter, p2.events[0].seq);
        const p3 = await q.events({ order: "desc", before: p2.nextBefore, limit: 4 });
        assert.deepEqual(p3.events.map((e) => e.seq), [seqs[0]]);
        assert.equal(p3.nextBefore, null); // the oldest was read

        assert.deepEqual((await collect(q.iterEvents({ order: "desc", pageSize: 4 }))).map((e) => e.seq), newestFirst);
        assert.deepEqual((await collect(q.iterEvents({ order: "desc", pageSize: 2, before: seqs[5] }))).map((e) => e.seq), seqs.slice(0, 5).reverse());
        assert.deepEqual((await collect(q.iterEvents({ order: "desc", type: "threshold.*", pageSize: 3 }))).map((e) => e.seq), newestFirst);
        assert.deepEqual((await q.events({ order: "desc", type: "breaker.*" })).events, []);
        // From a page's nextAfter, newer events follow in the default order.
        assert.deepEqual((await q.events({ after: p1.nextAfter })).events, []);
        assert.deepEqual((await q.events({ after: p2.nextAfter })).events.map((e) => e.seq), seqs.slice(5));
        const newest = p1.events[0];
        assert.deepEqual([newest.subject, newest.raw.limit, newest.raw.threshold], ["e:three", "pings", 0.75]);

        await assert.rejects(q.events({ before: seqs[3] }), (e) => e instanceof InvalidRequest && /before/.test(e.detail));
        await assert.rejects(q.events({ order: "desc", after: seqs[3] }), (e) => e instanceof InvalidRequest && /after/.test(e.detail));
        await assert.rejects(q.events({ order: "newest" }), TypeError);
        q.close();
      }));

    test("groupBy: per model, adding up to the totals", () =>
      withDaemon({}, async (d) => {
        const q = d.client(transport, { token: ADMIN_TOKEN });
        const s = uniqueSubject("g");
        const other = uniqueSubject("g");
        await q.consume({ subject: s, event: "llm.chat", attributes: { model: "gpt-4o" }, amounts: { tokens: 1000 } });
        await q.consume({ subject: s, event: "llm.chat", attributes: { model: "claude" }, amounts: { tokens: 300 } });
        await q.consume({ subject: s, amounts: { tokens: 50 } }); // no model
        await q.withReservation({ subject: s, event: "llm.chat", attributes: { model: "gpt-4o" }, amounts: { tokens: 900 } }, (h) => {
          h.actual = { tokens: 400 }; // filed under the reservation's model
        });
        await q.consume({ subject: other, attributes: { model: "claude" }, amounts: { tokens: 7 } });

        const plain = await q.usage(s, { ...range(), granularity: "hour" });
        assert.equal(plain.groupBy, null);
        assert.ok(plain.buckets.every((b) => b.group === null));
        assert.deepEqual(plain.totals(), { requests: 4, tokens: 1750 });

        const expected = new Map([
          ["gpt-4o", { requests: 2, tokens: 1400 }],
          ["claude", { requests: 1, tokens: 300 }],
          [null, { requests: 1, tokens: 50 }],
        ]);
        for (const granularity of ["hour", "day", "month"]) {
          const u = await q.usage(s, { ...range(), granularity, groupBy: "model" });
          assert.equal(u.groupBy, "model");
          assert.equal(u.raw.group_by, "model");
          for (const b of u.buckets) {
            assert.ok("model" in b.raw);
            assert.equal(b.group, b.raw.model);
          }
          const byGroup = u.totalsByGroup();
          assert.equal(byGroup.size, 3);
          for (const [k, v] of expected) assert.deepEqual(byGroup.get(k), v);
          assert.deepEqual(u.totals(), plain.totals());
        }

        // The export: each row has the model; the groups add up to the ungrouped rows.
        const grouped = new Map();
        const totalGrouped = {};
        for await (const row of q.iterUsageExport({ ...range(), groupBy: "model", pageSize: 1 })) {
          assert.ok("model" in row.raw);
          assert.equal(row.group, row.raw.model);
          if (row.subject === s) grouped.set(row.group, add(grouped.get(row.group) ?? {}, row.amounts));
          add(totalGrouped, row.amounts);
        }
        assert.deepEqual(grouped, expected);
        const totalPlain = {};
        for await (const row of q.iterUsageExport(range())) {
          assert.equal(row.group, null);
          add(totalPlain, row.amounts);
        }
        assert.deepEqual(totalGrouped, { requests: 5, tokens: 1757 });
        assert.deepEqual(totalPlain, totalGrouped);
        const page = await q.usageExport({ ...range(), groupBy: "model", limit: 1000 });
        assert.equal(page.groupBy, "model");
        assert.equal(page.nextAfter, null);
        assert.deepEqual(new Set(page.rows.map((r) => r.subject)), new Set([s, other]));

        const csv = await q.usageExport({ ...range(), format: "csv", groupBy: "model" });
        const lines = csv.trim().split(/\r?\n/);
        assert.equal(lines[0], "subject,start,model,metric,amount");
        const mine = lines
          .slice(1)
          .filter((l) => l.startsWith(`${s},`))
          .map((l) => l.split(",").slice(2).join(","))
          .sort();
        assert.deepEqual(mine, [",requests,1", ",tokens,50", "claude,requests,1", "claude,tokens,300", "gpt-4o,requests,2", "gpt-4o,tokens,1400"].sort());

        // Only attributes listed in history.dimensions.
        await assert.rejects(q.usage(s, { ...range(), groupBy: "team" }), (e) => e instanceof InvalidRequest && /group_by/.test(e.detail));
        await assert.rejects(q.usageExport({ ...range(), groupBy: "team" }), (e) => e instanceof InvalidRequest && /group_by/.test(e.detail));
        q.close();
      }));

    test("a subject token reads its subject and nothing else", () =>
      withDaemon({}, async (d) => {
        const admin = d.client(transport, { token: ADMIN_TOKEN });
        const s = uniqueSubject("user");
        const other = uniqueSubject("user");
        await admin.consume({ subject: s, event: "llm.chat", attributes: { model: "gpt-4o" }, amounts: { tokens: 120 } });
        await admin.consume({ subject: other, amounts: { tokens: 7 } });
        const before = Date.now();
        const t = await admin.mintSubjectToken(s);
        assert.ok(t.token.startsWith("qst_"));
        assert.equal(t.subject, s);
        assert.ok(t.expiresAt instanceof Date);
        assert.ok(Math.abs(t.expiresAt.getTime() - before - 3600_000) < 60_000); // default: 1 hour
        const short = await admin.mintSubjectToken(s, { ttl: "15m" });
        assert.ok(Math.abs(t.expiresAt - short.expiresAt - 45 * 60_000) < 60_000);
        const ms = await admin.mintSubjectToken(s, { ttlMs: 120_000 });
        assert.ok(Math.abs(short.expiresAt - ms.expiresAt - 13 * 60_000) < 60_000);
        const week = await admin.mintSubjectToken(s, { ttl: "7d" });
        assert.ok(Math.abs(week.expiresAt - t.expiresAt - (7 * 86400_000 - 3600_000)) < 60_000);
        for (const ttl of ["30s", "31d", "soon"]) {
          await assert.rejects(admin.mintSubjectToken(s, { ttl }), (e) => e instanceof InvalidRequest && /ttl/.test(e.detail));
        }
        await assert.rejects(admin.mintSubjectToken(s, { ttl: "1h", ttlMs: 1000 }), TypeError);
        admin.close();

        const mine = d.client(transport, { token: t.token });
        const got = await mine.subject(s);
        assert.equal(got.subject, s);
        assert.equal(got.counter("tokens-per-day").used, 120);
        assert.deepEqual((await mine.usage(s, range())).totals(), { requests: 1, tokens: 120 });
        assert.deepEqual((await mine.usage(s, { ...range(), groupBy: "model" })).totalsByGroup(), new Map([["gpt-4o", { requests: 1, tokens: 120 }]]));
        for (const call of [
          () => mine.subject(other),
          () => mine.usage(other, range()),
          () => mine.consume({ subject: s }),
          () => mine.check({ subject: s }),
          () => mine.setPlan(s, { plan: "pro" }),
          () => mine.reset(s),
          () => mine.mintSubjectToken(s),
          () => mine.subjects(),
          () => mine.events(),
          () => mine.usageExport(range()),
          () => mine.usageTop("tokens", range()),
          () => mine.counters(),
          () => mine.plans(),
          () => mine.metrics(),
        ]) {
          await assert.rejects(call(), isForbidden);
        }
        assert.equal((await mine.subject(s)).counter("tokens-per-day").used, 120); // the refused consume changed nothing
        mine.close();

        // A token changed by one character is no token.
        const forged = t.token.slice(0, -1) + (t.token.endsWith("0") ? "1" : "0");
        const bad = d.client(transport, { token: forged });
        await assert.rejects(bad.subject(s), Unauthorized);
        bad.close();
        // Only an admin mints them.
        const c = d.client(transport, { token: CLIENT_TOKEN });
        await assert.rejects(c.mintSubjectToken(s), isForbidden);
        c.close();
      }));
  });
}

test("groupBy needs the dimension", () =>
  withDaemon({ auth: false, dimensions: null }, async (d) => {
    const q = d.client("tcp");
    const s = uniqueSubject();
    await q.consume({ subject: s, attributes: { model: "gpt-4o" }, amounts: { tokens: 5 } });
    await assert.rejects(q.usage(s, { ...range(), groupBy: "model" }), (e) => e instanceof InvalidRequest && /group_by/.test(e.detail));
    q.close();
  }));

test("what the new calls send", () =>
  withDaemon({ auth: false }, async (d) => {
    const proxy = await new Proxy(d.url).start();
    const q = new QuotadClient({ url: proxy.url });
    try {
      await q.events({ order: "desc", before: 5, limit: 2, type: "threshold.*" });
      await q.counters({ minFraction: 0.5, limit: 3 });
      await q.usageTop("tokens", { from: new Date("2026-01-01T00:00:00Z"), to: "2026-02-01", timezone: "UTC", limit: 4 });
      await q.usage("u:1", { from: "2026-01-01", to: "2026-01-02", groupBy: "model" });
      await q.usageExport({ from: "2026-01-01", to: "2026-01-02", timezone: "Europe/Paris", after: "a", limit: 7, groupBy: "model" });
      await q.mintSubjectToken("u:1", { ttlMs: 90_000 });
      await q.mintSubjectToken("u:1");
    } finally {
      q.close();
      await proxy.close();
    }
    const sent = proxy.requests.map((r) => {
      const u = new URL(r.path, "http://x");
      return [r.method, u.pathname, Object.fromEntries(u.searchParams), r.body];
    });
    assert.deepEqual(sent, [
      ["GET", "/v1/events", { before: "5", limit: "2", type: "threshold.*", order: "desc" }, ""],
      ["GET", "/v1/counters", { min_fraction: "0.5", limit: "3" }, ""],
      ["GET", "/v1/usage/top", { metric: "tokens", from: "2026-01-01T00:00:00.000Z", to: "2026-02-01", timezone: "UTC", limit: "4" }, ""],
      ["GET", "/v1/subjects/u%3A1/usage", { from: "2026-01-01", to: "2026-01-02", group_by: "model" }, ""],
      [
        "GET",
        "/v1/usage",
        { from: "2026-01-01", to: "2026-01-02", timezone: "Europe/Paris", format: "json", after: "a", limit: "7", group_by: "model" },
        "",
      ],
      ["POST", "/v1/subjects/u%3A1/tokens", {}, JSON.stringify({ ttl: "90000ms" })],
      ["POST", "/v1/subjects/u%3A1/tokens", {}, "{}"],
    ]);
  }));
