// Decisions, reservations, batch and administration against a real daemon,
// over TCP and the Unix socket.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Conflict, Denied, InvalidRequest, NotFound, QuotadError, Reservation } from "../dist/index.js";
import { Daemon, uniqueSubject } from "./helpers.mjs";

const daemon = new Daemon();
before(async () => {
  await daemon.start();
});
after(async () => {
  await daemon.cleanup();
});

for (const transport of ["tcp", "unix"]) {
  describe(`over ${transport}`, () => {
    let q;
    before(() => {
      q = daemon.client(transport);
    });
    after(() => q.close());
    const used = async (s, limit = "tokens-per-day") => (await q.subject(s)).counter(limit).used;

    // ---------- decisions ----------

    test("consume allows, counts and carries the rate-limit headers", async () => {
      const s = uniqueSubject();
      const d = await q.consume({ subject: s, event: "llm.chat", amounts: { tokens: 1200 } });
      assert.equal(d.allowed, true);
      assert.equal(d.decision, "allow");
      assert.equal(d.degraded, false);
      assert.equal(d.subject, s);
      assert.equal(d.plan, "free");
      assert.equal(d.replayed, false);
      assert.equal(d.fallback, false);
      assert.equal(d.reservationId, null);
      assert.equal(d.expiresAt, null);
      assert.deepEqual(d.reasons, []);
      assert.equal(d.retryAfterMs, null);
      const c = d.counter("tokens-per-day");
      assert.deepEqual([c.metric, c.scope, c.max, c.used, c.remaining, c.mode], ["tokens", s, 10000, 1200, 8800, "enforce"]);
      assert.ok(c.resetsAt instanceof Date);
      assert.equal(d.limit, 1000); // least remaining: requests-per-day
      assert.equal(d.remaining, 999);
      assert.ok(d.reset > Date.now() / 1000);
      assert.equal(d.retryAfter, null);
      assert.equal(d.raw.subject, s);
    });

    test("a denial has reasons and the denying limit's headers, and charges nothing", async () => {
      const s = uniqueSubject();
      assert.ok((await q.consume({ subject: s, amounts: { tokens: 9000 } })).allowed);
      const d = await q.consume({ subject: s, event: "llm.chat", amounts: { tokens: 2000 } });
      assert.equal(d.allowed, false);
      assert.equal(d.decision, "deny");
      assert.deepEqual(d.reasons.map((r) => [r.limit, r.code]), [["tokens-per-day", "limit_exceeded"]]);
      assert.ok(d.reasons[0].retryAfterMs > 0);
      assert.equal(d.retryAfterMs, d.reasons[0].retryAfterMs);
      assert.equal(d.limit, 10000);
      assert.equal(d.remaining, 1000);
      assert.equal(d.retryAfter, Math.ceil(d.retryAfterMs / 1000));
      assert.equal(await used(s), 9000);
    });

    test("check changes nothing", async () => {
      const s = uniqueSubject();
      const d = await q.check({ subject: s, amounts: { tokens: 500 } });
      assert.ok(d.allowed);
      assert.equal(d.counter("tokens-per-day").used, 0);
      assert.equal(await used(s), 0);
      assert.equal((await q.check({ subject: s, amounts: { tokens: 20000 } })).allowed, false);
    });

    test("degrade allows but marks the decision", async () => {
      const s = uniqueSubject();
      const d = await q.consume({ subject: s, event: "llm.chat", attributes: { model: "gpt-4o" }, amounts: { tokens: 6000 } });
      assert.equal(d.allowed, true);
      assert.equal(d.decision, "degrade");
      assert.equal(d.degraded, true);
      assert.deepEqual(d.reasons.map((r) => [r.limit, r.code]), [["gpt4o-tokens-per-hour", "degraded"]]);
    });

    test("exceeds_capacity has no retry time", async () => {
      const d = await q.consume({ subject: uniqueSubject(), amounts: { tokens: 2_000_000 } });
      assert.equal(d.allowed, false);
      assert.ok(d.reasons.some((r) => r.limit === "global-tokens" && r.code === "exceeds_capacity"));
      assert.ok(d.reasons.every((r) => r.retryAfterMs === null));
      assert.equal(d.retryAfterMs, null);
      assert.equal(d.retryAfter, null);
    });

    test("errors: unknown metric, field named, client-side checks", async () => {
      const s = uniqueSubject();
      await assert.rejects(q.consume({ subject: s, amounts: { tokenz: 3 } }), (e) => {
        assert.ok(e instanceof InvalidRequest && e instanceof QuotadError);
        assert.equal(e.status, 400);
        assert.equal(e.code, "unknown_metric");
        assert.match(e.detail, /tokenz/);
        assert.match(e.message, /\(400 unknown_metric\)/);
        return true;
      });
      await assert.rejects(q.consume({ subject: s, amounts: { tokens: -1 } }), (e) => e.code === "invalid_request" && /amounts\.tokens/.test(e.detail));
      await assert.rejects(q.consume({ subject: "x".repeat(300) }), (e) => e instanceof InvalidRequest && /subject/.test(e.detail));
      await assert.rejects(q.consume({ subject: "" }), TypeError);
    });

    test("idempotent replay and conflict", async () => {
      const s = uniqueSubject();
      const key = `order-${s}`;
      const a = await q.consume({ subject: s, amounts: { tokens: 100 }, idempotencyKey: key });
      const b = await q.consume({ subject: s, amounts: { tokens: 100 }, idempotencyKey: key });
      assert.equal(a.replayed, false);
      assert.equal(b.replayed, true);
      assert.equal(await used(s), 100);
      await assert.rejects(q.consume({ subject: s, amounts: { tokens: 9 }, idempotencyKey: key }), (e) => e instanceof Conflict && e.code === "idempotency_conflict");
    });

    test("generated keys are unique per call", async () => {
      const s = uniqueSubject();
      await q.consume({ subject: s, amounts: { tokens: 10 } });
      const b = await q.consume({ subject: s, amounts: { tokens: 10 } });
      assert.equal(b.replayed, false);
      assert.equal(await used(s), 20);
    });

    test("subjects with reserved characters round-trip", async () => {
      for (const s of ["org/acme team", "user:ü#1?x=y", "100%"]) {
        assert.equal((await q.consume({ subject: s })).subject, s);
        assert.equal((await q.subject(s)).subject, s);
      }
    });

    test("batch", async () => {
      const s = uniqueSubject();
      const res = await q.batch([
        { op: "consume", subject: s, amounts: { tokens: 100 } },
        { op: "check", subject: s, amounts: { tokens: 1 } },
        { op: "reserve", subject: s, amounts: { tokens: 50 }, ttlMs: 30000 },
        { op: "commit", reservationId: "rsv_does_not_exist" },
        { op: "bogus" },
      ]);
      assert.equal(res.length, 5);
      const [consume, check, reserve, commit, bogus] = res;
      assert.ok(consume.ok && consume.decision.allowed && consume.op === "consume");
      assert.equal(consume.decision.counter("tokens-per-day").used, 100);
      assert.equal(consume.decision.limit, null); // no headers inside a batch
      assert.ok(check.ok && check.decision.allowed);
      assert.ok(reserve.decision.reservationId);
      assert.equal(commit.status, 404);
      assert.ok(commit.error instanceof NotFound && commit.error.code === "unknown_reservation");
      assert.equal(bogus.status, 400);
      assert.equal(bogus.error.code, "invalid_request");
      const [fin] = await q.batch([{ op: "commit", reservationId: reserve.decision.reservationId, amounts: { tokens: 20 } }]);
      assert.equal(fin.finish.status, "committed");
      assert.equal(fin.finish.charged.tokens, 20);
      assert.equal(await used(s), 120);
      const key = `b-${s}`;
      assert.equal((await q.batch([{ op: "consume", subject: s, idempotencyKey: key }]))[0].decision.replayed, false);
      assert.equal((await q.batch([{ op: "consume", subject: s, idempotencyKey: key }]))[0].decision.replayed, true);
      await assert.rejects(q.batch([]), TypeError);
    });

    // ---------- reservations ----------

    test("reserve then commit less", async () => {
      const s = uniqueSubject();
      const hold = await q.reserve({ subject: s, event: "llm.chat", amounts: { tokens: 4000 }, ttlMs: 30000 });
      assert.ok(hold instanceof Reservation);
      assert.match(hold.reservationId, /^rsv_/);
      assert.ok(hold.expiresAt instanceof Date);
      assert.ok(hold.expiresAt.getTime() - Date.now() <= 31000 && hold.expiresAt.getTime() > Date.now());
      assert.equal(await used(s), 4000);
      const fin = await hold.commit({ tokens: 2630 });
      assert.deepEqual([fin.status, fin.expired, fin.subject], ["committed", false, s]);
      assert.deepEqual(fin.held, { requests: 1, tokens: 4000 });
      assert.deepEqual(fin.charged, { requests: 1, tokens: 2630 });
      assert.equal(await used(s), 2630);
      assert.ok(hold.finished);
      assert.equal(await hold.commit(), fin);
    });

    test("reserve then release", async () => {
      const s = uniqueSubject();
      const hold = await q.reserve({ subject: s, amounts: { tokens: 3000 } });
      const fin = await hold.release();
      assert.equal(fin.status, "released");
      assert.deepEqual(fin.charged, {});
      assert.equal(await used(s), 0);
    });

    test("withReservation commits hold.actual and returns the callback's value", async () => {
      const s = uniqueSubject();
      let seen;
      const value = await q.withReservation({ subject: s, event: "llm.chat", amounts: { tokens: 4000 } }, async (hold) => {
        seen = hold;
        assert.equal(await used(s), 4000);
        hold.actual = { tokens: 2630 };
        return "the answer";
      });
      assert.equal(value, "the answer");
      assert.equal(seen.result.status, "committed");
      assert.equal(seen.result.charged.tokens, 2630);
      assert.equal(await used(s), 2630);
    });

    test("withReservation commits what was held by default", async () => {
      const s = uniqueSubject();
      await q.withReservation({ subject: s, amounts: { tokens: 700 } }, () => {});
      assert.equal(await used(s), 700);
    });

    test("withReservation releases and rethrows when the callback throws", async () => {
      const s = uniqueSubject();
      let seen;
      await assert.rejects(
        q.withReservation({ subject: s, amounts: { tokens: 4000 } }, async (hold) => {
          seen = hold;
          throw new Error("model failed");
        }),
        /model failed/,
      );
      assert.equal(seen.result.status, "released");
      assert.equal(await used(s), 0);
    });

    test("a commit inside the callback is not repeated", async () => {
      const s = uniqueSubject();
      await q.withReservation({ subject: s, amounts: { tokens: 500 } }, async (hold) => {
        await hold.commit({ tokens: 200 });
      });
      assert.equal(await used(s), 200);
    });

    test("a denied reserve throws Denied and the callback does not run", async () => {
      const s = uniqueSubject();
      await q.consume({ subject: s, amounts: { tokens: 9500 } });
      let ran = false;
      await assert.rejects(
        q.withReservation({ subject: s, amounts: { tokens: 4000 } }, () => {
          ran = true;
        }),
        (e) => {
          assert.ok(e instanceof Denied);
          assert.ok(!(e instanceof QuotadError));
          assert.equal(e.decision.allowed, false);
          assert.deepEqual(e.reasons.map((r) => r.code), ["limit_exceeded"]);
          assert.ok(e.retryAfterMs > 0);
          assert.match(e.message, /tokens-per-day: limit_exceeded/);
          return true;
        },
      );
      assert.equal(ran, false);
      await assert.rejects(q.reserve({ subject: s, amounts: { tokens: 4000 } }), Denied);
      assert.equal(await used(s), 9500);
    });

    test("finishing rules: same answer, reservation_finished, unknown_reservation", async () => {
      const s = uniqueSubject();
      const hold = await q.reserve({ subject: s, amounts: { tokens: 100 } });
      const a = await q.commit(hold.reservationId, { tokens: 50 });
      const b = await q.commit(hold.reservationId, { tokens: 50 });
      assert.deepEqual(a.raw, b.raw);
      await assert.rejects(q.release(hold.reservationId), (e) => e instanceof Conflict && e.code === "reservation_finished");
      await assert.rejects(q.commit(hold.reservationId, { tokens: 60 }), (e) => e.code === "reservation_finished");
      await assert.rejects(q.commit("rsv_unknown"), (e) => e instanceof NotFound && e.status === 404 && e.code === "unknown_reservation");
    });

    test("reserve replay and ttl bounds", async () => {
      const s = uniqueSubject();
      const key = `rsv-${s}`;
      const a = await q.reserve({ subject: s, amounts: { tokens: 10 }, idempotencyKey: key });
      const b = await q.reserve({ subject: s, amounts: { tokens: 10 }, idempotencyKey: key });
      assert.ok(b.decision.replayed);
      assert.equal(b.reservationId, a.reservationId);
      await a.release();
      await assert.rejects(q.reserve({ subject: s, ttlMs: 36_000_000 }), (e) => e instanceof InvalidRequest && /ttl_ms/.test(e.detail));
    });

    // ---------- administration ----------

    test("subject of an unassigned subject", async () => {
      const s = uniqueSubject();
      const v = await q.subject(s);
      assert.deepEqual([v.subject, v.plan, v.assigned, v.overrides], [s, "free", false, {}]);
      assert.equal(v.counter("image-credits").resetsAt, null);
    });

    test("setPlan with overrides keeps usage; unknown plan; replay", async () => {
      const s = uniqueSubject();
      await q.consume({ subject: s, amounts: { tokens: 1234 } });
      let v = await q.setPlan(s, { plan: "pro", overrides: { "tokens-per-day": 50000 } });
      assert.deepEqual([v.plan, v.assigned], ["pro", true]);
      assert.deepEqual(v.overrides, { "tokens-per-day": { max: 50000 } });
      assert.deepEqual([v.counter("tokens-per-day").max, v.counter("tokens-per-day").used], [50000, 1234]);
      v = await q.setPlan(s, { overrides: { "requests-per-day": { max: "unlimited" } } });
      assert.equal(v.plan, "pro");
      assert.equal(v.counter("requests-per-day").max, "unlimited");
      assert.equal(v.counter("requests-per-day").remaining, null);
      await assert.rejects(q.setPlan(s, { plan: "platinum" }), (e) => e instanceof NotFound && e.code === "unknown_plan");
      const key = `put-${s}`;
      assert.equal((await q.setPlan(s, { plan: "free", idempotencyKey: key })).replayed, false);
      assert.equal((await q.setPlan(s, { plan: "free", idempotencyKey: key })).replayed, true);
      await assert.rejects(q.setPlan(s, { plan: "pro", idempotencyKey: key }), Conflict);
    });

    test("reset and credit", async () => {
      const s = uniqueSubject();
      await q.consume({ subject: s, amounts: { tokens: 300 } });
      let v = await q.reset(s, { limit: "tokens-per-day" });
      assert.equal(v.counter("tokens-per-day").used, 0);
      assert.equal(v.counter("requests-per-day").used, 1);
      v = await q.reset(s);
      assert.equal(v.counter("requests-per-day").used, 0);
      await assert.rejects(q.reset(s, { limit: "nope" }), (e) => e.code === "unknown_limit");
      for (let i = 0; i < 3; i++) assert.ok((await q.consume({ subject: s, event: "image.render" })).allowed);
      const d = await q.consume({ subject: s, event: "image.render" });
      assert.equal(d.allowed, false);
      assert.equal(d.retryAfterMs, null);
      v = await q.credit(s, "image-credits", 2);
      assert.equal(v.counter("image-credits").max, 5);
      assert.ok((await q.consume({ subject: s, event: "image.render" })).allowed);
      await assert.rejects(q.credit(s, "nope", 1), (e) => e.code === "unknown_limit");
      await assert.rejects(q.credit(s, "image-credits", 0), (e) => e instanceof InvalidRequest && /amount/.test(e.detail));
    });

    test("deleteSubject", async () => {
      const s = uniqueSubject();
      await q.setPlan(s, { plan: "pro" });
      const r = await q.deleteSubject(s);
      assert.deepEqual([r.subject, r.deleted], [s, true]);
      assert.equal((await q.subject(s)).plan, "free");
    });

    test("subjects pages and iterSubjects", async () => {
      const prefix = `${uniqueSubject("page")}:`;
      const names = [0, 1, 2, 3, 4].map((i) => `${prefix}${i}`);
      for (const n of names) await q.setPlan(n, { plan: "pro" });
      const page = await q.subjects({ after: prefix, limit: 2 });
      assert.deepEqual(page.subjects.map((e) => e.subject), names.slice(0, 2));
      assert.equal(page.subjects[0].plan, "pro");
      assert.equal(page.nextAfter, names[1]);
      const seen = [];
      for await (const e of q.iterSubjects({ after: prefix, pageSize: 2 })) if (e.subject.startsWith(prefix)) seen.push(e.subject);
      assert.deepEqual(seen, names);
      await assert.rejects(q.subjects({ limit: 0 }), (e) => e instanceof InvalidRequest && /limit/.test(e.detail));
    });

    test("plans, reload, health, ready, metrics, digest, request", async () => {
      const p = await q.plans();
      assert.deepEqual(p.plans.map((x) => x.name), ["free", "pro"]);
      assert.equal(p.plans[0].default, true);
      assert.deepEqual(p.limits.map((l) => l.name), ["global-tokens"]);
      assert.ok(p.metrics.includes("cost_micros"));
      const r = await q.reload();
      assert.equal(r.plans, 2);
      assert.deepEqual(r.restartRequired, []);
      assert.equal(await q.health(), true);
      assert.equal(await q.ready(), true);
      await q.waitReady(5000);
      assert.match(await q.metrics(), /quotad_decisions_total/);
      assert.equal(typeof (await q.digest()), "object");
      assert.deepEqual(await q.request("GET", "/healthz"), { status: "ok" });
      await assert.rejects(q.request("PATCH", "/v1/plans"), (e) => e instanceof QuotadError && e.status === 405);
    });

    test("concurrent consumes are exact", async () => {
      const s = uniqueSubject();
      const results = await Promise.all(Array.from({ length: 15 }, () => q.consume({ subject: s, amounts: { tokens: 1000 } })));
      assert.equal(results.filter((d) => d.allowed).length, 10);
      assert.equal(await used(s), 10000);
    });
  });
}
