/**
 * Typed results and requests. Every result keeps the JSON it came from in
 * `raw`, so fields a newer quotad adds are never lost. Absent values are `null`.
 */

import type { IncomingHttpHeaders } from "node:http";
import { errorFromResponse, type QuotadError } from "./errors.js";

export type JsonObject = { [key: string]: unknown };
export type Amounts = Record<string, number>;
export type Attributes = Record<string, string>;
/** An integer, or `"unlimited"`. */
export type Max = number | "unlimited";
export type Priority = "critical" | "high" | "normal" | "low";
export type Outcome = "allow" | "deny" | "degrade";

// ---------- requests ----------

export interface CheckRequest {
  subject: string;
  event?: string;
  attributes?: Attributes;
  amounts?: Amounts;
  priority?: Priority;
}

export interface ConsumeRequest extends CheckRequest {
  /** Generated when absent; the same key is sent on every retry of the call. */
  idempotencyKey?: string;
  /** Wait up to this long for capacity instead of being denied. */
  waitMs?: number;
}

export interface ReserveRequest extends ConsumeRequest {
  /** How long the hold lives unless committed or released. */
  ttlMs?: number;
}

export type BatchOperation =
  | ({ op: "check" } & CheckRequest)
  | ({ op: "consume" } & ConsumeRequest)
  | ({ op: "reserve" } & ReserveRequest)
  | { op: "commit"; reservationId: string; amounts?: Amounts }
  | { op: "release"; reservationId: string };

// ---------- results ----------

export interface Counter {
  limit: string;
  metric: string;
  scope: string;
  max: Max;
  used: number;
  /** `max - used`, never below 0; `null` when unlimited. */
  remaining: number | null;
  /** When usage next returns to zero; `null` for lifetime limits. */
  resetsAt: Date | null;
  mode: string;
  raw: JsonObject;
}

/** One entry of `GET /v1/counters`: a counter and how full it is. */
export interface FullCounter extends Counter {
  /** `used / max` (past 1 for a monitor- or degrade-mode limit). */
  fraction: number;
}

export interface Reason {
  /** `limit_exceeded`, `exceeds_capacity`, `would_deny`, `degraded`, `unmatched`, `circuit_open`, `anomaly`, `queue_full`, … and `unavailable` on a fallback. */
  code: string;
  limit: string | null;
  retryAfterMs: number | null;
  raw: JsonObject;
}

export interface Cost {
  amountMicros: number;
  currency: string | null;
  price: string | null;
  raw: JsonObject;
}

/** The answer to check, consume and reserve. */
export interface Decision {
  allowed: boolean;
  decision: Outcome | string;
  /** `decision === "degrade"`: allowed, but switch to something cheaper. */
  degraded: boolean;
  subject: string;
  plan: string | null;
  counters: Counter[];
  reasons: Reason[];
  retryAfterMs: number | null;
  replayed: boolean;
  reservationId: string | null;
  expiresAt: Date | null;
  cost: Cost | null;
  waitedMs: number | null;
  /** `X-RateLimit-Limit` */
  limit: number | null;
  /** `X-RateLimit-Remaining` */
  remaining: number | null;
  /** `X-RateLimit-Reset` (Unix seconds) */
  reset: number | null;
  /** `Retry-After` (seconds) */
  retryAfter: number | null;
  /** True for a decision made up by the client because quotad was unavailable (`onUnavailable`). */
  fallback: boolean;
  /** The error behind a fallback decision. */
  error: QuotadError | null;
  raw: JsonObject;
  /** The counter of the named limit, if it matched. */
  counter(limit: string): Counter | undefined;
}

/** The answer to a reservation's commit or release. */
export interface Finish {
  reservationId: string;
  subject: string;
  status: "committed" | "released" | string;
  expired: boolean;
  held: Amounts;
  charged: Amounts;
  counters: Counter[];
  /** What the commit charged in money, when pricing is configured. */
  cost: Cost | null;
  raw: JsonObject;
}

