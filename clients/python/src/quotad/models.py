"""Typed results. Every result keeps the JSON it was built from in ``.raw``,
so fields a newer quotad adds are never lost. The policy documents (plans,
limits, the whole policy) are plain dicts typed as TypedDicts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, TypedDict, Union, cast

from .errors import Denied, QuotadError, error_from_response

__all__ = [
    "Counter",
    "FullCounter",
    "Reason",
    "Cost",
    "Decision",
    "Finish",
    "Subject",
    "Deleted",
    "SubjectEntry",
    "SubjectPage",
    "Plan",
    "Plans",
    "ReloadReport",
    "BatchItem",
    "BatchResult",
    "Event",
    "EventPage",
    "Webhook",
    "Breaker",
    "Flag",
    "UsageBucket",
    "Usage",
    "UsageRow",
    "UsagePage",
    "TopRow",
    "TopUsage",
    "SubjectToken",
    "MatchDoc",
    "LimitDoc",
    "PlanDoc",
    "PriceDoc",
    "PricingDoc",
    "BreakerDoc",
    "AnomalyDoc",
    "PolicyDoc",
    "Policy",
    "PolicyVersion",
    "CounterReset",
    "PolicyChange",
    "parse_time",
]

Max = Union[int, str]  # an integer, or "unlimited"

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?$"
)


def parse_time(value: Any) -> Optional[datetime]:
    """Parses quotad's RFC 3339 times (``2026-11-22T00:00:00Z``,
    ``...T02:00:28.14Z``) into aware datetimes; ``None`` for null or
    anything unparsable (the text stays in ``.raw``)."""
    if not isinstance(value, str):
        return None
    m = _RFC3339.match(value.strip())
    if not m:
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7) or ""
    micro = int((frac + "000000")[:6]) if frac else 0
    if m.group(9):
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        tz = timezone(-offset if m.group(9) == "-" else offset)
    else:
        tz = timezone.utc
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


def _int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _header_int(headers: Optional[Mapping[str, str]], name: str) -> Optional[int]:
    if headers is None:
        return None
    v = headers.get(name)
    if v is None:
        return None
    try:
        return int(str(v).strip())
    except ValueError:
        return None


def _dict(value: Any) -> Dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _list(value: Any) -> List[Any]:
    return list(value) if isinstance(value, list) else []


def _amounts(value: Any) -> Dict[str, int]:
    return {str(k): v for k, v in _dict(value).items()}


@dataclass
class Counter:
    """The state of one limit for one scope value."""

    limit: str
    metric: str
    scope: str
    max: Max
    used: int
    remaining: Optional[int]
    resets_at: Optional[datetime]
    mode: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def unlimited(self) -> bool:
        return self.max == "unlimited"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Counter":
        mx = d.get("max")
        return cls(
            limit=str(d.get("limit", "")),
            metric=str(d.get("metric", "")),
            scope=str(d.get("scope", "")),
            max=mx if isinstance(mx, (int, str)) and not isinstance(mx, bool) else "unlimited",
            used=_int(d.get("used")) or 0,
            remaining=_int(d.get("remaining")),
            resets_at=parse_time(d.get("resets_at")),
            mode=str(d.get("mode", "enforce")),
            raw=dict(d),
        )


@dataclass
class FullCounter(Counter):
    """One entry of ``GET /v1/counters``: a :class:`Counter` and how full it
    is. ``fraction`` is ``used / max`` (past 1 for a monitor-mode limit)."""

    fraction: float = 0.0

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FullCounter":
        c = Counter.from_json(d)
        fraction = d.get("fraction")
        return cls(
            limit=c.limit,
            metric=c.metric,
            scope=c.scope,
            max=c.max,
            used=c.used,
            remaining=c.remaining,
            resets_at=c.resets_at,
            mode=c.mode,
            raw=c.raw,
            fraction=float(fraction) if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else 0.0,
        )


@dataclass
class Reason:
    """Why a limit denied, degraded or would have denied a call: ``code`` is
    ``limit_exceeded``, ``exceeds_capacity``, ``would_deny``, ``degraded``,
    ``unmatched``, ``circuit_open``, ``anomaly``, ``queue_full``, ... and
    ``unavailable`` on a client-side fallback decision."""

    code: str
    limit: Optional[str] = None
    retry_after_ms: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Reason":
        limit = d.get("limit")
        return cls(
            code=str(d.get("code", "")),
            limit=str(limit) if limit is not None else None,
            retry_after_ms=_int(d.get("retry_after_ms")),
            raw=dict(d),
        )


@dataclass
class Cost:
    """What a call costs when pricing is configured."""

    amount_micros: int
    currency: Optional[str] = None
    price: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Any) -> Optional["Cost"]:
        if not isinstance(d, dict):
            return None
        return cls(
            amount_micros=_int(d.get("amount_micros")) or 0,
            currency=d.get("currency"),
            price=d.get("price"),
            raw=dict(d),
        )


@dataclass
class Decision:
    """The answer to check, consume and reserve.

    ``allowed`` is what to act on; ``decision`` is ``"allow"``, ``"deny"`` or
    ``"degrade"`` (allowed, but switch to something cheaper). ``limit``,
    ``remaining``, ``reset`` (Unix seconds) and ``retry_after`` (seconds) come
    from the ``X-RateLimit-*`` and ``Retry-After`` headers (``None`` when
    absent, e.g. inside a batch). ``fallback`` is true for a decision the
    client made up because quotad was unavailable (``on_unavailable``); then
    ``error`` is the :class:`~quotad.Unavailable` that caused it.
    """

    allowed: bool
    decision: str
    subject: str
    plan: Optional[str] = None
    counters: List[Counter] = field(default_factory=list)
    reasons: List[Reason] = field(default_factory=list)
    retry_after_ms: Optional[int] = None
    replayed: bool = False
    reservation_id: Optional[str] = None
    expires_at: Optional[datetime] = None
    cost: Optional[Cost] = None
    waited_ms: Optional[int] = None
    limit: Optional[int] = None
    remaining: Optional[int] = None
    reset: Optional[int] = None
    retry_after: Optional[int] = None
    fallback: bool = False
    error: Optional[QuotadError] = field(default=None, repr=False, compare=False)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def denied(self) -> bool:
        return not self.allowed

    @property
    def degraded(self) -> bool:
        return self.decision == "degrade"

    def counter(self, limit: str) -> Optional[Counter]:
        """The counter of the named limit, if it matched."""
        for c in self.counters:
            if c.limit == limit:
                return c
        return None

    def raise_if_denied(self) -> "Decision":
        """Raises :class:`~quotad.Denied` when not allowed; returns self."""
        if not self.allowed:
            raise Denied(self)
        return self

    @classmethod
    def from_json(cls, d: Mapping[str, Any], headers: Optional[Mapping[str, str]] = None) -> "Decision":
        allowed = bool(d.get("allowed", False))
        plan = d.get("plan")
        return cls(
            allowed=allowed,
            decision=str(d.get("decision", "allow" if allowed else "deny")),
            subject=str(d.get("subject", "")),
            plan=str(plan) if plan is not None else None,
            counters=[Counter.from_json(c) for c in _list(d.get("counters")) if isinstance(c, dict)],
            reasons=[Reason.from_json(r) for r in _list(d.get("reasons")) if isinstance(r, dict)],
            retry_after_ms=_int(d.get("retry_after_ms")),
            replayed=bool(d.get("replayed", False)),
            reservation_id=d.get("reservation_id"),
            expires_at=parse_time(d.get("expires_at")),
            cost=Cost.from_json(d.get("cost")),
            waited_ms=_int(d.get("waited_ms")),
            limit=_header_int(headers, "x-ratelimit-limit"),
            remaining=_header_int(headers, "x-ratelimit-remaining"),
            reset=_header_int(headers, "x-ratelimit-reset"),
            retry_after=_header_int(headers, "retry-after"),
            raw=dict(d),
        )

    @classmethod
    def fallback_for(cls, subject: str, allow: bool, error: QuotadError) -> "Decision":
        """The synthetic decision ``on_unavailable="allow"|"deny"`` returns."""
        raw = {
            "allowed": allow,
            "decision": "allow" if allow else "deny",
            "subject": subject,
            "counters": [],
            "reasons": [{"code": "unavailable"}],
            "replayed": False,
            "reservation_id": None,
            "expires_at": None,
            "fallback": True,
        }
        return cls(
            allowed=allow,
            decision="allow" if allow else "deny",
            subject=subject,
            reasons=[Reason(code="unavailable", raw={"code": "unavailable"})],
            fallback=True,
            error=error,
            raw=raw,
        )


@dataclass
class Finish:
    """The answer to a reservation's commit or release."""

    reservation_id: str
    subject: str
    status: str  # "committed" | "released"
    expired: bool
    held: Dict[str, int]
    charged: Dict[str, int]
    counters: List[Counter]
    #: What the commit charged in money, when pricing is configured.
    cost: Optional[Cost] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Finish":
        return cls(
            reservation_id=str(d.get("reservation_id", "")),
            subject=str(d.get("subject", "")),
            status=str(d.get("status", "")),
            expired=bool(d.get("expired", False)),
            held=_amounts(d.get("held")),
            charged=_amounts(d.get("charged")),
            counters=[Counter.from_json(c) for c in _list(d.get("counters")) if isinstance(c, dict)],
            cost=Cost.from_json(d.get("cost")),
            raw=dict(d),
        )


