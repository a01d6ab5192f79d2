/** QuotadClient: every endpoint, retries with stable idempotency keys, reservations. */

import { randomUUID } from "node:crypto";
import { StringDecoder } from "node:string_decoder";

import { Denied, QuotadError, Unavailable, errorFromResponse } from "./errors.js";
import { SSEParser } from "./sse.js";
import { Transport, TransportError, makeTarget, toTransportError, type RawResponse } from "./transport.js";
import {
  fallbackDecision,
  items,
  parseBatchItem,
  parseBreaker,
  parseDecision,
  parseDeleted,
  parseEvent,
  parseEventPage,
  parseFinish,
  parseFlag,
  parseFullCounter,
  parsePlans,
  parsePolicy,
  parsePolicyChange,
  parsePolicyVersion,
  parseReload,
  parseSubject,
  parseSubjectPage,
  parseSubjectToken,
  parseTopUsage,
  parseUsage,
  parseUsagePage,
  parseWebhook,
  type Amounts,
  type BatchItem,
  type BatchOperation,
  type Breaker,
  type CheckRequest,
  type ConsumeRequest,
  type Decision,
  type Deleted,
  type EventPage,
  type Finish,
  type Flag,
  type FullCounter,
  type JsonObject,
  type LimitDoc,
  type Max,
  type PlanDoc,
  type Plans,
  type Policy,
  type PolicyChange,
  type PolicyDoc,
  type PolicyVersion,
  type QuotadEvent,
  type ReloadReport,
  type ReserveRequest,
  type Subject,
  type SubjectEntry,
  type SubjectPage,
  type SubjectToken,
  type TopUsage,
  type Usage,
  type UsagePage,
  type UsageRow,
  type Webhook,
} from "./types.js";

export const VERSION = "0.1.0";

export type OnUnavailable = "throw" | "allow" | "deny";

export interface ClientOptions {
  /**
   * quotad over TCP, e.g. `http://127.0.0.1:7878` (the default). For a
   * cluster, every node's URL: a request one node cannot answer (connection
   * error, timeout, 502/503/504) is retried on the next.
   */
  url?: string | string[];
  /** quotad over its Unix socket, e.g. `/run/quotad/quotad.sock`. */
  socketPath?: string;
  /** Sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** Per attempt, in ms (default 5000); calls with `waitMs` get that much more. */
  timeoutMs?: number;
  /**
   * Extra attempts after a connection error, a timeout or a 502/503/504
   * (default 2, or 8 with several URLs: enough to outlast a leader election).
   * Never after other answers. consume and reserve carry an idempotency key
   * (generated unless given) that stays the same across them.
   */
  retries?: number;
  /** First backoff between attempts in ms (default 100), doubling with jitter... */
  backoffMs?: number;
  /** ...up to this (default 2000). A `Retry-After` on a 503 is honoured up to it. */
  maxBackoffMs?: number;
  /**
   * What check/consume/reserve do when quotad stays unavailable after the
   * retries: `"throw"` an {@link Unavailable} (default), or return a synthetic
   * decision with `fallback: true` that allows (`"allow"`) or denies (`"deny"`).
   */
  onUnavailable?: OnUnavailable;
  /** Extra headers on every request. */
  headers?: Record<string, string>;
  /** Told about errors the client chose not to throw (a failed commit under onUnavailable allow/deny). Default: process.emitWarning. */
  onWarning?: (message: string, error: unknown) => void;
}

export interface StreamOptions {
  /** Resume after this event seq (sent as `Last-Event-ID`). */
  lastEventId?: number | string;
  /** Reconnect when the stream drops: forever (`true`, default), never (`false`), or after at most N failures in a row. */
  reconnect?: boolean | number;
  /** Treat a connection silent for this long (ms) as dropped; default: never. */
  readTimeoutMs?: number;
  /** Only events of this type, or a prefix with `*` (`"breaker.*"`); filtered by the server. */
  type?: string;
  /** Stops the stream. */
  signal?: AbortSignal;
}

export type TimeArg = string | Date;

export interface UsageOptions {
  from?: TimeArg;
  to?: TimeArg;
  granularity?: "hour" | "day" | "month";
  timezone?: string;
  /**
   * Split each bucket per value of this attribute (one listed in the daemon's
   * `history.dimensions`, such as `"model"`); another is {@link InvalidRequest}
   * naming `group_by`.
   */
  groupBy?: string;
}

export interface UsageExportOptions {
  from?: TimeArg;
  to?: TimeArg;
  granularity?: "day" | "month";
  timezone?: string;
  /** Start after this subject; pass the previous page's `nextAfter`. */
  after?: string;
  /** Subjects per JSON page (1–1000, default 100). */
  limit?: number;
  /** Split each row per value of this attribute (`row.group`); the CSV gets a column for it. */
  groupBy?: string;
}

export interface EventsOptions {
  /** Oldest first (`"asc"`, the default) or newest first (`"desc"`). */
  order?: "asc" | "desc";
  /** Oldest first: events after this seq (pass the previous page's `nextAfter`). Not with `order: "desc"`. */
  after?: number;
  /** Newest first: events before this seq (pass the previous page's `nextBefore`); default: from the newest. Only with `order: "desc"`. */
  before?: number;
  /** 1–1000, default 100. */
  limit?: number;
  /** A type, or a prefix with `*` (`"breaker.*"`). */
  type?: string;
}

export interface UsageTopOptions {
  from?: TimeArg;
  to?: TimeArg;
  timezone?: string;
  /** Rows at most (1–1000, default 10). */
  limit?: number;
}

