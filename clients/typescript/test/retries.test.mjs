// Retries, idempotency keys across retries, onUnavailable and the SSE client,
// using a scriptable proxy in front of the real daemon.

import assert from "node:assert/strict";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { Denied, InvalidRequest, NotFound, QuotadClient, Unavailable } from "../dist/index.js";
import { Daemon, FAST, Proxy, freePort, sse, uniqueSubject } from "./helpers.mjs";

const daemon = new Daemon();
const proxies = [];
before(async () => {
  await daemon.start();
});
after(async () => {
  for (const p of proxies) await p.close();
  await daemon.cleanup();
});

async function proxy(script, upstream = daemon.url) {
  const p = await new Proxy(upstream, script).start();
  proxies.push(p);
  return p;
}

test("503 is retried with the same idempotency key", async () => {
  const p = await proxy(["503", "503"]);
  const q = new QuotadClient({ url: p.url, retries: 2, ...FAST });
  const d = await q.consume({ subject: uniqueSubject(), amounts: { tokens: 10 } });
  q.close();
  assert.ok(d.allowed && !d.replayed);
  const keys = p.bodies().map((b) => b.idempotency_key);
  assert.equal(keys.length, 3);
  assert.equal(new Set(keys).size, 1);
  assert.match(keys[0], /^qts-/);
  assert.notEqual(d.limit, null);
});

test("a dropped connection is retried with the same key", async () => {
  const p = await proxy(["drop", "pass"]);
  const s = uniqueSubject();
  const q = new QuotadClient({ url: p.url, ...FAST });
  const hold = await q.reserve({ subject: s, amounts: { tokens: 10 } });
  q.close();
  const keys = p.bodies().map((b) => b.idempotency_key);
  assert.equal(keys.length, 2);
  assert.equal(keys[0], keys[1]);
  const direct = daemon.client("tcp");
  assert.equal((await direct.subject(s)).counter("tokens-per-day").used, 10);
  await direct.release(hold.reservationId);
  direct.close();
});

test("the caller's key is reused on retries", async () => {
  const p = await proxy(["503"]);
  const s = uniqueSubject();
  const q = new QuotadClient({ url: p.url, ...FAST });
  await q.consume({ subject: s, idempotencyKey: `mine-${s}` });
  q.close();
  assert.deepEqual(p.bodies().map((b) => b.idempotency_key), [`mine-${s}`, `mine-${s}`]);
});

test("retries are bounded; zero means one attempt", async () => {
  const p = await proxy(Array(10).fill("503"));
  const q = new QuotadClient({ url: p.url, retries: 3, ...FAST });
  await assert.rejects(q.consume({ subject: "x" }), (e) => e instanceof Unavailable && e.status === 503 && e.code === "unavailable");
  assert.equal(p.requests.length, 4);
  q.close();
  const p2 = await proxy(Array(3).fill("503"));
  const q2 = new QuotadClient({ url: p2.url, retries: 0, ...FAST });
  await assert.rejects(q2.consume({ subject: "x" }), Unavailable);
  assert.equal(p2.requests.length, 1);
  q2.close();
});

test("4xx answers are never retried", async () => {
  const p = await proxy([]);
  const q = new QuotadClient({ url: p.url, retries: 3, ...FAST });
  await assert.rejects(q.consume({ subject: "x", amounts: { nope: 1 } }), InvalidRequest);
  await assert.rejects(q.commit("rsv_missing"), NotFound);
  assert.equal(p.requests.length, 2);
  q.close();
});

test("admin write retries reuse the Idempotency-Key header", async () => {
  const p = await proxy(["503", "drop"]);
  const q = new QuotadClient({ url: p.url, retries: 2, ...FAST });
  const v = await q.setPlan(uniqueSubject(), { plan: "pro" });
  q.close();
  assert.equal(v.plan, "pro");
  const keys = p.requests.map((r) => r.headers["idempotency-key"]);
  assert.equal(keys.length, 3);
  assert.ok(keys[0]);
  assert.equal(new Set(keys).size, 1);
});

