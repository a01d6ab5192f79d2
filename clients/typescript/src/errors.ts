/**
 * Errors. Every error answer of quotad is `{"error":{"code","message"}}` with an
 * HTTP status; it becomes a {@link QuotadError} subclass chosen by the status.
 *
 * {@link Denied} is deliberately *not* a QuotadError: code that treats "quotad
 * is broken" as "let the call through" (`catch (e) { if (e instanceof
 * QuotadError) ... }`) must never let a denied call through by accident.
 */

import type { Decision } from "./types.js";

export interface QuotadErrorOptions {
  status?: number | null;
  code?: string;
  body?: unknown;
  method?: string;
  path?: string;
  cause?: unknown;
}

/** An error answer from quotad, or a failure to reach it. */
export class QuotadError extends Error {
  /** HTTP status; `null` when no answer came (connection refused, timeout). */
  readonly status: number | null;
  /** Machine-readable code: `invalid_request`, `unknown_subject`, `unreachable`, … */
  readonly code: string;
  /** The server's own explanation (`message` adds the status and code). */
  readonly detail: string;
  /** The decoded JSON answer, if any. */
  readonly body: unknown;
  readonly method: string | undefined;
  readonly path: string | undefined;

  constructor(detail: string, options: QuotadErrorOptions = {}) {
    const status = options.status ?? null;
    const code = options.code ?? "error";
    const where = options.method && options.path ? ` [${options.method} ${options.path}]` : "";
    super(`${detail} (${status !== null ? `${status} ` : ""}${code})${where}`, options.cause !== undefined ? { cause: options.cause } : undefined);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.body = options.body;
    this.method = options.method;
    this.path = options.path;
  }
}

/** 400: malformed or out-of-range input (`invalid_request`, `unknown_metric`, `invalid_policy`, …); the detail names the field (for `invalid_policy`, its path: `plans[0].limits[0].max: …`). */
export class InvalidRequest extends QuotadError {}
/** 401: no bearer token, or one quotad does not accept. */
export class Unauthorized extends QuotadError {}
/** 403: the token's role (`client`) may not use this endpoint. */
export class Forbidden extends QuotadError {}
/** 404: `unknown_subject|unknown_plan|unknown_limit|unknown_reservation|unknown_version`, or `not_found` for an endpoint this quotad does not serve. */
export class NotFound extends QuotadError {}
/**
 * 409: `idempotency_conflict`, `reservation_finished`, `plan_in_use` (a plan
 * still assigned to subjects, or the default plan, cannot be removed) or
 * `policy_from_file` (the daemon takes its policy from its config file, not the API).
 */
export class Conflict extends QuotadError {}
/** 412: `version_mismatch`: a policy write's `ifVersion` is not the version in force. Read the policy again and reapply the change. */
export class PreconditionFailed extends QuotadError {}
/** 413: the body is above the server's limit. */
export class PayloadTooLarge extends QuotadError {}
/** quotad could not be reached, timed out, or answered 503 (nothing was applied) after the retries. */
export class Unavailable extends QuotadError {}

/** A reservation (or a decision you asked to throw) was denied; `decision` says why. */
export class Denied extends Error {
  readonly decision: Decision;

  constructor(decision: Decision) {
    super(denialMessage(decision));
    this.name = "Denied";
    this.decision = decision;
  }

  get reasons() {
    return this.decision.reasons;
  }

  get retryAfterMs(): number | null {
    return this.decision.retryAfterMs;
  }
}

function denialMessage(d: Decision): string {
  const parts = d.reasons.map((r) => {
    let text = r.limit ? `${r.limit}: ${r.code}` : r.code;
    if (r.retryAfterMs !== null) text += ` (retry in ${r.retryAfterMs} ms)`;
    return text;
  });
  const why = parts.length ? parts.join("; ") : "no reason given";
  return `quotad denied ${JSON.stringify(d.subject)}: ${why}${d.fallback ? " [fallback: quotad unavailable]" : ""}`;
}

const BY_STATUS: Record<number, typeof QuotadError> = {
  400: InvalidRequest,
  401: Unauthorized,
  403: Forbidden,
  404: NotFound,
  409: Conflict,
  412: PreconditionFailed,
  413: PayloadTooLarge,
  502: Unavailable,
  503: Unavailable,
  504: Unavailable,
};

/** Builds the error for an answer with status >= 400. */
export function errorFromResponse(status: number, body: Buffer | string, method?: string, path?: string): QuotadError {
  const text = typeof body === "string" ? body : body.toString("utf8");
  let parsed: unknown = undefined;
  let code = `http_${status}`;
  let detail = "";
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) {
    const err = (parsed as Record<string, unknown>).error;
    if (err && typeof err === "object") {
      const e = err as Record<string, unknown>;
      if (typeof e.code === "string" && e.code) code = e.code;
      if (typeof e.message === "string") detail = e.message;
    }
  }
  if (!detail) {
    const trimmed = text.trim();
    detail = trimmed ? trimmed.slice(0, 300) : `quotad answered HTTP ${status} with no error body`;
  }
  const Cls = BY_STATUS[status] ?? QuotadError;
  return new Cls(detail, { status, code, body: parsed, method, path });
}
