// Endpoints and fields of the contract a quotad may not serve yet. Each test
// skips, naming the reason, when the daemon answers 404 `not_found` for the
// path (or 400 "unknown field" for a new request field), and runs as soon as
// the daemon serves it.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { InvalidRequest, NotFound, Unavailable } from "../dist/index.js";
import { Daemon, SKIPPED, accepted, served, uniqueSubject } from "./helpers.mjs";

const daemon = new Daemon();
before(async () => {
  await daemon.start();
});
after(async () => {
  await daemon.cleanup();
});

const today = () => new Date().toISOString().slice(0, 10);
const tomorrow = () => new Date(Date.now() + 86400000).toISOString().slice(0, 10);

for (const transport of ["tcp", "unix"]) {
  describe(`upcoming over ${transport}`, () => {
    let q;
    before(() => {
      q = daemon.client(transport);
    });
    after(() => q.close());

    test("events page, iterator and type filter", async (t) => {
      const page = await served(t, () => q.events({ limit: 10 }), "GET /v1/events");
      if (page === SKIPPED) return;
      assert.ok(Array.isArray(page.events) && page.events.length <= 10);
      for (const e of page.events) assert.ok(e.type && e.seq !== null);
      const seqs = [];
      for await (const e of q.iterEvents({ pageSize: 5 })) seqs.push(e.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
      assert.equal(new Set(seqs).size, seqs.length);
      const typed = await q.events({ type: "threshold.*" });
      assert.ok(typed.events.every((e) => e.type.startsWith("threshold.")));
      await assert.rejects(q.events({ limit: 5000 }), (e) => e instanceof InvalidRequest && /limit/.test(e.detail));
    });

    test("event stream opens", async (t) => {
      const r = await served(
        t,
        async () => {
          try {
            for await (const ev of q.streamEvents({ reconnect: false, readTimeoutMs: 1000 })) {
              assert.ok(ev.type);
              break;
            }
          } catch (e) {
            if (e instanceof Unavailable && e.code === "timeout") return "idle"; // nothing to send within a second
            throw e;
          }
          return "ok";
        },
        "GET /v1/events/stream",
      );
      if (r === SKIPPED) return;
    });

    test("webhooks", async (t) => {
      const hooks = await served(t, () => q.webhooks(), "GET /v1/webhooks");
      if (hooks === SKIPPED) return;
      assert.ok(Array.isArray(hooks));
      for (const h of hooks) assert.ok(h.name);
    });

    test("breakers, and an unknown breaker is 404", async (t) => {
      const list = await served(t, () => q.breakers(), "GET /v1/breakers");
      if (list === SKIPPED) return;
      for (const b of list) assert.ok(["open", "closed"].includes(b.state));
      const r = await served(
        t,
        () => q.openBreaker("no-such-breaker").then(() => assert.fail("opening an unknown breaker must be 404"), (e) => e),
        "POST /v1/breakers/{name}/open",
      );
      if (r === SKIPPED) return;
      if (r instanceof NotFound && r.code === "not_found") return t.skip("POST /v1/breakers/{name}/open: not served by this quotad yet (404 not_found)");
      assert.ok(r instanceof NotFound);
      await assert.rejects(q.closeBreaker("no-such-breaker"), NotFound);
    });

    test("anomalies and clearing a flag that is not set", async (t) => {
      const flags = await served(t, () => q.anomalies(), "GET /v1/anomalies");
      if (flags === SKIPPED) return;
      for (const f of flags) assert.ok(f.anomaly);
      try {
        const s = await q.clearFlag(uniqueSubject(), "usage-spike");
        assert.ok(!s.flags.some((f) => f.anomaly === "usage-spike"));
      } catch (e) {
        if (e instanceof NotFound && e.code === "not_found") return t.skip("DELETE /v1/subjects/{s}/flags/{anomaly}: not served by this quotad yet (404 not_found)");
        assert.ok(e instanceof NotFound && e.code.startsWith("unknown_"));
      }
    });

    test("subject usage sums what was charged", async (t) => {
      const s = uniqueSubject();
      await q.consume({ subject: s, event: "llm.chat", amounts: { tokens: 1200 } });
      await q.withReservation({ subject: s, amounts: { tokens: 900 } }, (h) => {
        h.actual = { tokens: 300 };
      });
      await (await q.reserve({ subject: s, amounts: { tokens: 5000 } })).release();
      const u = await served(t, () => q.usage(s, { from: today(), to: tomorrow(), granularity: "hour" }), "GET /v1/subjects/{s}/usage");
      if (u === SKIPPED) return;
      assert.equal(u.subject, s);
      assert.equal(u.granularity, "hour");
      assert.equal(u.totals().tokens, 1500);
      assert.equal(u.totals().requests, 2);
      const day = await q.usage(s, { from: today(), to: tomorrow(), granularity: "day" });
      assert.deepEqual(day.totals(), u.totals());
    });

    test("usage export as JSON pages and CSV", async (t) => {
      const s = uniqueSubject();
      await q.consume({ subject: s, amounts: { tokens: 42 } });
      const page = await served(t, () => q.usageExport({ from: today(), to: tomorrow(), granularity: "day" }), "GET /v1/usage");
      if (page === SKIPPED) return;
      assert.ok(Array.isArray(page.rows));
      let total = 0;
      for await (const r of q.iterUsageExport({ from: today(), to: tomorrow(), granularity: "day" })) if (r.subject === s) total += r.amounts.tokens ?? 0;
      assert.equal(total, 42);
      const csv = await q.usageExport({ from: today(), to: tomorrow(), granularity: "day", format: "csv" });
      const lines = csv.trim().split(/\r?\n/);
      assert.equal(lines[0].replace(/ /g, ""), "subject,start,metric,amount");
      assert.ok(lines.slice(1).some((l) => l.startsWith(`${s},`) && l.endsWith(",tokens,42")));
    });

    test("openapi document", async (t) => {
      const doc = await served(t, () => q.openapi(), "GET /v1/openapi.json");
      if (doc === SKIPPED) return;
      assert.match(String(doc.openapi), /^3\.1/);
      assert.ok("/v1/consume" in (doc.paths ?? {}));
    });

    test("priority field", async (t) => {
      const s = uniqueSubject();
      const d = await accepted(t, () => q.consume({ subject: s, priority: "critical" }), "priority");
      if (d === SKIPPED) return;
      assert.ok(d.allowed);
      assert.ok((await q.check({ subject: s, priority: "low" })).allowed);
      await assert.rejects(q.consume({ subject: s, priority: "urgent" }), (e) => e instanceof InvalidRequest && /priority/.test(e.detail));
    });

    test("waitMs field", async (t) => {
      const s = uniqueSubject();
      const d = await accepted(t, () => q.consume({ subject: s, amounts: { tokens: 10 }, waitMs: 100 }), "wait_ms");
      if (d === SKIPPED) return;
      assert.ok(d.allowed);
      assert.ok(d.waitedMs === null || d.waitedMs === 0);
      const denied = await q.consume({ subject: s, amounts: { tokens: 2_000_000 }, waitMs: 1000 });
      assert.equal(denied.allowed, false);
      assert.ok(denied.waitedMs === null || denied.waitedMs === 0);
    });

    test("decisions name the plan; no cost without pricing", async () => {
      const d = await q.consume({ subject: uniqueSubject() });
      assert.equal(d.plan, "free");
      assert.equal(d.cost, null);
    });
  });
}