export interface CountersOptions {
  /** `used / max` at least this (above 0; default 0.8). */
  minFraction?: number;
  /** 1–1000, default 100. */
  limit?: number;
}

export interface SubjectTokenOptions {
  /** How long the token holds: `"1m"` to `"30d"` (default `"1h"`). */
  ttl?: string;
  /** The same in milliseconds (sent as `"<n>ms"`); give `ttl` or this. */
  ttlMs?: number;
}

/** Options of a policy write (putPolicy, putPlan, deletePlan, putLimit, deleteLimit). */
export interface PolicyWriteOptions {
  /** Apply only if this is still the version in force (sent as `If-Match: "N"`); else {@link PreconditionFailed} `version_mismatch`. */
  ifVersion?: number;
  /** Generated when absent; the same key is sent on every retry of the call. */
  idempotencyKey?: string;
}

interface Call<T> {
  method: string;
  path: string;
  query?: Record<string, string | number | undefined | null>;
  body?: unknown;
  headers?: Record<string, string>;
  retry?: boolean;
  extraTimeoutMs?: number;
  /** For a decision's fallback. */
  subject?: string;
  parse: (r: RawResponse) => T;
}

const RETRY_STATUSES = new Set([502, 503, 504]);

/** A fresh idempotency key for one logical operation. */
export function newIdempotencyKey(): string {
  return "qts-" + randomUUID().replace(/-/g, "");
}

function seg(value: string): string {
  if (typeof value !== "string" || value === "") throw new TypeError(`expected a non-empty string, got ${JSON.stringify(value)}`);
  return encodeURIComponent(value);
}

function fmtTime(v: TimeArg | undefined): string | undefined {
  if (v === undefined) return undefined;
  return v instanceof Date ? v.toISOString() : String(v);
}

function policyVersion(v: unknown, what: string): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
    throw new TypeError(`${what} must be a policy version (a whole number >= 0), got ${JSON.stringify(v)}`);
  }
  return v;
}

function doc<T>(v: T, what: string): T {
  if (!v || typeof v !== "object" || Array.isArray(v)) throw new TypeError(`${what} must be an object, got ${JSON.stringify(v)}`);
  return v;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function jsonBody(r: RawResponse): unknown {
  try {
    return JSON.parse(r.body.toString("utf8"));
  } catch {
    throw new QuotadError(`quotad answered ${r.status} with a body that is not JSON: ${JSON.stringify(r.body.toString("utf8").slice(0, 200))}`, {
      status: r.status,
      code: "bad_answer",
    });
  }
}

function jsonObject(r: RawResponse): JsonObject {
  const v = jsonBody(r);
  if (!v || typeof v !== "object" || Array.isArray(v)) {
    throw new QuotadError(`quotad answered ${r.status} with JSON that is not an object`, { status: r.status, code: "bad_answer" });
  }
  return v as JsonObject;
}

function clean(o: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined && v !== null) out[k] = v;
  return out;
}

function decisionBody(op: "check" | "consume" | "reserve", req: ReserveRequest): Record<string, unknown> {
  if (!req || typeof req.subject !== "string" || req.subject === "") {
    throw new TypeError(`subject must be a non-empty string, got ${JSON.stringify(req?.subject)}`);
  }
  const body: Record<string, unknown> = { subject: req.subject };
  if (req.event !== undefined) body.event = req.event;
  if (req.attributes !== undefined) body.attributes = req.attributes;
  if (req.amounts !== undefined) body.amounts = req.amounts;
  if (op !== "check") {
    // Generated once per logical call: every retry sends the same key.
    body.idempotency_key = req.idempotencyKey ?? newIdempotencyKey();
  } else if (req.idempotencyKey !== undefined) {
    body.idempotency_key = req.idempotencyKey;
  }
  if (req.ttlMs !== undefined) body.ttl_ms = req.ttlMs;
  if (req.priority !== undefined) body.priority = req.priority;
  if (req.waitMs !== undefined) body.wait_ms = req.waitMs;
  return body;
}

const WIRE_NAMES: Record<string, string> = {
  idempotencyKey: "idempotency_key",
  ttlMs: "ttl_ms",
  waitMs: "wait_ms",
  reservationId: "reservation_id",
};

function batchOp(o: BatchOperation, i: number): Record<string, unknown> {
  if (!o || typeof o !== "object" || !(o as { op?: unknown }).op) {
    throw new TypeError(`operations[${i}] must be an object with an "op", got ${JSON.stringify(o)}`);
  }
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) {
    if (v === undefined || v === null) continue;
    out[WIRE_NAMES[k] ?? k] = v;
  }
  if ((out.op === "consume" || out.op === "reserve") && !out.idempotency_key) out.idempotency_key = newIdempotencyKey();
  return out;
}

/**
 * A hold made by {@link QuotadClient.reserve} (a denied reserve throws
 * {@link Denied} instead). Finish it with {@link commit} or {@link release};
 * finishing twice returns the first answer. A fallback reservation (quotad
 * unavailable, `onUnavailable: "allow"`) holds nothing: commit/release resolve `null`.
 */
export class Reservation {
  readonly decision: Decision;
  readonly reservationId: string | null;
  readonly expiresAt: Date | null;
  /** What was asked for (`requests` defaults to 1 on the server). */
  readonly held: Amounts;
  /** The actual usage to commit; `null`: what was held. Metrics left out keep what was held. */
  actual: Amounts | null = null;
  /** The commit or release answer, once finished. */
  result: Finish | null = null;
  /** An error the client chose not to throw (see `onUnavailable`). */
  error: QuotadError | null = null;
  #client: QuotadClient;
  #finishing: Promise<Finish | null> | null = null;