test("commit is retried", async () => {
  const direct = daemon.client("tcp");
  const hold = await direct.reserve({ subject: uniqueSubject(), amounts: { tokens: 100 } });
  direct.close();
  const p = await proxy(["503"]);
  const q = new QuotadClient({ url: p.url, ...FAST });
  const fin = await q.commit(hold.reservationId, { tokens: 40 });
  q.close();
  assert.equal(fin.status, "committed");
  assert.equal(p.requests.length, 2);
});

async function nowhere(onUnavailable) {
  const port = await freePort(); // nothing listens here
  return [
    new QuotadClient({ url: `http://127.0.0.1:${port}`, onUnavailable, retries: 1, timeoutMs: 2000, ...FAST }),
    new QuotadClient({ socketPath: path.join(os.tmpdir(), `quotad-missing-${port}.sock`), onUnavailable, retries: 1, timeoutMs: 2000, ...FAST }),
  ];
}

test("unreachable: throws Unavailable by default", async () => {
  for (const q of await nowhere("throw")) {
    await assert.rejects(q.consume({ subject: "x" }), (e) => {
      assert.ok(e instanceof Unavailable);
      assert.equal(e.status, null);
      assert.equal(e.code, "unreachable");
      assert.match(e.message, /after 2 attempts/);
      return true;
    });
    assert.equal(await q.health(), false);
    assert.equal(await q.ready(), false);
    q.close();
  }
});

test("onUnavailable allow: a fallback decision and a no-op reservation", async () => {
  for (const q of await nowhere("allow")) {
    const d = await q.consume({ subject: "x", amounts: { tokens: 5 } });
    assert.ok(d.allowed && d.fallback);
    assert.equal(d.decision, "allow");
    assert.deepEqual(d.reasons.map((r) => r.code), ["unavailable"]);
    assert.ok(d.error instanceof Unavailable);
    assert.ok((await q.check({ subject: "x" })).fallback);
    let seen;
    const v = await q.withReservation({ subject: "x", amounts: { tokens: 5 } }, (hold) => {
      seen = hold;
      assert.ok(hold.fallback);
      assert.equal(hold.reservationId, null);
      hold.actual = { tokens: 3 };
      return 7;
    });
    assert.equal(v, 7);
    assert.ok(seen.finished);
    assert.equal(seen.result, null);
    await assert.rejects(q.subject("x"), Unavailable); // non-decision calls still throw
    q.close();
  }
});

test("onUnavailable deny: a fallback denial; reserve throws Denied", async () => {
  for (const q of await nowhere("deny")) {
    const d = await q.consume({ subject: "x" });
    assert.ok(!d.allowed && d.fallback);
    assert.equal(d.decision, "deny");
    await assert.rejects(q.reserve({ subject: "x" }), (e) => e instanceof Denied && e.decision.fallback && /unavailable/.test(e.message));
    q.close();
  }
});

test("onUnavailable applies to 503 after the retries", async () => {
  const p = await proxy(Array(5).fill("503"));
  const q = new QuotadClient({ url: p.url, retries: 1, onUnavailable: "allow", ...FAST });
  const d = await q.consume({ subject: "x" });
  q.close();
  assert.ok(d.fallback && d.allowed);
  assert.equal(d.error.status, 503);
  assert.equal(p.requests.length, 2);
});

test("a stopped daemon", async () => {
  const d = await new Daemon().start();
  try {
    const q = new QuotadClient({ url: d.url, retries: 1, ...FAST });
    const closed = new QuotadClient({ url: d.url, retries: 1, onUnavailable: "deny", ...FAST });
    assert.ok((await q.consume({ subject: "x" })).allowed);
    await d.stop();
    await assert.rejects(q.consume({ subject: "x" }), Unavailable);
    assert.ok((await closed.consume({ subject: "x" })).fallback);
    q.close();
    closed.close();
  } finally {
    await d.cleanup();
  }
});