@dataclass
class Subject:
    """A subject: its plan, overrides, counters (and anomaly flags).
    ``replayed`` is true when an admin write was answered from its
    idempotency key (header ``Idempotent-Replayed``)."""

    subject: str
    plan: Optional[str]
    assigned: bool
    overrides: Dict[str, Dict[str, Any]]
    counters: List[Counter]
    flags: List[Dict[str, Any]] = field(default_factory=list)
    replayed: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def counter(self, limit: str) -> Optional[Counter]:
        for c in self.counters:
            if c.limit == limit:
                return c
        return None

    @classmethod
    def from_json(cls, d: Mapping[str, Any], headers: Optional[Mapping[str, str]] = None) -> "Subject":
        plan = d.get("plan")
        replayed = False
        if headers is not None:
            replayed = str(headers.get("idempotent-replayed", "")).lower() == "true"
        return cls(
            subject=str(d.get("subject", "")),
            plan=str(plan) if plan is not None else None,
            assigned=bool(d.get("assigned", False)),
            overrides={str(k): _dict(v) for k, v in _dict(d.get("overrides")).items()},
            counters=[Counter.from_json(c) for c in _list(d.get("counters")) if isinstance(c, dict)],
            flags=[f for f in _list(d.get("flags")) if isinstance(f, dict)],
            replayed=replayed,
            raw=dict(d),
        )