  constructor(client: QuotadClient, decision: Decision, held: Amounts | undefined) {
    this.#client = client;
    this.decision = decision;
    this.reservationId = decision.reservationId;
    this.expiresAt = decision.expiresAt;
    this.held = { ...(held ?? {}) };
  }

  get fallback(): boolean {
    return this.decision.fallback;
  }

  get degraded(): boolean {
    return this.decision.degraded;
  }

  get finished(): boolean {
    return this.#finishing !== null;
  }

  /** Commits `amounts`, else {@link actual}, else what was held. */
  async commit(amounts?: Amounts): Promise<Finish | null> {
    if (this.#finishing) return this.#finishing;
    const use = amounts ?? this.actual ?? undefined;
    this.#finishing = this.#finish(() => this.#client.commit(this.reservationId!, use));
    return this.#finishing;
  }

  /** Gives the whole hold back. */
  async release(): Promise<Finish | null> {
    if (this.#finishing) return this.#finishing;
    this.#finishing = this.#finish(() => this.#client.release(this.reservationId!));
    return this.#finishing;
  }

  async #finish(run: () => Promise<Finish>): Promise<Finish | null> {
    if (this.fallback || this.reservationId === null) return null;
    this.result = await run();
    return this.result;
  }
}

export class QuotadClient {
  readonly onUnavailable: OnUnavailable;
  readonly retries: number;
  readonly #transports: Transport[];
  #current = 0;
  readonly #headers: Record<string, string>;
  readonly #timeoutMs: number;
  readonly #backoffMs: number;
  readonly #maxBackoffMs: number;
  readonly #warn: (message: string, error: unknown) => void;

  constructor(options: ClientOptions = {}) {
    const urls = Array.isArray(options.url) ? options.url : [options.url];
    if (urls.length === 0) throw new TypeError("url is an empty list; give one URL, or several (the nodes of a cluster)");
    this.#transports = urls.map((u) => new Transport(makeTarget(u, options.socketPath)));
    const onUnavailable = options.onUnavailable ?? "throw";
    if (!["throw", "allow", "deny"].includes(onUnavailable)) {
      throw new TypeError(`onUnavailable must be "throw", "allow" or "deny", got ${JSON.stringify(onUnavailable)}`);
    }
    const retries = options.retries ?? (this.#transports.length > 1 ? 8 : 2);
    if (!Number.isInteger(retries) || retries < 0) throw new TypeError(`retries must be a whole number >= 0, got ${retries}`);
    this.onUnavailable = onUnavailable;
    this.retries = retries;
    this.#timeoutMs = options.timeoutMs ?? 5000;
    this.#backoffMs = options.backoffMs ?? 100;
    this.#maxBackoffMs = options.maxBackoffMs ?? 2000;
    this.#headers = { "User-Agent": `quotad-node/${VERSION}`, Accept: "application/json", ...(options.headers ?? {}) };
    if (options.token) this.#headers.Authorization = `Bearer ${options.token}`;
    this.#warn = options.onWarning ?? ((message) => process.emitWarning(message, { code: "QUOTAD" }));
  }

  /** Where this client talks to: the URL (or URLs), or `unix:<path>`. */
  get where(): string {
    return this.#transports.map((t) => t.target.where).join(" or ");
  }

  /** Closes pooled connections. */
  close(): void {
    for (const t of this.#transports) t.close();
  }

  /** The endpoint requests go to now. */
  get #transport(): Transport {
    return this.#transports[this.#current % this.#transports.length];
  }

  /** The current endpoint did not answer: the next one is tried. */
  #nextEndpoint(): void {
    if (this.#transports.length > 1) this.#current = (this.#current + 1) % this.#transports.length;
  }

  // ---------- plumbing ----------

  #delay(attempt: number, retryAfter?: string | string[]): number {
    const ra = Array.isArray(retryAfter) ? retryAfter[0] : retryAfter;
    if (ra !== undefined && /^\s*\d+(\.\d+)?\s*$/.test(ra)) return Math.min(Number(ra) * 1000, this.#maxBackoffMs);
    const d = Math.min(this.#maxBackoffMs, this.#backoffMs * 2 ** attempt);
    return d / 2 + Math.random() * (d / 2);
  }

  #unavailable(e: TransportError, call: { method: string; path: string }, attempts: number): Unavailable {
    const what = e.timeout ? "timed out" : "cannot reach quotad";
    return new Unavailable(`${what} at ${this.where}: ${e.message} after ${attempts} attempt${attempts === 1 ? "" : "s"}`, {
      status: null,
      code: e.timeout ? "timeout" : "unreachable",
      method: call.method,
      path: call.path,
      cause: e,
    });
  }

  #pathWithQuery(call: Call<unknown>): string {
    if (!call.query) return call.path;
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(call.query)) if (v !== undefined && v !== null) q.set(k, String(v));
    const s = q.toString();
    return s ? `${call.path}?${s}` : call.path;
  }