export interface Subject {
  subject: string;
  plan: string | null;
  assigned: boolean;
  overrides: Record<string, { max: Max } & JsonObject>;
  counters: Counter[];
  flags: JsonObject[];
  /** True when an admin write was answered from its idempotency key. */
  replayed: boolean;
  raw: JsonObject;
  counter(limit: string): Counter | undefined;
}

export interface Deleted {
  subject: string;
  deleted: boolean;
  replayed: boolean;
  raw: JsonObject;
}

export interface SubjectEntry {
  subject: string;
  plan: string | null;
  raw: JsonObject;
}

export interface SubjectPage {
  subjects: SubjectEntry[];
  /** Pass as `after` for the next page; `null` on the last one. */
  nextAfter: string | null;
  raw: JsonObject;
}

export interface Plan {
  name: string;
  default: boolean;
  unmatched: string;
  /** Limits as configured (their config keys). */
  limits: JsonObject[];
  raw: JsonObject;
}

export interface Plans {
  plans: Plan[];
  limits: JsonObject[];
  metrics: string[];
  raw: JsonObject;
}

export interface ReloadReport {
  plans: number;
  limits: number;
  tokens: number;
  restartRequired: string[];
  raw: JsonObject;
}

export interface BatchItem {
  status: number;
  ok: boolean;
  op: string | null;
  body: unknown;
  decision: Decision | null;
  finish: Finish | null;
  error: QuotadError | null;
}

export interface QuotadEvent {
  id: string | null;
  seq: number | null;
  type: string;
  at: Date | null;
  subject: string | null;
  /** Every field of the event (they depend on the type). */
  raw: JsonObject;
}

/**
 * One page of `GET /v1/events`. Oldest first (the default): pass `nextAfter`
 * as `after` for the next page. Newest first (`order: "desc"`): pass
 * `nextBefore` as `before` for the next, older page (`null` once the oldest
 * event was read); `nextAfter` is then the newest seq in the page, to follow
 * newer events from.
 */
export interface EventPage {
  events: QuotadEvent[];
  nextAfter: number | null;
  /** `order: "desc"` only: the `before` of the next (older) page; `null` at the oldest. */
  nextBefore: number | null;
  raw: JsonObject;
}

export interface Webhook {
  name: string;
  url: string | null;
  deliveredSeq: number | null;
  pending: number | null;
  lastError: string | null;
  lastAttemptAt: Date | null;
  raw: JsonObject;
}

export interface Breaker {
  name: string;
  state: "open" | "closed" | string;
  scope: string | null;
  recent: number | null;
  normal: number | null;
  openedAt: Date | null;
  reason: string | null;
  raw: JsonObject;
}

export interface Flag {
  anomaly: string;
  subject: string | null;
  since: Date | null;
  used: number | null;
  baseline: number | null;
  raw: JsonObject;
}

export interface UsageBucket {
  start: Date | null;
  amounts: Amounts;
  /** With `groupBy`: the value of that attribute (`null` for calls that did not carry it); also in `raw` under the attribute's name. `null` without `groupBy`. */
  group: string | null;
  raw: JsonObject;
}

/**
 * `GET /v1/subjects/{s}/usage`: buckets with usage (empty ones left out).
 * With `groupBy` (an attribute listed in the daemon's `history.dimensions`),
 * each bucket is split into one per value of it (`bucket.group`); the groups
 * add up to the totals.
 */
export interface Usage {
  subject: string;
  granularity: string;
  timezone: string | null;
  /** The attribute the buckets are split by, as asked; `null` without. */
  groupBy: string | null;
  buckets: UsageBucket[];
  raw: JsonObject;
  /** Sum of every bucket, per metric. */
  totals(): Amounts;
  /** With `groupBy`: the sum of every bucket per value of the attribute (key `null`: calls without it), per metric. */
  totalsByGroup(): Map<string | null, Amounts>;
}