@dataclass
class Deleted:
    """The answer to ``DELETE /v1/subjects/{subject}``."""

    subject: str
    deleted: bool
    replayed: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], headers: Optional[Mapping[str, str]] = None) -> "Deleted":
        replayed = False
        if headers is not None:
            replayed = str(headers.get("idempotent-replayed", "")).lower() == "true"
        return cls(
            subject=str(d.get("subject", "")),
            deleted=bool(d.get("deleted", False)),
            replayed=replayed,
            raw=dict(d),
        )


@dataclass
class SubjectEntry:
    subject: str
    plan: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class SubjectPage:
    """One page of ``GET /v1/subjects``; pass ``next_after`` as ``after`` for
    the next page (``None`` on the last one)."""

    subjects: List[SubjectEntry]
    next_after: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SubjectPage":
        rows = []
        for s in _list(d.get("subjects")):
            if isinstance(s, dict):
                plan = s.get("plan")
                rows.append(SubjectEntry(str(s.get("subject", "")), str(plan) if plan is not None else None, dict(s)))
            elif isinstance(s, str):
                rows.append(SubjectEntry(s, None, {"subject": s}))
        nxt = d.get("next_after")
        return cls(subjects=rows, next_after=str(nxt) if nxt is not None else None, raw=dict(d))


