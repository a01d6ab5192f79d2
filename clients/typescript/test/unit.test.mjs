// Parsing and helpers, without a daemon.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Conflict,
  Denied,
  InvalidRequest,
  NotFound,
  PreconditionFailed,
  QuotadError,
  SSEParser,
  Unavailable,
  errorFromResponse,
  newIdempotencyKey,
  parseDecision,
  parseFinish,
  parseTime,
} from "../dist/index.js";

test("a commit's answer carries its cost", () => {
  const raw = { reservation_id: "res_1", subject: "u", status: "committed", expired: false, held: { tokens: 100 }, charged: { tokens: 40 }, counters: [] };
  const f = parseFinish({ ...raw, cost: { amount_micros: 1200, currency: "USD", price: "gpt-4o" } });
  assert.deepEqual([f.cost?.amountMicros, f.cost?.currency], [1200, "USD"]);
  assert.equal(parseFinish(raw).cost, null);
});

test("parseTime", () => {
  assert.equal(parseTime("2026-11-22T00:00:00Z").toISOString(), "2026-11-22T00:00:00.000Z");
  assert.equal(parseTime("2026-11-22T02:00:28.14Z").getUTCMilliseconds(), 140);
  assert.equal(parseTime(null), null);
  assert.equal(parseTime("soon"), null);
});

test("decisions keep new fields and read the headers", () => {
  const raw = {
    allowed: true,
    decision: "allow",
    subject: "u",
    plan: "pro",
    counters: [{ limit: "x", metric: "tokens", scope: "u", max: "unlimited", used: 5, mode: "monitor" }],
    reasons: [{ code: "would_deny", limit: "y" }],
    replayed: false,
    reservation_id: null,
    expires_at: null,
    cost: { amount_micros: 12500, currency: "USD", price: "gpt-4o" },
    waited_ms: 120,
    something_new: { a: 1 },
  };
  const d = parseDecision(raw, { "x-ratelimit-limit": "10", "x-ratelimit-remaining": "3", "x-ratelimit-reset": "99" });
  assert.deepEqual([d.cost.amountMicros, d.cost.currency, d.cost.price], [12500, "USD", "gpt-4o"]);
  assert.equal(d.waitedMs, 120);
  assert.deepEqual(d.raw.something_new, { a: 1 });
  assert.deepEqual([d.limit, d.remaining, d.reset, d.retryAfter], [10, 3, 99, null]);
  const c = d.counters[0];
  assert.deepEqual([c.max, c.remaining, c.resetsAt], ["unlimited", null, null]);
  assert.equal(d.reasons[0].retryAfterMs, null);
  assert.equal(d.counter("x"), c);
});

test("error mapping", () => {
  let e = errorFromResponse(409, Buffer.from('{"error":{"code":"reservation_finished","message":"already committed"}}'));
  assert.ok(e instanceof Conflict && e instanceof QuotadError && e instanceof Error);
  assert.equal(e.name, "Conflict");
  assert.equal(e.message, "already committed (409 reservation_finished)");
  assert.equal(e.detail, "already committed");
  e = errorFromResponse(502, "<html>bad gateway</html>");
  assert.ok(e instanceof Unavailable);
  assert.equal(e.code, "http_502");
  e = errorFromResponse(418, "");
  assert.equal(e.constructor, QuotadError);
  assert.ok(errorFromResponse(400, "{}") instanceof InvalidRequest);
  assert.ok(errorFromResponse(404, "{}") instanceof NotFound);
  e = errorFromResponse(412, '{"error":{"code":"version_mismatch","message":"the policy is at version 3, not 2"}}');
  assert.ok(e instanceof PreconditionFailed && e instanceof QuotadError);
  assert.deepEqual([e.status, e.code, e.name], [412, "version_mismatch", "PreconditionFailed"]);
});

test("Denied is not a QuotadError", () => {
  const d = parseDecision({ allowed: false, subject: "u", reasons: [{ limit: "l", code: "limit_exceeded", retry_after_ms: 5 }] });
  const e = new Denied(d);
  assert.ok(!(e instanceof QuotadError));
  assert.equal(e.retryAfterMs, null);
  assert.match(e.message, /l: limit_exceeded \(retry in 5 ms\)/);
});

test("SSE parser: fields, comments, CRLF split across chunks", () => {
  const p = new SSEParser();
  const msgs = [
    ...p.push(": comment\r\nid: 5\r\nevent: breaker.opened\r"),
    ...p.push('\ndata: {"a":\ndata: 1}\r\n\r\nretry: 3000\n\ndata:no-space\n\nid: 6\n\n'),
  ];
  assert.deepEqual(msgs, [
    { id: "5", event: "breaker.opened", data: '{"a":\n1}' },
    { id: "5", event: "message", data: "no-space" },
  ]);
  assert.equal(p.retryMs, 3000);
  assert.equal(p.lastId, "6");
});

test("idempotency keys are unique", () => {
  const keys = new Set(Array.from({ length: 1000 }, newIdempotencyKey));
  assert.equal(keys.size, 1000);
});