export interface UsageRow {
  subject: string;
  start: Date | null;
  amounts: Amounts;
  /** With `groupBy`: the value of that attribute (`null` for calls that did not carry it). `null` without `groupBy`. */
  group: string | null;
  raw: JsonObject;
}

/** One JSON page of `GET /v1/usage` (billing export); pass `nextAfter` as `after` (`null` on the last page). */
export interface UsagePage {
  rows: UsageRow[];
  nextAfter: string | null;
  /** The attribute the rows are split by, as asked; `null` without. */
  groupBy: string | null;
  raw: JsonObject;
}

/** One subject of {@link TopUsage} and its amount of the metric. */
export interface TopRow {
  subject: string;
  amount: number;
  raw: JsonObject;
}

/** `GET /v1/usage/top`: the subjects with the most of `metric` in the range, most first (ties by subject); subjects with none are left out. */
export interface TopUsage {
  metric: string;
  rows: TopRow[];
  raw: JsonObject;
}

/**
 * `POST /v1/subjects/{s}/tokens`: a read-only token for one subject. Send
 * `token` as `Authorization: Bearer` (`new QuotadClient({ url, token })`): it
 * reads that subject and its usage until `expiresAt` and is refused (403)
 * everywhere else; after `expiresAt` it is 401.
 */
export interface SubjectToken {
  token: string;
  subject: string;
  expiresAt: Date | null;
  raw: JsonObject;
}

// ---------- policy as data ----------
//
// The policy documents are plain objects in the shape and names of the TOML
// file (and of the JSON quotad answers, snake_case included): what getPlan,
// getLimit and getPolicy resolve can be edited and written back as is. Every
// key is optional in what you send (quotad fills in the defaults and answers
// with them filled in), except where the server says otherwise: `name` of a
// limit inside a plan, `max`, `period` (except for lifetime limits).

/** `match = { event = "llm.*", attributes = { model = "gpt-4o" } }`: globs over the event name and attribute values. */
export interface MatchDoc {
  event?: string;
  attributes?: Record<string, string>;
}

export type Algorithm = "fixed" | "sliding" | "token_bucket" | "lifetime";
export type LimitMode = "enforce" | "monitor" | "degrade";

/** One `[[limits]]` / `[[plans.limits]]` entry. */
export interface LimitDoc {
  name?: string;
  /** Default `"requests"`. */
  metric?: string;
  /** `"subject"` (default), `"global"` or `"attribute:<name>"`. */
  scope?: string;
  /** Default `"fixed"`. */
  algorithm?: Algorithm | string;
  max?: Max;
  /** Token bucket: added per period (default: `max`). */
  refill?: number;
  /** `"1m"`, `"1h"`, `"1d"`, `"1mo"`, … */
  period?: string;
  /** IANA zone of calendar windows (default `"UTC"`). */
  timezone?: string;
  match?: MatchDoc;
  /** Default `"enforce"`. */
  mode?: LimitMode | string;
  /** Fractions of `max` whose crossing records a `threshold.crossed` event, e.g. `[0.8, 1.0]`. */
  alerts?: number[];
}

/** One `[[plans]]` entry. */
export interface PlanDoc {
  name?: string;
  default?: boolean;
  /** `"allow"` (default) or `"deny"`. */
  unmatched?: "allow" | "deny" | string;
  /** Default `"normal"`. */
  priority?: Priority | string;
  limits?: LimitDoc[];
}

/** One `[[pricing.prices]]` entry: `name`, `match`, and a price per metric as text (`input_tokens: "2.50/1M"`). */
export interface PriceDoc {
  name?: string;
  match?: MatchDoc;
  [metric: string]: unknown;
}

/** `[pricing]`. */
export interface PricingDoc {
  currency?: string;
  /** Default `"cost_micros"`. */
  metric?: string;
  /** `"reject"` (default) or `"zero"`. */
  unpriced?: "reject" | "zero" | string;
  prices?: PriceDoc[];
}