@dataclass
class Plan:
    name: str
    default: bool
    unmatched: str
    limits: List[Dict[str, Any]]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Plans:
    """``GET /v1/plans``: the plans, the top-level limits and the declared
    metrics in force. Limits are kept as dicts (their config keys)."""

    plans: List[Plan]
    limits: List[Dict[str, Any]]
    metrics: List[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def plan(self, name: str) -> Optional[Plan]:
        for p in self.plans:
            if p.name == name:
                return p
        return None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Plans":
        plans = []
        for p in _list(d.get("plans")):
            if isinstance(p, dict):
                plans.append(
                    Plan(
                        name=str(p.get("name", "")),
                        default=bool(p.get("default", False)),
                        unmatched=str(p.get("unmatched", "allow")),
                        limits=[x for x in _list(p.get("limits")) if isinstance(x, dict)],
                        raw=dict(p),
                    )
                )
        return cls(
            plans=plans,
            limits=[x for x in _list(d.get("limits")) if isinstance(x, dict)],
            metrics=[str(m) for m in _list(d.get("metrics"))],
            raw=dict(d),
        )


@dataclass
class ReloadReport:
    """What ``POST /v1/admin/reload`` did; ``restart_required`` lists changed
    settings that need a restart."""

    plans: int
    limits: int
    tokens: int
    restart_required: List[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ReloadReport":
        return cls(
            plans=_int(d.get("plans")) or 0,
            limits=_int(d.get("limits")) or 0,
            tokens=_int(d.get("tokens")) or 0,
            restart_required=[str(x) for x in _list(d.get("restart_required"))],
            raw=dict(d),
        )


@dataclass
class BatchItem:
    """One operation's answer in a batch: ``status`` and ``body`` as the
    single call would have answered; ``decision`` (check/consume/reserve),
    ``finish`` (commit/release) or ``error`` is set accordingly."""

    status: int
    body: Any
    op: Optional[str] = None
    decision: Optional[Decision] = None
    finish: Optional[Finish] = None
    error: Optional[QuotadError] = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class BatchResult:
    """The answer to ``POST /v1/batch``: one :class:`BatchItem` per operation,
    in order. Iterable and indexable."""

    results: List[BatchItem]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[BatchItem]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> BatchItem:
        return self.results[i]

    @classmethod
    def from_json(cls, d: Mapping[str, Any], ops: Sequence[Mapping[str, Any]]) -> "BatchResult":
        import json as _json

        items = []
        for i, r in enumerate(_list(d.get("results"))):
            r = _dict(r)
            status = _int(r.get("status")) or 0
            body = r.get("body")
            op = ops[i].get("op") if i < len(ops) else None
            item = BatchItem(status=status, body=body, op=op)
            if status >= 400:
                item.error = error_from_response(
                    status, _json.dumps(body).encode("utf-8"), method="POST", path=f"/v1/batch operations[{i}]"
                )
            elif isinstance(body, dict):
                if "allowed" in body:
                    item.decision = Decision.from_json(body)
                elif "status" in body and "reservation_id" in body:
                    item.finish = Finish.from_json(body)
            items.append(item)
        return cls(results=items, raw=dict(d))


@dataclass
class Event:
    """An event (``threshold.crossed``, ``breaker.opened``,
    ``policy.changed``, ...). The fields beyond these depend on the type:
    read them from ``raw`` (or :meth:`get`), e.g. ``version``,
    ``previous_version`` and ``actor`` of ``policy.changed``."""

    id: Optional[str]
    seq: Optional[int]
    type: str
    at: Optional[datetime]
    subject: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], sse_id: Optional[str] = None, sse_type: Optional[str] = None) -> "Event":
        seq = _int(d.get("seq"))
        if seq is None and sse_id is not None:
            try:
                seq = int(sse_id)
            except ValueError:
                seq = None
        ident = d.get("id")
        subject = d.get("subject")
        return cls(
            id=str(ident) if ident is not None else (f"evt_{seq}" if seq is not None else sse_id),
            seq=seq,
            type=str(d.get("type") or sse_type or "message"),
            at=parse_time(d.get("at")),
            subject=str(subject) if subject is not None else None,
            raw=dict(d),
        )


@dataclass
class EventPage:
    """One page of ``GET /v1/events``. Oldest first (the default): pass
    ``next_after`` as ``after`` for the next page. Newest first
    (``order="desc"``): pass ``next_before`` as ``before`` for the next, older
    page (``None`` once the oldest event was read); ``next_after`` is then the
    newest seq in the page, to follow newer events from."""

    events: List[Event]
    next_after: Optional[int]
    next_before: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "EventPage":
        return cls(
            events=[Event.from_json(e) for e in _list(d.get("events")) if isinstance(e, dict)],
            next_after=_int(d.get("next_after")),
            next_before=_int(d.get("next_before")),
            raw=dict(d),
        )


@dataclass
class Webhook:
    name: str
    url: Optional[str]
    delivered_seq: Optional[int]
    pending: Optional[int]
    last_error: Optional[str]
    last_attempt_at: Optional[datetime]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Webhook":
        return cls(
            name=str(d.get("name", "")),
            url=d.get("url"),
            delivered_seq=_int(d.get("delivered_seq")),
            pending=_int(d.get("pending")),
            last_error=d.get("last_error"),
            last_attempt_at=parse_time(d.get("last_attempt_at")),
            raw=dict(d),
        )