test("a commit lost to an outage is reported, not thrown, under onUnavailable allow", async () => {
  const p = await proxy(["pass", "503", "503", "503"]);
  const warnings = [];
  const q = new QuotadClient({ url: p.url, retries: 2, onUnavailable: "allow", onWarning: (m) => warnings.push(m), ...FAST });
  let seen;
  const v = await q.withReservation({ subject: uniqueSubject(), amounts: { tokens: 10 } }, (hold) => {
    seen = hold;
    return "done";
  });
  q.close();
  assert.equal(v, "done");
  assert.ok(seen.error instanceof Unavailable);
  assert.match(warnings[0], /commit of rsv_/);
  const direct = daemon.client("tcp");
  await direct.release(seen.reservationId);
  direct.close();
});

test("invalid construction", () => {
  assert.throws(() => new QuotadClient({ url: "http://127.0.0.1:1", socketPath: "/tmp/x.sock" }), TypeError);
  assert.throws(() => new QuotadClient({ onUnavailable: "maybe" }), TypeError);
  assert.throws(() => new QuotadClient({ url: "127.0.0.1:7878" }), TypeError);
  assert.throws(() => new QuotadClient({ retries: -1 }), TypeError);
});

// ---------- Server-Sent Events (scripted) ----------

test("streamEvents resumes with Last-Event-ID", async () => {
  const first =
    "sse:: keep-alive\nretry: 10\n\n" +
    sse(
      [1, "threshold.crossed", { id: "evt_1", seq: 1, type: "threshold.crossed", subject: "u", threshold: 0.8 }],
      [2, "breaker.opened", { id: "evt_2", seq: 2, type: "breaker.opened", at: "2026-11-21T10:00:00.123Z" }],
    ).slice(4);
  const second = sse([3, "breaker.closed", { seq: 3, type: "breaker.closed" }]);
  const p = await proxy([first, second], null);
  const q = new QuotadClient({ url: p.url, ...FAST });
  const got = [];
  for await (const ev of q.streamEvents()) {
    got.push(ev);
    if (got.length === 3) break;
  }
  q.close();
  assert.deepEqual(got.map((e) => e.seq), [1, 2, 3]);
  assert.deepEqual(got.map((e) => e.type), ["threshold.crossed", "breaker.opened", "breaker.closed"]);
  assert.equal(got[0].subject, "u");
  assert.equal(got[0].raw.threshold, 0.8);
  assert.equal(got[0].id, "evt_1");
  assert.equal(got[1].at.toISOString(), "2026-11-21T10:00:00.123Z");
  assert.equal(p.requests[0].headers["last-event-id"], undefined);
  assert.equal(p.requests[1].headers["last-event-id"], "2");
  assert.equal(p.requests[0].headers.accept, "text/event-stream");
});

test("streamEvents starts after lastEventId and stops when told", async () => {
  const p = await proxy([sse([8, "anomaly.detected", { seq: 8, type: "anomaly.detected" }])], null);
  const q = new QuotadClient({ url: p.url, ...FAST });
  const got = [];
  for await (const ev of q.streamEvents({ lastEventId: 7, reconnect: false })) got.push(ev.seq);
  q.close();
  assert.deepEqual(got, [8]);
  assert.equal(p.requests[0].headers["last-event-id"], "7");
});

test("streamEvents gives up after N failed reconnects", async () => {
  const p = await proxy(Array(5).fill("drop"), null);
  const q = new QuotadClient({ url: p.url, ...FAST });
  await assert.rejects(async () => {
    for await (const ev of q.streamEvents({ reconnect: 2 })) void ev;
  }, Unavailable);
  q.close();
  assert.equal(p.requests.length, 3);
});

test("streamEvents stops on abort", async () => {
  const p = await proxy([sse([1, "x", { seq: 1, type: "x" }])], null);
  const q = new QuotadClient({ url: p.url, ...FAST });
  const ac = new AbortController();
  const got = [];
  for await (const ev of q.streamEvents({ signal: ac.signal })) {
    got.push(ev.seq);
    ac.abort();
  }
  q.close();
  assert.deepEqual(got, [1]);
});