/** One `[[breakers]]` entry. */
export interface BreakerDoc {
  name?: string;
  metric?: string;
  match?: MatchDoc;
  scope?: string;
  window?: string;
  baseline?: string;
  normal_per_hour?: number;
  ratio?: number;
  min_amount?: number;
  cooldown?: string;
  pass_priority?: Priority | string;
}

/** One `[[anomalies]]` entry. */
export interface AnomalyDoc {
  name?: string;
  metric?: string;
  match?: MatchDoc;
  period?: string;
  timezone?: string;
  baseline_periods?: number;
  ratio?: number;
  min_amount?: number;
  /** `"flag"` (default), `"degrade"` or `"deny"`. */
  action?: "flag" | "degrade" | "deny" | string;
}

/** A whole policy: every section that decides. Sections left out are empty (and quotad leaves empty ones out of its answers). */
export interface PolicyDoc {
  metrics?: string[];
  pricing?: PricingDoc;
  limits?: LimitDoc[];
  plans?: PlanDoc[];
  breakers?: BreakerDoc[];
  anomalies?: AnomalyDoc[];
}

/** `GET /v1/policy`: the policy in force (or an earlier kept version). `version` is also the ETag: pass it as `ifVersion` to a write. */
export interface Policy {
  version: number;
  changedAt: Date | null;
  actor: string;
  policy: PolicyDoc;
  raw: JsonObject;
  /** A plan by name. */
  plan(name: string): PlanDoc | undefined;
  /** A top-level limit by name. */
  limit(name: string): LimitDoc | undefined;
}

/** One entry of `GET /v1/policy/versions`. */
export interface PolicyVersion {
  version: number;
  changedAt: Date | null;
  actor: string;
  raw: JsonObject;
}

/** A limit whose counters a policy change dropped: `reason` is `"removed"` or what changed (`"period 1d -> 1h"`). */
export interface CounterReset {
  limit: string;
  reason: string;
  raw: JsonObject;
}

/**
 * The answer to a policy write (putPolicy, putPlan, deletePlan, putLimit,
 * deleteLimit): the new `version` (also the ETag), the one it replaced, who
 * made it, the counters it reset, and the item now in force — `policy`, `plan`
 * or `limit`, whichever was written (`null` after a delete).
 */
export interface PolicyChange {
  version: number;
  previousVersion: number;
  changedAt: Date | null;
  actor: string;
  countersReset: CounterReset[];
  policy: PolicyDoc | null;
  plan: PlanDoc | null;
  limit: LimitDoc | null;
  /** True when answered from the idempotency key of an earlier identical write. */
  replayed: boolean;
  raw: JsonObject;
}

// ---------- parsing ----------

const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);
const str = (v: unknown): string | null => (typeof v === "string" ? v : null);
const obj = (v: unknown): JsonObject => (v && typeof v === "object" && !Array.isArray(v) ? (v as JsonObject) : {});
const objs = (v: unknown): JsonObject[] => (Array.isArray(v) ? v.filter((x) => x && typeof x === "object" && !Array.isArray(x)) : []);
const amounts = (v: unknown): Amounts => {
  const out: Amounts = {};
  for (const [k, x] of Object.entries(obj(v))) if (typeof x === "number") out[k] = x;
  return out;
};

/** Parses an RFC 3339 time; `null` for null or unparsable text (kept in `raw`). */
export function parseTime(v: unknown): Date | null {
  if (typeof v !== "string") return null;
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? null : d;
}

function header(headers: IncomingHttpHeaders | undefined, name: string): number | null {
  if (!headers) return null;
  const v = headers[name];
  const s = Array.isArray(v) ? v[0] : v;
  if (s === undefined || !/^\s*-?\d+\s*$/.test(s)) return null;
  return Number.parseInt(s, 10);
}

function findCounter(counters: Counter[]) {
  return (limit: string) => counters.find((c) => c.limit === limit);
}

