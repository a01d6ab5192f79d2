// Policy as data: GET|PUT /v1/policy, /v1/policy/versions, GET|PUT|DELETE
// /v1/plans/{name} and /v1/limits/{name}, against a daemon with
// `[policy] source = "api"` (and one with the default `"file"`).

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { Conflict, Forbidden, InvalidRequest, NotFound, PreconditionFailed, QuotadClient, QuotadError, Unavailable } from "../dist/index.js";
import { ADMIN_TOKEN, CLIENT_TOKEN, Daemon, FAST, Proxy, uniqueSubject } from "./helpers.mjs";

const daemon = new Daemon({ auth: true, policyApi: true });
const fileDaemon = new Daemon();
before(async () => {
  await Promise.all([daemon.start(), fileDaemon.start()]);
});
after(async () => {
  await Promise.all([daemon.cleanup(), fileDaemon.cleanup()]);
});

const unique = (prefix) => `${prefix}-${randomUUID().replace(/-/g, "").slice(0, 10)}`;
const dayPlan = (limit, max = 1000) => ({ limits: [{ name: limit, period: "1d", max }] });

for (const transport of ["tcp", "unix"]) {
  describe(`policy over ${transport}`, () => {
    let q;
    before(() => {
      q = daemon.client(transport, { token: ADMIN_TOKEN });
    });
    after(() => q.close());

    test("read the policy, its versions and an earlier version", async () => {
      const p = await q.getPolicy();
      assert.ok(p.version >= 1 && p.actor);
      assert.ok(p.changedAt instanceof Date);
      assert.equal(p.raw.version, p.version);
      const free = p.plan("free");
      assert.equal(free.default, true);
      assert.deepEqual(free.limits.slice(0, 2).map((l) => l.name), ["tokens-per-day", "requests-per-day"]);
      assert.equal(p.limit("global-tokens").algorithm, "token_bucket");
      assert.equal(p.plan("nope"), undefined);
      assert.ok(p.policy.metrics.includes("cost_micros"));

      const versions = await q.listPolicyVersions();
      const numbers = versions.map((v) => v.version);
      assert.deepEqual(numbers, [...numbers].sort((a, b) => b - a)); // newest first
      assert.ok(numbers[0] >= p.version);
      assert.equal(numbers.at(-1), 1);
      assert.equal(versions.at(-1).actor, "file"); // the config file seeded version 1
      assert.ok(versions.every((v) => v.changedAt instanceof Date));

      const first = await q.getPolicy({ version: 1 });
      assert.deepEqual([first.version, first.actor], [1, "file"]);
      assert.equal(first.plan("free").limits[0].name, "tokens-per-day");
      await assert.rejects(q.getPolicy({ version: 1e9 }), (e) => e instanceof NotFound && e.status === 404 && e.code === "unknown_version");
      await assert.rejects(q.getPolicy({ version: -1 }), TypeError);
    });

    test("getPlan and getLimit answer them as written", async () => {
      const free = await q.getPlan("free");
      assert.equal(free.name, "free");
      const t = free.limits[0];
      assert.deepEqual([t.name, t.metric, t.scope, t.algorithm, t.max, t.period, t.mode], ["tokens-per-day", "tokens", "subject", "fixed", 10000, "1d", "enforce"]);
      const g = await q.getLimit("global-tokens");
      assert.deepEqual([g.name, g.scope, g.refill], ["global-tokens", "global", 1000000]);
      await assert.rejects(q.getPlan("no-such-plan"), (e) => e instanceof NotFound && e.code === "unknown_plan" && /no-such-plan/.test(e.detail));
      await assert.rejects(q.getLimit("no-such-limit"), (e) => e instanceof NotFound && e.code === "unknown_limit");
    });

    test("putPlan, read back, assign, deletePlan refused while in use", async () => {
      const name = unique("team");
      const limit = unique("team-day");
      const s = uniqueSubject();
      const before = (await q.getPolicy()).version;
      const ch = await q.putPlan(name, dayPlan(limit));
      assert.ok(ch.version > before);
      assert.equal(ch.previousVersion, ch.version - 1);
      assert.ok(ch.actor && ch.changedAt instanceof Date);
      assert.deepEqual(ch.countersReset, []);
      assert.equal(ch.replayed, false);
      assert.equal(ch.plan.name, name);
      assert.equal(ch.plan.limits[0].metric, "requests"); // default filled in
      assert.deepEqual([ch.policy, ch.limit], [null, null]);
      const got = await q.getPlan(name);
      assert.deepEqual(got, ch.plan);
      assert.equal((await q.getPolicy()).version, ch.version);

      // Read, edit, write back: a raised max keeps the counters.
      await q.setPlan(s, { plan: name });
      assert.equal((await q.consume({ subject: s })).counter(limit).used, 1);
      got.limits[0].max = 2000;
      const ch2 = await q.putPlan(name, got);
      assert.deepEqual(ch2.countersReset, []);
      const c = (await q.consume({ subject: s })).counter(limit);
      assert.deepEqual([c.used, c.max], [2, 2000]);
      // A changed period starts afresh, and says so.
      got.limits[0].period = "1h";
      const ch3 = await q.putPlan(name, got);
      assert.deepEqual(ch3.countersReset.map((r) => r.limit), [limit]);
      assert.ok(ch3.countersReset[0].reason);

      await assert.rejects(q.deletePlan(name), (e) => e instanceof Conflict && e.status === 409 && e.code === "plan_in_use" && /1 subject/.test(e.detail));
      await assert.rejects(q.deletePlan("free"), (e) => e instanceof Conflict && e.code === "plan_in_use" && /default/.test(e.detail));

      await q.setPlan(s, { plan: "free" });
      const gone = await q.deletePlan(name);
      assert.equal(gone.plan, null);
      assert.equal(gone.version, ch3.version + 1);
      assert.deepEqual(gone.countersReset.map((r) => [r.limit, r.reason]), [[limit, "removed"]]);
      await assert.rejects(q.getPlan(name), (e) => e instanceof NotFound && e.code === "unknown_plan");
      await assert.rejects(q.deletePlan(name), NotFound);
    });

    test("a plan's name must match the path", async () => {
      await assert.rejects(
        q.putPlan(unique("a"), { name: "something-else", limits: [] }),
        (e) => e instanceof InvalidRequest && e.code === "invalid_policy" && /name/.test(e.detail),
      );
    });

    test("putLimit, getLimit, deleteLimit", async () => {
      const name = unique("calls-per-hour");
      const s = uniqueSubject();
      const ch = await q.putLimit(name, { scope: "global", period: "1h", max: 1_000_000, alerts: [0.8, 1.0] });
      assert.deepEqual([ch.limit.name, ch.limit.max, ch.limit.alerts], [name, 1_000_000, [0.8, 1.0]]);
      assert.deepEqual([ch.plan, ch.policy], [null, null]);
      assert.deepEqual(await q.getLimit(name), ch.limit);
      const c = (await q.consume({ subject: s })).counter(name);
      assert.ok(c && c.scope === "global" && c.used >= 1);
      const ch2 = await q.putLimit(name, { scope: "global", period: "1h", max: "unlimited" });
      assert.equal(ch2.version, ch.version + 1);
      assert.equal((await q.getLimit(name)).max, "unlimited");
      assert.equal((await q.consume({ subject: s })).counter(name).max, "unlimited");
      const gone = await q.deleteLimit(name);
      assert.equal(gone.limit, null);
      assert.deepEqual(gone.countersReset.map((r) => [r.limit, r.reason]), [[name, "removed"]]);
      assert.equal((await q.consume({ subject: s })).counter(name), undefined);
      await assert.rejects(q.getLimit(name), (e) => e instanceof NotFound && e.code === "unknown_limit");
      await assert.rejects(q.deleteLimit(name), (e) => e instanceof NotFound && e.code === "unknown_limit");
    });

    test("a stale ifVersion is 412 version_mismatch and changes nothing", async () => {
      const name = unique("guarded");
      const v = (await q.getPolicy()).version;
      const ch = await q.putLimit(name, { scope: "global", period: "1h", max: 100 }, { ifVersion: v });
      assert.equal(ch.previousVersion, v);
      const current = (await q.getPolicy()).policy;
      for (const write of [
        () => q.putLimit(name, { scope: "global", period: "1h", max: 200 }, { ifVersion: v }),
        () => q.deleteLimit(name, { ifVersion: v }),
        () => q.putPlan(unique("p"), { limits: [] }, { ifVersion: v }),
        () => q.putPolicy(current, { ifVersion: v }),
      ]) {
        await assert.rejects(write(), (e) => {
          assert.ok(e instanceof PreconditionFailed && e instanceof QuotadError);
          assert.deepEqual([e.status, e.code], [412, "version_mismatch"]);
          assert.ok(e.detail.includes(String(ch.version)), e.detail);
          return true;
        });
      }
      assert.equal((await q.getLimit(name)).max, 100);
      assert.equal((await q.deleteLimit(name, { ifVersion: ch.version })).previousVersion, ch.version);
      await assert.rejects(q.deleteLimit(name, { ifVersion: 1.5 }), TypeError);
    });

    test("putPolicy round-trips what getPolicy answers", async () => {
      const p = await q.getPolicy();
      const ch = await q.putPolicy(p.policy, { ifVersion: p.version });
      // The same policy again: no new version.
      assert.deepEqual([ch.previousVersion, ch.version], [p.version, p.version]);
      assert.deepEqual(ch.policy, p.policy);
      assert.deepEqual([ch.plan, ch.limit, ch.countersReset], [null, null, []]);
      const now = await q.getPolicy();
      assert.equal(now.version, ch.version);
      assert.deepEqual(now.policy, p.policy);
      assert.equal((await q.listPolicyVersions())[0].version, ch.version);
    });

    test("an invalid policy is invalid_policy naming the path", async () => {
      const p = await q.getPolicy();
      let doc = structuredClone(p.policy);
      doc.plans[0].limits[0].max = -5;
      await assert.rejects(q.putPolicy(doc), (e) => {
        assert.ok(e instanceof InvalidRequest);
        assert.deepEqual([e.status, e.code], [400, "invalid_policy"]);
        assert.ok(e.detail.includes("plans[0].limits[0].max"), e.detail);
        return true;
      });
      doc = structuredClone(p.policy);
      doc.plans[1].limits[0].period = "banana";
      await assert.rejects(q.putPolicy(doc), (e) => e.code === "invalid_policy" && e.detail.includes("plans[1].limits[0].period"));
      await assert.rejects(
        q.putPlan(unique("bad"), { limits: [{ name: "x", period: "1d", max: "lots" }] }),
        (e) => e.code === "invalid_policy" && e.detail.includes("limits[0].max"),
      );
      await assert.rejects(q.putLimit(unique("bad"), { period: "1h", max: 1, bogus: true }), (e) => e.code === "invalid_policy" && /bogus/.test(e.detail));
      assert.equal((await q.getPolicy()).version, p.version); // nothing changed
    });

    test("an idempotent repeat of putPlan answers the same version", async () => {
      const name = unique("idem");
      const key = unique("key");
      const plan = dayPlan(unique("d"));
      const a = await q.putPlan(name, plan, { idempotencyKey: key });
      const b = await q.putPlan(name, plan, { idempotencyKey: key });
      assert.deepEqual([a.replayed, b.replayed], [false, true]);
      assert.deepEqual([b.version, b.previousVersion], [a.version, a.previousVersion]);
      assert.deepEqual(b.plan, a.plan);
      assert.equal((await q.getPolicy()).version, a.version); // applied once
      await assert.rejects(q.putPlan(name, dayPlan("other"), { idempotencyKey: key }), (e) => e instanceof Conflict && e.code === "idempotency_conflict");
      const d1 = await q.deletePlan(name, { idempotencyKey: `${key}-del` });
      const d2 = await q.deletePlan(name, { idempotencyKey: `${key}-del` });
      assert.ok(d2.replayed);
      assert.equal(d2.version, d1.version);
    });

    test("policy.changed events", async () => {
      const name = unique("evt");
      const ch = await q.putLimit(name, { scope: "global", period: "1h", max: 5 });
      await q.deleteLimit(name);
      const mine = [];
      for await (const e of q.iterEvents({ type: "policy.changed" })) if (e.raw.version === ch.version) mine.push(e);
      assert.equal(mine.length, 1);
      assert.equal(mine[0].type, "policy.changed");
      assert.deepEqual([mine[0].raw.previous_version, mine[0].raw.actor], [ch.previousVersion, ch.actor]);
    });

    test("the event stream filters by type", async () => {
      const name = unique("stream");
      await q.putLimit(name, { scope: "global", period: "1h", max: 5 });
      await q.deleteLimit(name);
      const read = async (type) => {
        const got = [];
        try {
          for await (const e of q.streamEvents({ lastEventId: 0, type, reconnect: false, readTimeoutMs: 1000 })) got.push(e);
        } catch (e) {
          if (!(e instanceof Unavailable && e.code === "timeout")) throw e; // nothing more within a second
        }
        return got;
      };
      const policy = await read("policy.*");
      assert.ok(policy.length > 0 && policy.every((e) => e.type === "policy.changed"));
      assert.deepEqual(await read("breaker.*"), []);
    });

    test("a client token reads plans and limits but not the policy", async () => {
      const c = daemon.client(transport, { token: CLIENT_TOKEN });
      try {
        assert.equal((await c.getPlan("free")).name, "free");
        assert.equal((await c.getLimit("global-tokens")).name, "global-tokens");
        for (const call of [() => c.getPolicy(), () => c.listPolicyVersions(), () => c.putPlan("x", { limits: [] }), () => c.deleteLimit("global-tokens")]) {
          await assert.rejects(call(), (e) => e instanceof Forbidden && e.code === "forbidden");
        }
      } finally {
        c.close();
      }
    });

    test("writes are refused when the policy comes from the file", async () => {
      const f = fileDaemon.client(transport);
      try {
        const p = await f.getPolicy();
        assert.ok(p.version >= 1 && p.plan("free"));
        assert.equal((await f.getPlan("pro")).name, "pro");
        for (const write of [
          () => f.putPlan("team", { limits: [] }),
          () => f.deletePlan("pro"),
          () => f.putLimit("x", { period: "1h", max: 1 }),
          () => f.deleteLimit("global-tokens"),
          () => f.putPolicy(p.policy, { ifVersion: p.version }),
        ]) {
          await assert.rejects(write(), (e) => e instanceof Conflict && e.status === 409 && e.code === "policy_from_file");
        }
        assert.equal((await f.getPolicy()).version, p.version);
      } finally {
        f.close();
      }
    });
  });
}