  async #send(call: Call<unknown>): Promise<RawResponse> {
    const headers: Record<string, string> = { ...this.#headers, ...(call.headers ?? {}) };
    let body: Buffer | null = null;
    if (call.body !== undefined) {
      body = Buffer.from(JSON.stringify(call.body), "utf8");
      headers["Content-Type"] = "application/json";
    }
    const path = this.#pathWithQuery(call);
    const timeout = this.#timeoutMs > 0 ? this.#timeoutMs + (call.extraTimeoutMs ?? 0) : 0;
    const retry = call.retry ?? true;
    for (let attempt = 0; ; attempt++) {
      let res: RawResponse;
      try {
        res = await this.#transport.request(call.method, path, headers, body, timeout);
      } catch (e) {
        const te = toTransportError(e);
        if (retry && attempt < this.retries) {
          this.#nextEndpoint();
          await sleep(this.#delay(attempt));
          continue;
        }
        throw this.#unavailable(te, call, attempt + 1);
      }
      if (RETRY_STATUSES.has(res.status) && retry && attempt < this.retries) {
        this.#nextEndpoint();
        await sleep(this.#delay(attempt, res.headers["retry-after"]));
        continue;
      }
      return res;
    }
  }

  async #call<T>(call: Call<T>): Promise<T> {
    const res = await this.#send(call);
    if (res.status >= 400) throw errorFromResponse(res.status, res.body, call.method, call.path);
    return call.parse(res);
  }

  async #decide(call: Call<Decision>): Promise<Decision> {
    try {
      return await this.#call(call);
    } catch (e) {
      if (e instanceof Unavailable && this.onUnavailable !== "throw" && call.subject !== undefined) {
        return fallbackDecision(call.subject, this.onUnavailable === "allow", e);
      }
      throw e;
    }
  }