export function parseCounter(d: JsonObject): Counter {
  const max = d.max;
  return {
    limit: str(d.limit) ?? "",
    metric: str(d.metric) ?? "",
    scope: str(d.scope) ?? "",
    max: typeof max === "number" ? max : "unlimited",
    used: num(d.used) ?? 0,
    remaining: num(d.remaining),
    resetsAt: parseTime(d.resets_at),
    mode: str(d.mode) ?? "enforce",
    raw: d,
  };
}

export function parseReason(d: JsonObject): Reason {
  return { code: str(d.code) ?? "", limit: str(d.limit), retryAfterMs: num(d.retry_after_ms), raw: d };
}

function parseCost(v: unknown): Cost | null {
  if (!v || typeof v !== "object" || Array.isArray(v)) return null;
  const d = v as JsonObject;
  return { amountMicros: num(d.amount_micros) ?? 0, currency: str(d.currency), price: str(d.price), raw: d };
}

export function parseDecision(d: JsonObject, headers?: IncomingHttpHeaders): Decision {
  const allowed = d.allowed === true;
  const counters = objs(d.counters).map(parseCounter);
  const decision = str(d.decision) ?? (allowed ? "allow" : "deny");
  return {
    allowed,
    decision,
    degraded: decision === "degrade",
    subject: str(d.subject) ?? "",
    plan: str(d.plan),
    counters,
    reasons: objs(d.reasons).map(parseReason),
    retryAfterMs: num(d.retry_after_ms),
    replayed: d.replayed === true,
    reservationId: str(d.reservation_id),
    expiresAt: parseTime(d.expires_at),
    cost: parseCost(d.cost),
    waitedMs: num(d.waited_ms),
    limit: header(headers, "x-ratelimit-limit"),
    remaining: header(headers, "x-ratelimit-remaining"),
    reset: header(headers, "x-ratelimit-reset"),
    retryAfter: header(headers, "retry-after"),
    fallback: false,
    error: null,
    raw: d,
    counter: findCounter(counters),
  };
}

/** The synthetic decision `onUnavailable: "allow" | "deny"` returns. */
export function fallbackDecision(subject: string, allow: boolean, error: QuotadError): Decision {
  const raw: JsonObject = {
    allowed: allow,
    decision: allow ? "allow" : "deny",
    subject,
    counters: [],
    reasons: [{ code: "unavailable" }],
    replayed: false,
    reservation_id: null,
    expires_at: null,
    fallback: true,
  };
  const d = parseDecision(raw);
  d.fallback = true;
  d.error = error;
  return d;
}

export function parseFinish(d: JsonObject): Finish {
  return {
    reservationId: str(d.reservation_id) ?? "",
    subject: str(d.subject) ?? "",
    status: str(d.status) ?? "",
    expired: d.expired === true,
    held: amounts(d.held),
    charged: amounts(d.charged),
    counters: objs(d.counters).map(parseCounter),
    cost: parseCost(d.cost),
    raw: d,
  };
}

function replayedHeader(headers?: IncomingHttpHeaders): boolean {
  const v = headers?.["idempotent-replayed"];
  return (Array.isArray(v) ? v[0] : v)?.toLowerCase() === "true";
}

export function parseSubject(d: JsonObject, headers?: IncomingHttpHeaders): Subject {
  const counters = objs(d.counters).map(parseCounter);
  const overrides: Subject["overrides"] = {};
  for (const [k, v] of Object.entries(obj(d.overrides))) {
    const o = obj(v);
    overrides[k] = { ...o, max: typeof o.max === "number" ? o.max : "unlimited" };
  }
  return {
    subject: str(d.subject) ?? "",
    plan: str(d.plan),
    assigned: d.assigned === true,
    overrides,
    counters,
    flags: objs(d.flags),
    replayed: replayedHeader(headers),
    raw: d,
    counter: findCounter(counters),
  };
}

export function parseDeleted(d: JsonObject, headers?: IncomingHttpHeaders): Deleted {
  return { subject: str(d.subject) ?? "", deleted: d.deleted === true, replayed: replayedHeader(headers), raw: d };
}