@dataclass
class Breaker:
    """A circuit breaker (one per scope value for per-attribute breakers)."""

    name: str
    state: str  # "closed" | "open"
    scope: Optional[str] = None
    recent: Optional[int] = None
    normal: Optional[float] = None
    opened_at: Optional[datetime] = None
    reason: Optional[str] = None  # "rate" | "manual"
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def open(self) -> bool:
        return self.state == "open"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Breaker":
        normal = d.get("normal")
        return cls(
            name=str(d.get("name", d.get("breaker", ""))),
            state=str(d.get("state", "")),
            scope=d.get("scope"),
            recent=_int(d.get("recent")),
            normal=normal if isinstance(normal, (int, float)) and not isinstance(normal, bool) else None,
            opened_at=parse_time(d.get("opened_at")),
            reason=d.get("reason"),
            raw=dict(d),
        )


@dataclass
class Flag:
    """An anomaly flag on a subject."""

    anomaly: str
    subject: Optional[str] = None
    since: Optional[datetime] = None
    used: Optional[int] = None
    baseline: Optional[float] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Flag":
        baseline = d.get("baseline")
        subject = d.get("subject")
        return cls(
            anomaly=str(d.get("anomaly", "")),
            subject=str(subject) if subject is not None else None,
            since=parse_time(d.get("since")),
            used=_int(d.get("used")),
            baseline=baseline if isinstance(baseline, (int, float)) and not isinstance(baseline, bool) else None,
            raw=dict(d),
        )


def _group(d: Mapping[str, Any], group_by: Optional[str]) -> Optional[str]:
    if group_by is None:
        return None
    v = d.get(group_by)
    return str(v) if v is not None else None


@dataclass
class UsageBucket:
    """One bucket of a subject's usage. With ``group_by``, ``group`` is the
    value of that attribute (``None`` for calls that did not carry it); the
    answer names it as a field of its own (``raw["model"]``)."""

    start: Optional[datetime]
    amounts: Dict[str, int]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    group: Optional[str] = None


@dataclass
class Usage:
    """``GET /v1/subjects/{s}/usage``: buckets with usage (empty ones left
    out). With ``group_by`` (an attribute listed in the daemon's
    ``history.dimensions``), each bucket is split into one per value of it
    (:attr:`UsageBucket.group`); the groups add up to the totals."""

    subject: str
    granularity: str
    timezone: Optional[str]
    buckets: List[UsageBucket]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    group_by: Optional[str] = None

    def totals(self) -> Dict[str, int]:
        """Sum of every bucket, per metric."""
        out: Dict[str, int] = {}
        for b in self.buckets:
            for k, v in b.amounts.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def totals_by_group(self) -> Dict[Optional[str], Dict[str, int]]:
        """With ``group_by``: the sum of every bucket per group value
        (``None``: calls without the attribute), per metric."""
        out: Dict[Optional[str], Dict[str, int]] = {}
        for b in self.buckets:
            sums = out.setdefault(b.group, {})
            for k, v in b.amounts.items():
                sums[k] = sums.get(k, 0) + int(v)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Usage":
        gb = d.get("group_by")
        group_by = str(gb) if gb is not None else None
        buckets = [
            UsageBucket(parse_time(b.get("start")), _amounts(b.get("amounts")), dict(b), _group(b, group_by))
            for b in _list(d.get("buckets"))
            if isinstance(b, dict)
        ]
        return cls(
            subject=str(d.get("subject", "")),
            granularity=str(d.get("granularity", "")),
            timezone=d.get("timezone"),
            buckets=buckets,
            raw=dict(d),
            group_by=group_by,
        )


@dataclass
class UsageRow:
    """One row of the billing export; with ``group_by``, ``group`` is the
    value of that attribute (``None`` for calls that did not carry it)."""

    subject: str
    start: Optional[datetime]
    amounts: Dict[str, int]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    group: Optional[str] = None


