/**
 * Node.js client for quotad, the quota / rate-limit / spend-control daemon.
 *
 * ```ts
 * import { QuotadClient } from "quotad";
 * const q = new QuotadClient({ url: "http://127.0.0.1:7878" });
 * const d = await q.consume({ subject: "user:42", event: "llm.chat", amounts: { tokens: 1200 } });
 * ```
 */

export { QuotadClient, Reservation, newIdempotencyKey, VERSION, TransportError } from "./client.js";
export type {
  ClientOptions,
  CountersOptions,
  EventsOptions,
  OnUnavailable,
  PolicyWriteOptions,
  StreamOptions,
  SubjectTokenOptions,
  TimeArg,
  UsageOptions,
  UsageExportOptions,
  UsageTopOptions,
} from "./client.js";
export {
  QuotadError,
  InvalidRequest,
  Unauthorized,
  Forbidden,
  NotFound,
  Conflict,
  PreconditionFailed,
  PayloadTooLarge,
  Unavailable,
  Denied,
  errorFromResponse,
} from "./errors.js";
export type { QuotadErrorOptions } from "./errors.js";
export { SSEParser } from "./sse.js";
export type { SSEMessage } from "./sse.js";
export { parseTime, parseDecision, parseFinish } from "./types.js";
export type {
  Algorithm,
  Amounts,
  AnomalyDoc,
  Attributes,
  BatchItem,
  BatchOperation,
  Breaker,
  BreakerDoc,
  CheckRequest,
  ConsumeRequest,
  Cost,
  Counter,
  CounterReset,
  Decision,
  Deleted,
  EventPage,
  Finish,
  Flag,
  FullCounter,
  JsonObject,
  LimitDoc,
  LimitMode,
  MatchDoc,
  Max,
  Outcome,
  Plan,
  PlanDoc,
  Plans,
  Policy,
  PolicyChange,
  PolicyDoc,
  PolicyVersion,
  PriceDoc,
  PricingDoc,
  Priority,
  QuotadEvent,
  Reason,
  ReloadReport,
  ReserveRequest,
  Subject,
  SubjectEntry,
  SubjectPage,
  SubjectToken,
  TopRow,
  TopUsage,
  Usage,
  UsageBucket,
  UsagePage,
  UsageRow,
  Webhook,
} from "./types.js";