export function parseSubjectPage(d: JsonObject): SubjectPage {
  const subjects: SubjectEntry[] = [];
  for (const s of Array.isArray(d.subjects) ? d.subjects : []) {
    if (typeof s === "string") subjects.push({ subject: s, plan: null, raw: { subject: s } });
    else if (s && typeof s === "object") {
      const o = s as JsonObject;
      subjects.push({ subject: str(o.subject) ?? "", plan: str(o.plan), raw: o });
    }
  }
  return { subjects, nextAfter: str(d.next_after), raw: d };
}

export function parsePlans(d: JsonObject): Plans {
  return {
    plans: objs(d.plans).map((p) => ({
      name: str(p.name) ?? "",
      default: p.default === true,
      unmatched: str(p.unmatched) ?? "allow",
      limits: objs(p.limits),
      raw: p,
    })),
    limits: objs(d.limits),
    metrics: (Array.isArray(d.metrics) ? d.metrics : []).filter((m): m is string => typeof m === "string"),
    raw: d,
  };
}

export function parseReload(d: JsonObject): ReloadReport {
  return {
    plans: num(d.plans) ?? 0,
    limits: num(d.limits) ?? 0,
    tokens: num(d.tokens) ?? 0,
    restartRequired: (Array.isArray(d.restart_required) ? d.restart_required : []).map(String),
    raw: d,
  };
}

export function parseBatchItem(r: JsonObject, op: string | null, index: number): BatchItem {
  const status = num(r.status) ?? 0;
  const body = r.body;
  const item: BatchItem = { status, ok: status >= 200 && status < 300, op, body, decision: null, finish: null, error: null };
  if (status >= 400) {
    item.error = errorFromResponse(status, JSON.stringify(body ?? null), "POST", `/v1/batch operations[${index}]`);
  } else if (body && typeof body === "object" && !Array.isArray(body)) {
    const b = body as JsonObject;
    if ("allowed" in b) item.decision = parseDecision(b);
    else if ("status" in b && "reservation_id" in b) item.finish = parseFinish(b);
  }
  return item;
}

export function parseEvent(d: JsonObject, sseId?: string | null, sseType?: string | null): QuotadEvent {
  let seq = num(d.seq);
  if (seq === null && sseId != null && /^\d+$/.test(sseId)) seq = Number(sseId);
  const id = str(d.id) ?? (seq !== null ? `evt_${seq}` : sseId ?? null);
  return { id, seq, type: str(d.type) ?? sseType ?? "message", at: parseTime(d.at), subject: str(d.subject), raw: d };
}

export function parseEventPage(d: JsonObject): EventPage {
  return { events: objs(d.events).map((e) => parseEvent(e)), nextAfter: num(d.next_after), nextBefore: num(d.next_before), raw: d };
}

export function items(body: unknown, ...keys: string[]): JsonObject[] {
  if (Array.isArray(body)) return objs(body);
  const o = obj(body);
  for (const k of keys) if (Array.isArray(o[k])) return objs(o[k]);
  return [];
}

export function parseWebhook(d: JsonObject): Webhook {
  return {
    name: str(d.name) ?? "",
    url: str(d.url),
    deliveredSeq: num(d.delivered_seq),
    pending: num(d.pending),
    lastError: str(d.last_error),
    lastAttemptAt: parseTime(d.last_attempt_at),
    raw: d,
  };
}

export function parseBreaker(d: JsonObject): Breaker {
  return {
    name: str(d.name) ?? str(d.breaker) ?? "",
    state: str(d.state) ?? "",
    scope: str(d.scope),
    recent: num(d.recent),
    normal: num(d.normal),
    openedAt: parseTime(d.opened_at),
    reason: str(d.reason),
    raw: d,
  };
}

export function parseFlag(d: JsonObject): Flag {
  return {
    anomaly: str(d.anomaly) ?? "",
    subject: str(d.subject),
    since: parseTime(d.since),
    used: num(d.used),
    baseline: num(d.baseline),
    raw: d,
  };
}