@dataclass
class UsagePage:
    """One JSON page of ``GET /v1/usage`` (billing export); pass
    ``next_after`` as ``after`` (``None`` on the last page). ``group_by`` is
    the attribute the rows were split by, as asked."""

    rows: List[UsageRow]
    next_after: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    group_by: Optional[str] = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any], group_by: Optional[str] = None) -> "UsagePage":
        if group_by is None and d.get("group_by") is not None:
            group_by = str(d.get("group_by"))
        rows = [
            UsageRow(
                str(r.get("subject", "")),
                parse_time(r.get("start")),
                _amounts(r.get("amounts")),
                dict(r),
                _group(r, group_by),
            )
            for r in _list(d.get("rows"))
            if isinstance(r, dict)
        ]
        nxt = d.get("next_after")
        return cls(rows=rows, next_after=str(nxt) if nxt is not None else None, raw=dict(d), group_by=group_by)


@dataclass
class TopRow:
    """One subject of :class:`TopUsage` and its amount of the metric."""

    subject: str
    amount: int
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class TopUsage:
    """``GET /v1/usage/top``: the subjects with the most of ``metric`` in the
    range, most first (ties by subject); subjects with none are left out.
    Iterable over its rows."""

    metric: str
    rows: List[TopRow]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[TopRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TopUsage":
        return cls(
            metric=str(d.get("metric", "")),
            rows=[
                TopRow(str(r.get("subject", "")), _int(r.get("amount")) or 0, dict(r))
                for r in _list(d.get("rows"))
                if isinstance(r, dict)
            ],
            raw=dict(d),
        )


@dataclass
class SubjectToken:
    """``POST /v1/subjects/{s}/tokens``: a read-only token for one subject.
    Send ``token`` as ``Authorization: Bearer`` (``quotad.Client(url,
    token=t.token)``): it reads that subject (:meth:`~quotad.Client.subject`)
    and its usage (:meth:`~quotad.Client.usage`) until ``expires_at``, and is
    refused (403) everywhere else; after ``expires_at`` it is 401."""

    token: str
    subject: str
    expires_at: Optional[datetime]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        # The token is a credential: keep it out of logs.
        return f"SubjectToken(subject={self.subject!r}, expires_at={self.expires_at!r}, token='qst_...')"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SubjectToken":
        return cls(
            token=str(d.get("token", "")),
            subject=str(d.get("subject", "")),
            expires_at=parse_time(d.get("expires_at")),
            raw=dict(d),
        )


# ---------- policy as data ----------
#
# The policy documents are plain dicts in the shape and names of the TOML
# file (and of the JSON quotad answers), typed as TypedDicts: what
# get_plan/get_limit/get_policy return can be edited and written back as is.
# Every key is optional in what you send (quotad fills in the defaults and
# answers with them filled in), except where the server says otherwise:
# ``name`` of a limit inside a plan, ``max``, ``period`` (except lifetime).


class MatchDoc(TypedDict, total=False):
    """``match = { event = "llm.*", attributes = { model = "gpt-4o" } }``:
    globs over the event name and attribute values."""

    event: str
    attributes: Dict[str, str]


class LimitDoc(TypedDict, total=False):
    """One ``[[limits]]`` / ``[[plans.limits]]`` entry."""

    name: str
    metric: str  # default "requests"
    scope: str  # "subject" (default), "global" or "attribute:<name>"
    algorithm: str  # "fixed" (default) | "sliding" | "token_bucket" | "lifetime"
    max: Max  # an int, or "unlimited"
    refill: int  # token_bucket: added per period (default: max)
    period: str  # "1m", "1h", "1d", "1mo", ...
    timezone: str  # IANA zone of calendar windows (default "UTC")
    match: MatchDoc
    mode: str  # "enforce" (default) | "monitor" | "degrade"
    alerts: List[float]  # fractions of max, e.g. [0.8, 1.0]


class PlanDoc(TypedDict, total=False):
    """One ``[[plans]]`` entry."""

    name: str
    default: bool
    unmatched: str  # "allow" (default) | "deny"
    priority: str  # "critical" | "high" | "normal" (default) | "low"
    limits: List[LimitDoc]


class PriceDoc(TypedDict, total=False):
    """One ``[[pricing.prices]]`` entry: ``name``, ``match``, and a price per
    metric as text (``"input_tokens": "2.50/1M"``), which a TypedDict cannot
    name: read and write those keys as on any dict."""

    name: str
    match: MatchDoc


class PricingDoc(TypedDict, total=False):
    """``[pricing]``."""

    currency: str
    metric: str  # default "cost_micros"
    unpriced: str  # "reject" (default) | "zero"
    prices: List[PriceDoc]


class BreakerDoc(TypedDict, total=False):
    """One ``[[breakers]]`` entry."""

    name: str
    metric: str
    match: MatchDoc
    scope: str
    window: str
    baseline: str
    normal_per_hour: int
    ratio: float
    min_amount: int
    cooldown: str
    pass_priority: str


class AnomalyDoc(TypedDict, total=False):
    """One ``[[anomalies]]`` entry."""

    name: str
    metric: str
    match: MatchDoc
    period: str
    timezone: str
    baseline_periods: int
    ratio: float
    min_amount: int
    action: str  # "flag" (default) | "degrade" | "deny"


class PolicyDoc(TypedDict, total=False):
    """A whole policy: every section that decides. Sections left out are
    empty (and quotad leaves empty ones out of its answers)."""

    metrics: List[str]
    pricing: PricingDoc
    limits: List[LimitDoc]
    plans: List[PlanDoc]
    breakers: List[BreakerDoc]
    anomalies: List[AnomalyDoc]


def _replayed(headers: Optional[Mapping[str, str]]) -> bool:
    if headers is None:
        return False
    return str(headers.get("idempotent-replayed", "")).lower() == "true"


@dataclass
class Policy:
    """``GET /v1/policy``: the policy in force (or an earlier kept version).
    ``version`` is also the ETag: pass it as ``if_version`` to a write to make
    it apply only if nothing changed since."""

    version: int
    changed_at: Optional[datetime]
    actor: str
    policy: PolicyDoc
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def plan(self, name: str) -> Optional[PlanDoc]:
        for p in self.policy.get("plans", []):
            if p.get("name") == name:
                return p
        return None

    def limit(self, name: str) -> Optional[LimitDoc]:
        """A top-level limit by name."""
        for lim in self.policy.get("limits", []):
            if lim.get("name") == name:
                return lim
        return None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Policy":
        return cls(
            version=_int(d.get("version")) or 0,
            changed_at=parse_time(d.get("changed_at")),
            actor=str(d.get("actor", "")),
            policy=cast(PolicyDoc, _dict(d.get("policy"))),
            raw=dict(d),
        )


@dataclass
class PolicyVersion:
    """One entry of ``GET /v1/policy/versions``."""

    version: int
    changed_at: Optional[datetime]
    actor: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PolicyVersion":
        return cls(
            version=_int(d.get("version")) or 0,
            changed_at=parse_time(d.get("changed_at")),
            actor=str(d.get("actor", "")),
            raw=dict(d),
        )


@dataclass
class CounterReset:
    """A limit whose counters a policy change dropped: ``reason`` is
    ``"removed"`` or what changed (``"period 1d -> 1h"``)."""

    limit: str
    reason: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class PolicyChange:
    """The answer to a policy write (put_policy, put_plan, delete_plan,
    put_limit, delete_limit): the new ``version`` (also the ETag), the one it
    replaced, who made it, the counters it reset, and the item as now in
    force — ``policy``, ``plan`` or ``limit``, whichever was written (``None``
    after a delete). ``replayed`` is true when the answer came from the
    idempotency key of an earlier identical write."""

    version: int
    previous_version: int
    changed_at: Optional[datetime]
    actor: str
    counters_reset: List[CounterReset] = field(default_factory=list)
    policy: Optional[PolicyDoc] = None
    plan: Optional[PlanDoc] = None
    limit: Optional[LimitDoc] = None
    replayed: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], headers: Optional[Mapping[str, str]] = None) -> "PolicyChange":
        def part(key: str) -> Optional[Dict[str, Any]]:
            v = d.get(key)
            return dict(v) if isinstance(v, dict) else None

        return cls(
            version=_int(d.get("version")) or 0,
            previous_version=_int(d.get("previous_version")) or 0,
            changed_at=parse_time(d.get("changed_at")),
            actor=str(d.get("actor", "")),
            counters_reset=[
                CounterReset(str(c.get("limit", "")), str(c.get("reason", "")), dict(c))
                for c in _list(d.get("counters_reset"))
                if isinstance(c, dict)
            ],
            policy=cast(Optional[PolicyDoc], part("policy")),
            plan=cast(Optional[PlanDoc], part("plan")),
            limit=cast(Optional[LimitDoc], part("limit")),
            replayed=_replayed(headers),
            raw=dict(d),
        )