  #keyHeader(key?: string): Record<string, string> {
    return { "Idempotency-Key": key ?? newIdempotencyKey() };
  }

  /** Any endpoint, with this client's auth, retries and error mapping; resolves the decoded JSON (or text). */
  async request(method: string, path: string, options: { json?: unknown; query?: Record<string, string | number | undefined> } = {}): Promise<unknown> {
    return this.#call({
      method: method.toUpperCase(),
      path,
      query: options.query,
      body: options.json,
      parse: (r) => {
        const ct = String(r.headers["content-type"] ?? "");
        return ct.includes("json") ? jsonBody(r) : r.body.toString("utf8");
      },
    });
  }

  // ---------- decisions ----------

  #decision(op: "check" | "consume" | "reserve", req: ReserveRequest): Call<Decision> {
    return {
      method: "POST",
      path: `/v1/${op}`,
      body: decisionBody(op, req),
      extraTimeoutMs: req.waitMs ?? 0,
      subject: req.subject,
      parse: (r) => parseDecision(jsonObject(r), r.headers),
    };
  }

  /** Would this call be allowed? Changes nothing. */
  async check(req: CheckRequest): Promise<Decision> {
    return this.#decide(this.#decision("check", req));
  }

  /** Checks every matching limit and, when allowed, charges them all. A denial resolves (`allowed: false`). */
  async consume(req: ConsumeRequest): Promise<Decision> {
    return this.#decide(this.#decision("consume", req));
  }

  /** Holds `amounts` until commit/release (or `ttlMs`). Rejects with {@link Denied} when denied. */
  async reserve(req: ReserveRequest): Promise<Reservation> {
    const d = await this.#decide(this.#decision("reserve", req));
    if (!d.allowed) throw new Denied(d);
    return new Reservation(this, d, req.amounts);
  }

  /**
   * Reserves, runs `fn(hold)`, then commits `hold.actual` (default: what was
   * held) and resolves `fn`'s value. If `fn` throws, the hold is released and
   * the error rethrown. A denied reserve rejects with {@link Denied} and `fn`
   * does not run.
   */
  async withReservation<T>(req: ReserveRequest, fn: (hold: Reservation) => Promise<T> | T): Promise<T> {
    const hold = await this.reserve(req);
    let value: T;
    try {
      value = await fn(hold);
    } catch (e) {
      if (!hold.finished) {
        try {
          await hold.release();
        } catch (re) {
          if (re instanceof QuotadError) hold.error = re;
          this.#warn(`quotad: release of ${hold.reservationId} failed, the hold will expire: ${(re as Error).message}`, re);
        }
      }
      throw e;
    }
    if (!hold.finished) {
      try {
        await hold.commit();
      } catch (e) {
        if (!(e instanceof Unavailable) || this.onUnavailable === "throw") throw e;
        hold.error = e;
        this.#warn(`quotad: commit of ${hold.reservationId} failed, the hold will expire: ${e.message}`, e);
      }
    }
    return value;
  }

  /** Charges the actual usage of a hold (default: what was held). */
  async commit(reservationId: string, amounts?: Amounts): Promise<Finish> {
    return this.#call({
      method: "POST",
      path: `/v1/reservations/${seg(reservationId)}/commit`,
      body: amounts !== undefined ? { amounts } : {},
      parse: (r) => parseFinish(jsonObject(r)),
    });
  }

  /** Gives a hold back. */
  async release(reservationId: string): Promise<Finish> {
    return this.#call({
      method: "POST",
      path: `/v1/reservations/${seg(reservationId)}/release`,
      body: {},
      parse: (r) => parseFinish(jsonObject(r)),
    });
  }

  /** Up to 1000 operations in one request, each answered as its single call would be. consume/reserve operations without a key get one. */
  async batch(operations: BatchOperation[]): Promise<BatchItem[]> {
    const ops = operations.map(batchOp);
    if (ops.length === 0) throw new TypeError("a batch needs at least one operation");
    return this.#call({
      method: "POST",
      path: "/v1/batch",
      body: { operations: ops },
      parse: (r) => {
        const results = jsonObject(r).results;
        return (Array.isArray(results) ? results : []).map((x, i) =>
          parseBatchItem((x ?? {}) as JsonObject, typeof ops[i]?.op === "string" ? (ops[i]!.op as string) : null, i),
        );
      },
    });
  }

  // ---------- subjects and administration ----------

  async subject(subject: string): Promise<Subject> {
    return this.#call({ method: "GET", path: `/v1/subjects/${seg(subject)}`, parse: (r) => parseSubject(jsonObject(r), r.headers) });
  }

  /** Assigns a plan and/or overrides (`{"tokens-per-day": 500000}` or `{"tokens-per-day": {max: 500000}}`); fields left out are kept. */
  async setPlan(subject: string, options: { plan?: string; overrides?: Record<string, Max | { max: Max }>; idempotencyKey?: string } = {}): Promise<Subject> {
    const body: Record<string, unknown> = {};
    if (options.plan !== undefined) body.plan = options.plan;
    if (options.overrides !== undefined) {
      const o: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(options.overrides)) o[k] = typeof v === "object" && v !== null ? v : { max: v };
      body.overrides = o;
    }
    return this.#call({
      method: "PUT",
      path: `/v1/subjects/${seg(subject)}`,
      body,
      headers: this.#keyHeader(options.idempotencyKey),
      parse: (r) => parseSubject(jsonObject(r), r.headers),
    });
  }

  async deleteSubject(subject: string, options: { idempotencyKey?: string } = {}): Promise<Deleted> {
    return this.#call({
      method: "DELETE",
      path: `/v1/subjects/${seg(subject)}`,
      headers: this.#keyHeader(options.idempotencyKey),
      parse: (r) => parseDeleted(jsonObject(r), r.headers),
    });
  }

  /** Zeroes one limit's counters for the subject (`limit`), or all of them. */
  async reset(subject: string, options: { limit?: string; idempotencyKey?: string } = {}): Promise<Subject> {
    return this.#call({
      method: "POST",
      path: `/v1/subjects/${seg(subject)}/reset`,
      body: clean({ limit: options.limit }),
      headers: this.#keyHeader(options.idempotencyKey),
      parse: (r) => parseSubject(jsonObject(r), r.headers),
    });
  }

  /** Gives back `amount` of a limit (a top-up of a lifetime limit). */
  async credit(subject: string, limit: string, amount: number, options: { idempotencyKey?: string } = {}): Promise<Subject> {
    return this.#call({
      method: "POST",
      path: `/v1/subjects/${seg(subject)}/credit`,
      body: { limit, amount },
      headers: this.#keyHeader(options.idempotencyKey),
      parse: (r) => parseSubject(jsonObject(r), r.headers),
    });
  }

  /** One page of subjects in byte order (admin). */
  async subjects(options: { after?: string; limit?: number } = {}): Promise<SubjectPage> {
    return this.#call({
      method: "GET",
      path: "/v1/subjects",
      query: { after: options.after, limit: options.limit },
      parse: (r) => parseSubjectPage(jsonObject(r)),
    });
  }

  /** Every subject, page after page. */
  async *iterSubjects(options: { after?: string; pageSize?: number } = {}): AsyncGenerator<SubjectEntry> {
    let after = options.after;
    for (;;) {
      const page = await this.subjects({ after, limit: options.pageSize ?? 100 });
      yield* page.subjects;
      if (page.nextAfter === null || page.subjects.length === 0 || page.nextAfter === after) return;
      after = page.nextAfter;
    }
  }

  /**
   * A read-only token for `subject` alone (admin), for a page where an end
   * user sees their own usage: hand `token` to their browser (or
   * `new QuotadClient({ url, token })`). It reads {@link subject} and
   * {@link usage} of that subject until `expiresAt`; anything else with it is
   * {@link Forbidden}, and after `expiresAt` {@link Unauthorized}.
   */
  async mintSubjectToken(subject: string, options: SubjectTokenOptions = {}): Promise<SubjectToken> {
    if (options.ttl !== undefined && options.ttlMs !== undefined) throw new TypeError("give ttl or ttlMs, not both");
    let ttl = options.ttl;
    if (options.ttlMs !== undefined) {
      if (!Number.isSafeInteger(options.ttlMs) || options.ttlMs <= 0) throw new TypeError(`ttlMs must be a whole number above 0, got ${options.ttlMs}`);
      ttl = `${options.ttlMs}ms`;
    }
    return this.#call({
      method: "POST",
      path: `/v1/subjects/${seg(subject)}/tokens`,
      body: clean({ ttl }),
      parse: (r) => parseSubjectToken(jsonObject(r)),
    });
  }

  /**
   * The counters whose usage is at least `minFraction` of their max (default
   * 0.8), fullest first, then by scope and limit, at most `limit` (admin):
   * subjects' counters and global and attribute ones. Unlimited limits and
   * limits of 0 are not listed.
   */
  async counters(options: CountersOptions = {}): Promise<FullCounter[]> {
    return this.#call({
      method: "GET",
      path: "/v1/counters",
      query: { min_fraction: options.minFraction, limit: options.limit },
      parse: (r) => items(jsonBody(r), "counters").map(parseFullCounter),
    });
  }

  async plans(): Promise<Plans> {
    return this.#call({ method: "GET", path: "/v1/plans", parse: (r) => parsePlans(jsonObject(r)) });
  }

  /** Re-reads the daemon's config file (admin). */
  async reload(): Promise<ReloadReport> {
    return this.#call({ method: "POST", path: "/v1/admin/reload", parse: (r) => parseReload(jsonObject(r)) });
  }

  /** A hash of the logical state (admin). */
  async digest(): Promise<JsonObject> {
    return this.#call({ method: "GET", path: "/v1/admin/digest", parse: jsonObject });
  }

  /** True when the process answers `/healthz`; false otherwise, also when unreachable. */
  async health(): Promise<boolean> {
    return this.#probe("/healthz");
  }

  /** True once recovery has finished (`/readyz` 200); false while recovering, shutting down, or unreachable. */
  async ready(): Promise<boolean> {
    return this.#probe("/readyz");
  }

  async #probe(path: string): Promise<boolean> {
    try {
      return (await this.#send({ method: "GET", path, retry: false, parse: () => null })).status === 200;
    } catch (e) {
      if (e instanceof Unavailable) return false;
      throw e;
    }
  }

  /** Resolves once {@link ready}, or rejects with {@link Unavailable} after `timeoutMs`. */
  async waitReady(timeoutMs = 30000, intervalMs = 50): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!(await this.ready())) {
      if (Date.now() >= deadline) throw new Unavailable(`quotad at ${this.where} was not ready within ${timeoutMs} ms`, { code: "not_ready" });
      await sleep(intervalMs);
    }
  }

  /** The Prometheus/OpenMetrics text. */
  async metrics(): Promise<string> {
    return this.#call({
      method: "GET",
      path: "/metrics",
      headers: { Accept: "text/plain, application/openmetrics-text" },
      parse: (r) => r.body.toString("utf8"),
    });
  }

  // ---------- policy as data ----------

  #writeHeaders(options: PolicyWriteOptions): Record<string, string> {
    const h = this.#keyHeader(options.idempotencyKey);
    if (options.ifVersion !== undefined) h["If-Match"] = `"${policyVersion(options.ifVersion, "ifVersion")}"`;
    return h;
  }

  #policyWrite(method: "PUT" | "DELETE", path: string, body: unknown, options: PolicyWriteOptions): Promise<PolicyChange> {
    return this.#call({
      method,
      path,
      body,
      headers: this.#writeHeaders(options),
      parse: (r) => parsePolicyChange(jsonObject(r), r.headers),
    });
  }

  /**
   * The policy in force, its version and who made it (admin); with `version`,
   * an earlier version still kept (else {@link NotFound} `unknown_version`).
   */
  async getPolicy(options: { version?: number } = {}): Promise<Policy> {
    const version = options.version !== undefined ? policyVersion(options.version, "version") : undefined;
    return this.#call({ method: "GET", path: "/v1/policy", query: { version }, parse: (r) => parsePolicy(jsonObject(r)) });
  }

  /**
   * Replaces the whole policy (admin; `[policy] source = "api"`). A policy that
   * does not compile rejects with {@link InvalidRequest} `invalid_policy`
   * naming the path, and changes nothing.
   */
  async putPolicy(policy: PolicyDoc, options: PolicyWriteOptions = {}): Promise<PolicyChange> {
    return this.#policyWrite("PUT", "/v1/policy", { policy: doc(policy, "policy") }, options);
  }

  /** The kept policy versions, newest first (admin). */
  async listPolicyVersions(): Promise<PolicyVersion[]> {
    return this.#call({ method: "GET", path: "/v1/policy/versions", parse: (r) => items(jsonBody(r), "versions").map(parsePolicyVersion) });
  }

  /** One plan as written (an object that can be edited and passed back to {@link putPlan}); {@link NotFound} `unknown_plan`. */
  async getPlan(name: string): Promise<PlanDoc> {
    return this.#call({ method: "GET", path: `/v1/plans/${seg(name)}`, parse: (r) => jsonObject(r) as PlanDoc });
  }

  /** Creates or replaces one plan (admin). `plan.name` may be left out; if given it must equal `name`. */
  async putPlan(name: string, plan: PlanDoc, options: PolicyWriteOptions = {}): Promise<PolicyChange> {
    return this.#policyWrite("PUT", `/v1/plans/${seg(name)}`, doc(plan, "plan"), options);
  }

  /** Removes one plan (admin); {@link Conflict} `plan_in_use` while subjects are assigned to it or it is the default plan. */
  async deletePlan(name: string, options: PolicyWriteOptions = {}): Promise<PolicyChange> {
    return this.#policyWrite("DELETE", `/v1/plans/${seg(name)}`, undefined, options);
  }

  /** One top-level limit as written; {@link NotFound} `unknown_limit`. */
  async getLimit(name: string): Promise<LimitDoc> {
    return this.#call({ method: "GET", path: `/v1/limits/${seg(name)}`, parse: (r) => jsonObject(r) as LimitDoc });
  }

  /** Creates or replaces one top-level limit (admin). */
  async putLimit(name: string, limit: LimitDoc, options: PolicyWriteOptions = {}): Promise<PolicyChange> {
    return this.#policyWrite("PUT", `/v1/limits/${seg(name)}`, doc(limit, "limit"), options);
  }

  /** Removes one top-level limit and its counters (admin). */
  async deleteLimit(name: string, options: PolicyWriteOptions = {}): Promise<PolicyChange> {
    return this.#policyWrite("DELETE", `/v1/limits/${seg(name)}`, undefined, options);
  }

  // ---------- events, breakers, anomalies ----------

  /**
   * One page of recorded events (admin): oldest first after `after`; or with
   * `order: "desc"`, newest first before `before` (default: the newest), paged
   * back with the page's `nextBefore`. `before` without `order: "desc"`, or
   * `after` with it, is {@link InvalidRequest}. `type` is a type or a prefix with `*`.
   */
  async events(options: EventsOptions = {}): Promise<EventPage> {
    if (options.order !== undefined && options.order !== "asc" && options.order !== "desc") {
      throw new TypeError(`order must be "asc" or "desc", got ${JSON.stringify(options.order)}`);
    }
    return this.#call({
      method: "GET",
      path: "/v1/events",
      query: { after: options.after, before: options.before, limit: options.limit, type: options.type, order: options.order },
      parse: (r) => parseEventPage(jsonObject(r)),
    });
  }

  /**
   * Every recorded event, page after page: oldest first after `after`; or with
   * `order: "desc"`, newest first from before `before` (default: the newest)
   * back to the oldest.
   */
  async *iterEvents(options: Omit<EventsOptions, "limit"> & { pageSize?: number } = {}): AsyncGenerator<QuotadEvent> {
    const { pageSize, ...rest } = options;
    const limit = pageSize ?? 1000;
    if (rest.order === "desc") {
      let before = rest.before;
      for (;;) {
        const page = await this.events({ ...rest, before, limit });
        yield* page.events;
        // A page may be empty (a filter that matched nothing in what was scanned): go on while nextBefore moves back.
        if (page.nextBefore === null || (before !== undefined && page.nextBefore >= before)) return;
        before = page.nextBefore;
      }
    }
    let after = rest.after;
    for (;;) {
      const page = await this.events({ ...rest, after, limit });
      yield* page.events;
      if (page.nextAfter === null || page.events.length === 0 || page.nextAfter === after) return;
      after = page.nextAfter;
    }
  }

  /**
   * Live events over Server-Sent Events (admin). When the connection drops it
   * reconnects with `Last-Event-ID` set to the last event received, so nothing
   * is missed or repeated. 4xx answers reject at once. `break` out of the loop
   * (or abort `signal`) to disconnect.
   */
  async *streamEvents(options: StreamOptions = {}): AsyncGenerator<QuotadEvent> {
    let last = options.lastEventId !== undefined ? String(options.lastEventId) : null;
    const r = options.reconnect ?? true;
    const limit = r === true ? null : r === false ? 0 : Math.max(0, Math.floor(r));
    const query = options.type ? `?type=${encodeURIComponent(options.type)}` : "";
    const call = { method: "GET", path: `/v1/events/stream${query}` };
    const signal = options.signal;
    let failures = 0;
    while (!signal?.aborted) {
      let error: QuotadError | null = null;
      let gotAny = false;
      let delayHint: number | null = null;
      let close: (() => void) | null = null;
      let idleError: (() => TransportError | null) | null = null;
      const onAbort = () => close?.();
      signal?.addEventListener("abort", onAbort, { once: true });
      try {
        const headers: Record<string, string> = { ...this.#headers, Accept: "text/event-stream", "Cache-Control": "no-cache" };
        if (last !== null) headers["Last-Event-ID"] = last;
        const opened = await this.#transport.open(call.path, headers, this.#timeoutMs, options.readTimeoutMs ?? 0);
        close = opened.close;
        idleError = opened.idleError;
        const res = opened.res;
        const status = res.statusCode ?? 0;
        if (status >= 400) {
          const chunks: Buffer[] = [];
          for await (const c of res) chunks.push(c as Buffer);
          error = errorFromResponse(status, Buffer.concat(chunks), call.method, call.path);
          if (!RETRY_STATUSES.has(status)) throw error;
        } else {
          const parser = new SSEParser(last);
          const decoder = new StringDecoder("utf8");
          for await (const chunk of res) {
            for (const msg of parser.push(decoder.write(chunk as Buffer))) {
              last = parser.lastId;
              gotAny = true;
              failures = 0;
              let data: unknown;
              try {
                data = JSON.parse(msg.data);
              } catch {
                data = null;
              }
              const obj = data && typeof data === "object" && !Array.isArray(data) ? (data as JsonObject) : { data: msg.data };
              yield parseEvent(obj, msg.id, msg.event !== "message" ? msg.event : null);
              if (signal?.aborted) return;
            }
            if (parser.retryMs !== null) delayHint = parser.retryMs;
          }
          for (const msg of parser.push(decoder.end() + "\n")) {
            void msg; // an unterminated message at the end of the stream is dropped, as EventSource does
          }
          last = parser.lastId;
        }
      } catch (e) {
        if (e instanceof QuotadError) throw e;
        if (signal?.aborted) return;
        error = this.#unavailable(idleError?.() ?? toTransportError(e), call, failures + 1);
      } finally {
        signal?.removeEventListener("abort", onAbort);
        close?.();
      }
      if (signal?.aborted) return;
      if (limit === 0) {
        if (error) throw error;
        return;
      }
      if (!gotAny) failures++;
      if (limit !== null && failures > limit) {
        if (error) throw error;
        return;
      }
      await sleep(delayHint !== null ? Math.min(delayHint, this.#maxBackoffMs) : this.#delay(Math.max(failures - 1, 0)));
    }
  }

  /** Each webhook's delivery state (admin). */
  async webhooks(): Promise<Webhook[]> {
    return this.#call({ method: "GET", path: "/v1/webhooks", parse: (r) => items(jsonBody(r), "webhooks").map(parseWebhook) });
  }

  /** Each circuit breaker (and scope value) and its state. */
  async breakers(): Promise<Breaker[]> {
    return this.#call({ method: "GET", path: "/v1/breakers", parse: (r) => items(jsonBody(r), "breakers").map(parseBreaker) });
  }

  #breaker(name: string, action: "open" | "close", options: { scope?: string; idempotencyKey?: string }): Promise<Breaker> {
    return this.#call({
      method: "POST",
      path: `/v1/breakers/${seg(name)}/${action}`,
      body: clean({ scope: options.scope }),
      headers: this.#keyHeader(options.idempotencyKey),
      parse: (r) => {
        let body = jsonBody(r) as JsonObject;
        if (body && typeof body.breaker === "object" && body.breaker) body = body.breaker as JsonObject;
        else if (body && Array.isArray(body.breakers) && body.breakers.length) body = body.breakers[0] as JsonObject;
        const b = parseBreaker(body && typeof body === "object" ? body : {});
        if (!b.name) b.name = name;
        return b;
      },
    });
  }

  /** Trips a breaker by hand (the kill switch; admin). `scope` picks the value of a per-attribute breaker (`"model=gpt-4o"`). */
  async openBreaker(name: string, options: { scope?: string; idempotencyKey?: string } = {}): Promise<Breaker> {
    return this.#breaker(name, "open", options);
  }

  /** Resets a breaker by hand (admin). */
  async closeBreaker(name: string, options: { scope?: string; idempotencyKey?: string } = {}): Promise<Breaker> {
    return this.#breaker(name, "close", options);
  }

  /** Current anomaly flags. */
  async anomalies(): Promise<Flag[]> {
    return this.#call({ method: "GET", path: "/v1/anomalies", parse: (r) => items(jsonBody(r), "flags", "anomalies").map(parseFlag) });
  }

  /** Clears one anomaly flag of a subject (admin). */
  async clearFlag(subject: string, anomaly: string, options: { idempotencyKey?: string } = {}): Promise<Subject> {
    return this.#call({
      method: "DELETE",
      path: `/v1/subjects/${seg(subject)}/flags/${seg(anomaly)}`,
      headers: this.#keyHeader(options.idempotencyKey),
      parse: (r) => parseSubject(r.body.length ? jsonObject(r) : { subject }, r.headers),
    });
  }

  // ---------- usage history ----------

  /**
   * A subject's usage buckets (`to` exclusive; Dates or `YYYY-MM-DD` / RFC 3339
   * text). `groupBy` (an attribute in the daemon's `history.dimensions`, such
   * as `"model"`) splits each bucket per value of it (`bucket.group`). A
   * subject token of that subject may call this too.
   */
  async usage(subject: string, options: UsageOptions = {}): Promise<Usage> {
    return this.#call({
      method: "GET",
      path: `/v1/subjects/${seg(subject)}/usage`,
      query: {
        from: fmtTime(options.from),
        to: fmtTime(options.to),
        granularity: options.granularity,
        timezone: options.timezone,
        group_by: options.groupBy,
      },
      parse: (r) => parseUsage(jsonObject(r)),
    });
  }

  /**
   * Every subject's usage for billing (admin): a JSON page (`limit` subjects
   * after `after`), or with `format: "csv"` the CSV text
   * (`subject,start,metric,amount`). With `groupBy` (such as `"model"`) each
   * row carries the value of that attribute (`row.group`) and the CSV has a
   * column for it (`subject,start,model,metric,amount`).
   */
  usageExport(options?: UsageExportOptions & { format?: "json" }): Promise<UsagePage>;
  usageExport(options: UsageExportOptions & { format: "csv" }): Promise<string>;
  async usageExport(options: UsageExportOptions & { format?: "json" | "csv" } = {}): Promise<UsagePage | string> {
    const format = options.format ?? "json";
    if (format !== "json" && format !== "csv") throw new TypeError(`format must be "json" or "csv", got ${JSON.stringify(format)}`);
    const query = {
      from: fmtTime(options.from),
      to: fmtTime(options.to),
      granularity: options.granularity,
      timezone: options.timezone,
      format,
      after: options.after,
      limit: options.limit,
      group_by: options.groupBy,
    };
    if (format === "csv") {
      return this.#call({ method: "GET", path: "/v1/usage", query, headers: { Accept: "text/csv" }, parse: (r) => r.body.toString("utf8") });
    }
    return this.#call({ method: "GET", path: "/v1/usage", query, parse: (r) => parseUsagePage(jsonObject(r), options.groupBy ?? null) });
  }

  /** Every row of the JSON billing export, page after page (`pageSize` subjects a page). */
  async *iterUsageExport(options: Omit<UsageExportOptions, "after" | "limit"> & { pageSize?: number } = {}): AsyncGenerator<UsageRow> {
    const { pageSize, ...rest } = options;
    let after: string | undefined;
    for (;;) {
      const page = await this.usageExport({ ...rest, after, limit: pageSize, format: "json" });
      yield* page.rows;
      if (page.nextAfter === null || page.rows.length === 0 || page.nextAfter === after) return;
      after = page.nextAfter;
    }
  }

  /**
   * The `limit` (1–1000, default 10) subjects with the most of `metric` in
   * `[from, to)`, most first, ties by subject (admin). Exact: the amounts are
   * those {@link usageExport} would sum for each subject. Shares
   * `history.max_exports` with CSV exports ({@link Unavailable} `busy` when all
   * are taken).
   */
  async usageTop(metric: string, options: UsageTopOptions = {}): Promise<TopUsage> {
    if (typeof metric !== "string" || metric === "") throw new TypeError(`metric must be a non-empty string, got ${JSON.stringify(metric)}`);
    return this.#call({
      method: "GET",
      path: "/v1/usage/top",
      query: { metric, from: fmtTime(options.from), to: fmtTime(options.to), timezone: options.timezone, limit: options.limit },
      parse: (r) => parseTopUsage(jsonObject(r)),
    });
  }

  /** The OpenAPI document the daemon serves. */
  async openapi(): Promise<JsonObject> {
    return this.#call({ method: "GET", path: "/v1/openapi.json", parse: jsonObject });
  }
}

export { TransportError };