const groupOf = (d: JsonObject, groupBy: string | null): string | null => (groupBy === null ? null : str(d[groupBy]));

export function parseUsage(d: JsonObject): Usage {
  const groupBy = str(d.group_by);
  const buckets = objs(d.buckets).map((b) => ({ start: parseTime(b.start), amounts: amounts(b.amounts), group: groupOf(b, groupBy), raw: b }));
  return {
    subject: str(d.subject) ?? "",
    granularity: str(d.granularity) ?? "",
    timezone: str(d.timezone),
    groupBy,
    buckets,
    raw: d,
    totals() {
      const out: Amounts = {};
      for (const b of buckets) for (const [k, v] of Object.entries(b.amounts)) out[k] = (out[k] ?? 0) + v;
      return out;
    },
    totalsByGroup() {
      const out = new Map<string | null, Amounts>();
      for (const b of buckets) {
        let sums = out.get(b.group);
        if (!sums) out.set(b.group, (sums = {}));
        for (const [k, v] of Object.entries(b.amounts)) sums[k] = (sums[k] ?? 0) + v;
      }
      return out;
    },
  };
}

/** `groupBy`: the attribute asked for (the answer does not name it). */
export function parseUsagePage(d: JsonObject, groupBy: string | null = null): UsagePage {
  const by = groupBy ?? str(d.group_by);
  return {
    rows: objs(d.rows).map((r) => ({
      subject: str(r.subject) ?? "",
      start: parseTime(r.start),
      amounts: amounts(r.amounts),
      group: groupOf(r, by),
      raw: r,
    })),
    nextAfter: str(d.next_after),
    groupBy: by,
    raw: d,
  };
}

export function parseFullCounter(d: JsonObject): FullCounter {
  return { ...parseCounter(d), fraction: num(d.fraction) ?? 0 };
}

export function parseTopUsage(d: JsonObject): TopUsage {
  return {
    metric: str(d.metric) ?? "",
    rows: objs(d.rows).map((r) => ({ subject: str(r.subject) ?? "", amount: num(r.amount) ?? 0, raw: r })),
    raw: d,
  };
}

export function parseSubjectToken(d: JsonObject): SubjectToken {
  return { token: str(d.token) ?? "", subject: str(d.subject) ?? "", expiresAt: parseTime(d.expires_at), raw: d };
}

const docOrNull = (v: unknown): JsonObject | null => (v && typeof v === "object" && !Array.isArray(v) ? (v as JsonObject) : null);

export function parsePolicy(d: JsonObject): Policy {
  const policy = obj(d.policy) as PolicyDoc;
  return {
    version: num(d.version) ?? 0,
    changedAt: parseTime(d.changed_at),
    actor: str(d.actor) ?? "",
    policy,
    raw: d,
    plan: (name) => (Array.isArray(policy.plans) ? policy.plans.find((p) => p && p.name === name) : undefined),
    limit: (name) => (Array.isArray(policy.limits) ? policy.limits.find((l) => l && l.name === name) : undefined),
  };
}

export function parsePolicyVersion(d: JsonObject): PolicyVersion {
  return { version: num(d.version) ?? 0, changedAt: parseTime(d.changed_at), actor: str(d.actor) ?? "", raw: d };
}

export function parsePolicyChange(d: JsonObject, headers?: IncomingHttpHeaders): PolicyChange {
  return {
    version: num(d.version) ?? 0,
    previousVersion: num(d.previous_version) ?? 0,
    changedAt: parseTime(d.changed_at),
    actor: str(d.actor) ?? "",
    countersReset: objs(d.counters_reset).map((c) => ({ limit: str(c.limit) ?? "", reason: str(c.reason) ?? "", raw: c })),
    policy: docOrNull(d.policy) as PolicyDoc | null,
    plan: docOrNull(d.plan) as PlanDoc | null,
    limit: docOrNull(d.limit) as LimitDoc | null,
    replayed: replayedHeader(headers),
    raw: d,
  };
}