test("writes send If-Match and one Idempotency-Key per call, reused on retries", async () => {
  const proxy = await new Proxy(daemon.url, ["503"]).start();
  const q = new QuotadClient({ url: proxy.url, token: ADMIN_TOKEN, ...FAST });
  try {
    const v = (await q.getPolicy()).version; // the scripted 503 is retried
    const name = unique("hdr");
    proxy.script.push("503");
    const ch = await q.putLimit(name, { scope: "global", period: "1h", max: 7 }, { ifVersion: v });
    assert.equal(ch.previousVersion, v);
    const puts = proxy.requests.filter((r) => r.method === "PUT");
    assert.equal(puts.length, 2);
    assert.deepEqual(puts.map((r) => r.headers["if-match"]), [`"${v}"`, `"${v}"`]);
    assert.match(puts[0].headers["idempotency-key"], /^qts-/);
    assert.equal(puts[1].headers["idempotency-key"], puts[0].headers["idempotency-key"]);
    assert.deepEqual(JSON.parse(puts[0].body), { scope: "global", period: "1h", max: 7 });
    await q.deleteLimit(name, { idempotencyKey: "mine" });
    const del = proxy.requests.at(-1);
    assert.deepEqual([del.method, del.headers["idempotency-key"], del.headers["if-match"]], ["DELETE", "mine", undefined]);
    assert.equal(proxy.requests.find((r) => r.method === "GET").path, "/v1/policy");
  } finally {
    q.close();
    await proxy.close();
  }
});
