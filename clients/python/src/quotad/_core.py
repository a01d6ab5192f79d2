"""What the sync and async clients share: settings, request building,
answer parsing, retry policy and the Server-Sent Events parser. No I/O here."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Dict, Generic, Iterable, List, Mapping, Optional, Sequence, TypeVar, Union, cast
from urllib.parse import quote, urlsplit

import httpx

from ._version import __version__
from .errors import QuotadError, Unavailable, error_from_response
from .models import (
    BatchResult,
    Breaker,
    Decision,
    Deleted,
    Event,
    EventPage,
    Finish,
    Flag,
    FullCounter,
    LimitDoc,
    PlanDoc,
    Plans,
    Policy,
    PolicyChange,
    PolicyVersion,
    ReloadReport,
    Subject,
    SubjectPage,
    SubjectToken,
    TopUsage,
    Usage,
    UsagePage,
    Webhook,
)

DEFAULT_URL = "http://127.0.0.1:7878"
ON_UNAVAILABLE = ("raise", "allow", "deny")
PRIORITIES = ("critical", "high", "normal", "low")
RETRY_STATUSES = frozenset({502, 503, 504})
TimeArg = Union[str, date, datetime, None]
TtlArg = Union[str, timedelta, None]
TimeoutArg = Union[float, int, httpx.Timeout, None]


def new_idempotency_key() -> str:
    """A fresh key for one logical operation (reused on its retries)."""
    return "qpy-" + uuid.uuid4().hex


def seg(value: str) -> str:
    """One URL path segment, percent-encoded (``user:42`` -> ``user%3A42``)."""
    if not isinstance(value, str) or value == "":
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return quote(value, safe="")


def fmt_time(value: TimeArg) -> Optional[str]:
    """``from``/``to`` query values: RFC 3339 for datetimes (naive = UTC),
    ``YYYY-MM-DD`` for dates, strings as given."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _clean(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


_NO_BODY = object()
T = TypeVar("T")


@dataclass
class Call(Generic[T]):
    """One API request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    body: Any = _NO_BODY
    params: Optional[Dict[str, str]] = None
    headers: Dict[str, str] = field(default_factory=dict)
    retry: bool = True
    extra_timeout: float = 0.0
    subject: Optional[str] = None  # for a decision's fallback

    def content(self) -> Optional[bytes]:
        if self.body is _NO_BODY:
            return None
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def request_headers(self) -> Dict[str, str]:
        h = dict(self.headers)
        if self.body is not _NO_BODY:
            h.setdefault("Content-Type", "application/json")
        return h


# ---------- settings ----------


class Settings:
    """Validated constructor arguments shared by Client and AsyncClient."""

    def __init__(
        self,
        url: Union[str, Sequence[str], None],
        socket: Optional[str],
        token: Optional[str],
        timeout: TimeoutArg,
        retries: Optional[int],
        backoff: float,
        max_backoff: float,
        on_unavailable: str,
        headers: Optional[Mapping[str, str]],
    ) -> None:
        if url is not None and socket is not None:
            raise ValueError("pass url= or socket=, not both")
        if on_unavailable not in ON_UNAVAILABLE:
            raise ValueError(f"on_unavailable must be one of {ON_UNAVAILABLE}, got {on_unavailable!r}")
        urls = [url] if url is None or isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("url= is an empty list; give one URL, or several (the nodes of a cluster)")
        if retries is None:
            # A cluster's failover takes a few seconds: enough retries to span it.
            retries = 2 if len(urls) == 1 else 8
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        self.socket = socket
        # The endpoints, tried in turn: a request that cannot be answered
        # (connection error, timeout, 502/503/504) is retried on the next.
        self.bases: List[str] = []
        self.current = 0
        if socket is not None:
            self.base_url = "http://quotad"
            self.where = f"unix:{socket}"
        else:
            for u in urls:
                u = (u or DEFAULT_URL).rstrip("/")
                parts = urlsplit(u)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise ValueError(f"url must look like http://host:port, got {u!r}")
                self.bases.append(u)
            self.base_url = self.bases[0]
            self.where = " or ".join(self.bases)
        if timeout is None:
            self.timeout = httpx.Timeout(None)
        elif isinstance(timeout, httpx.Timeout):
            self.timeout = timeout
        else:
            self.timeout = httpx.Timeout(float(timeout))
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.on_unavailable = on_unavailable
        self.headers = {"User-Agent": f"quotad-python/{__version__}", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        if headers:
            self.headers.update(headers)

    def url_for(self, call: "Call[Any]") -> str:
        """Where to send ``call`` now: the path alone with one endpoint (the
        HTTP client's base URL), else the current endpoint's full URL."""
        if len(self.bases) <= 1:
            return call.path
        return self.bases[self.current % len(self.bases)] + call.path

    def next_endpoint(self) -> None:
        """The current endpoint did not answer: the next one is tried."""
        if len(self.bases) > 1:
            self.current = (self.current + 1) % len(self.bases)

    def timeout_for(self, call: "Call[Any]") -> httpx.Timeout:
        t = self.timeout
        if not call.extra_timeout or t.read is None:
            return t
        return httpx.Timeout(connect=t.connect, read=t.read + call.extra_timeout, write=t.write, pool=t.pool)

    def delay(self, attempt: int, retry_after: Optional[str] = None) -> float:
        """Seconds to wait before retry number ``attempt + 1``: exponential with
        jitter, or the server's ``Retry-After``, capped by ``max_backoff``."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff)
            except ValueError:
                pass
        d = min(self.max_backoff, self.backoff * (2**attempt))
        return random.uniform(d / 2, d)

    def transport_error(self, e: Exception, call: "Call[Any]", attempts: int) -> Unavailable:
        code = "timeout" if isinstance(e, httpx.TimeoutException) else "unreachable"
        what = "timed out" if code == "timeout" else "cannot reach quotad"
        detail = str(e) or type(e).__name__
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
        return Unavailable(
            f"{what} at {self.where}: {detail}{tries}",
            status=None,
            code=code,
            method=call.method,
            path=call.path,
        )

    def error_for(self, resp: httpx.Response, call: "Call[Any]") -> QuotadError:
        return error_from_response(resp.status_code, resp.content, resp.headers, method=call.method, path=call.path)

    def finish(self, resp: httpx.Response, call: "Call[T]") -> T:
        if resp.status_code >= 400:
            raise self.error_for(resp, call)
        return call.parse(resp)

    def fallback(self, call: "Call[Decision]", error: Unavailable) -> Decision:
        if self.on_unavailable == "raise" or call.subject is None:
            raise error
        return Decision.fallback_for(call.subject, self.on_unavailable == "allow", error)


def retryable_transport_error(e: Exception) -> bool:
    return isinstance(e, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))


# ---------- parsing ----------


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError as e:
        raise QuotadError(
            f"quotad answered {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}",
            status=resp.status_code,
            code="bad_answer",
        ) from e


def _obj(resp: httpx.Response) -> Dict[str, Any]:
    body = _json(resp)
    if not isinstance(body, dict):
        raise QuotadError(
            f"quotad answered {resp.status_code} with JSON that is not an object",
            status=resp.status_code,
            code="bad_answer",
        )
    return body


def _items(body: Any, *keys: str) -> List[Dict[str, Any]]:
    if isinstance(body, list):
        return [x for x in body if isinstance(x, dict)]
    if isinstance(body, dict):
        for k in keys:
            if isinstance(body.get(k), list):
                return [x for x in body[k] if isinstance(x, dict)]
    return []


def parse_decision(resp: httpx.Response) -> Decision:
    return Decision.from_json(_obj(resp), resp.headers)


def parse_finish(resp: httpx.Response) -> Finish:
    return Finish.from_json(_obj(resp))


def parse_subject(resp: httpx.Response) -> Subject:
    return Subject.from_json(_obj(resp), resp.headers)


# ---------- calls ----------


def decision_call(
    op: str,
    subject: str,
    event: Optional[str],
    attributes: Optional[Mapping[str, str]],
    amounts: Optional[Mapping[str, int]],
    idempotency_key: Optional[str],
    ttl_ms: Optional[int],
    priority: Optional[str],
    wait_ms: Optional[int],
) -> Call[Decision]:
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject must be a non-empty string, got {subject!r}")
    body: Dict[str, Any] = {"subject": subject}
    if event is not None:
        body["event"] = event
    if attributes is not None:
        body["attributes"] = dict(attributes)
    if amounts is not None:
        body["amounts"] = dict(amounts)
    if op in ("consume", "reserve"):
        # Generated once per logical call: every retry sends the same key, so a
        # retried charge is applied at most once.
        body["idempotency_key"] = idempotency_key or new_idempotency_key()
    elif idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    if ttl_ms is not None:
        body["ttl_ms"] = ttl_ms
    if priority is not None:
        body["priority"] = priority
    if wait_ms is not None:
        body["wait_ms"] = wait_ms
    return Call(
        "POST",
        f"/v1/{op}",
        parse_decision,
        body=body,
        extra_timeout=(wait_ms or 0) / 1000.0,
        subject=subject,
    )


def commit_call(reservation_id: str, amounts: Optional[Mapping[str, int]]) -> Call[Finish]:
    body: Dict[str, Any] = {}
    if amounts is not None:
        body["amounts"] = dict(amounts)
    return Call("POST", f"/v1/reservations/{seg(reservation_id)}/commit", parse_finish, body=body)


def release_call(reservation_id: str) -> Call[Finish]:
    return Call("POST", f"/v1/reservations/{seg(reservation_id)}/release", parse_finish, body={})


def batch_call(operations: Iterable[Mapping[str, Any]]) -> Call[BatchResult]:
    ops: List[Dict[str, Any]] = []
    for i, o in enumerate(operations):
        if not isinstance(o, Mapping) or not o.get("op"):
            raise ValueError(f"operations[{i}] must be a dict with an 'op' key, got {o!r}")
        op = _clean(o)
        if op["op"] in ("consume", "reserve") and not op.get("idempotency_key"):
            op["idempotency_key"] = new_idempotency_key()
        ops.append(op)
    if not ops:
        raise ValueError("a batch needs at least one operation")
    return Call(
        "POST",
        "/v1/batch",
        lambda r: BatchResult.from_json(_obj(r), list(ops)),
        body={"operations": ops},
    )


def _key_header(key: Optional[str]) -> Dict[str, str]:
    return {"Idempotency-Key": key or new_idempotency_key()}


def subject_call(subject: str) -> Call[Subject]:
    return Call("GET", f"/v1/subjects/{seg(subject)}", parse_subject)


def set_plan_call(
    subject: str,
    plan: Optional[str],
    overrides: Optional[Mapping[str, Any]],
    idempotency_key: Optional[str],
) -> Call[Subject]:
    body: Dict[str, Any] = {}
    if plan is not None:
        body["plan"] = plan
    if overrides is not None:
        # {"tokens-per-day": 500000} is shorthand for {"tokens-per-day": {"max": 500000}}.
        body["overrides"] = {k: (v if isinstance(v, Mapping) else {"max": v}) for k, v in overrides.items()}
    return Call("PUT", f"/v1/subjects/{seg(subject)}", parse_subject, body=body, headers=_key_header(idempotency_key))


def delete_subject_call(subject: str, idempotency_key: Optional[str]) -> Call[Deleted]:
    return Call(
        "DELETE",
        f"/v1/subjects/{seg(subject)}",
        lambda r: Deleted.from_json(_obj(r), r.headers),
        headers=_key_header(idempotency_key),
    )


def reset_call(subject: str, limit: Optional[str], idempotency_key: Optional[str]) -> Call[Subject]:
    body: Dict[str, Any] = {}
    if limit is not None:
        body["limit"] = limit
    return Call(
        "POST", f"/v1/subjects/{seg(subject)}/reset", parse_subject, body=body, headers=_key_header(idempotency_key)
    )


def credit_call(subject: str, limit: str, amount: int, idempotency_key: Optional[str]) -> Call[Subject]:
    return Call(
        "POST",
        f"/v1/subjects/{seg(subject)}/credit",
        parse_subject,
        body={"limit": limit, "amount": amount},
        headers=_key_header(idempotency_key),
    )


def fmt_ttl(value: TtlArg) -> Optional[str]:
    """A subject token's ``ttl``: text as given (``"15m"``, ``"1h"``,
    ``"7d"``), a ``timedelta`` in whole seconds (or milliseconds)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        ms = round(value.total_seconds() * 1000)
        if ms <= 0:
            raise ValueError(f"ttl must be positive, got {value!r}")
        return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"ttl must be a duration such as '1h' or a timedelta, got {value!r}")


def subject_token_call(subject: str, ttl: TtlArg) -> Call[SubjectToken]:
    body: Dict[str, Any] = {}
    text = fmt_ttl(ttl)
    if text is not None:
        body["ttl"] = text
    return Call(
        "POST", f"/v1/subjects/{seg(subject)}/tokens", lambda r: SubjectToken.from_json(_obj(r)), body=body
    )


def subjects_call(after: Optional[str], limit: Optional[int]) -> Call[SubjectPage]:
    params = {}
    if after is not None:
        params["after"] = after
    if limit is not None:
        params["limit"] = str(limit)
    return Call("GET", "/v1/subjects", lambda r: SubjectPage.from_json(_obj(r)), params=params)


def plans_call() -> Call[Plans]:
    return Call("GET", "/v1/plans", lambda r: Plans.from_json(_obj(r)))


def reload_call() -> Call[ReloadReport]:
    return Call("POST", "/v1/admin/reload", lambda r: ReloadReport.from_json(_obj(r)))


def digest_call() -> Call[Dict[str, Any]]:
    return Call("GET", "/v1/admin/digest", _obj)


def health_call(path: str) -> Call[bool]:
    # A probe: one attempt, and a 503 is an answer (not ready), not an error.
    return Call("GET", path, lambda r: r.status_code == 200, retry=False)


def metrics_call() -> Call[str]:
    return Call("GET", "/metrics", lambda r: r.text, headers={"Accept": "text/plain, application/openmetrics-text"})


def events_call(
    after: Optional[int],
    limit: Optional[int],
    type: Optional[str],
    order: Optional[str] = None,
    before: Optional[int] = None,
) -> Call[EventPage]:
    if order is not None and order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
    params = _clean({"after": after, "before": before, "limit": limit, "type": type, "order": order})
    return Call(
        "GET", "/v1/events", lambda r: EventPage.from_json(_obj(r)), params={k: str(v) for k, v in params.items()}
    )


def webhooks_call() -> Call[List[Webhook]]:
    return Call("GET", "/v1/webhooks", lambda r: [Webhook.from_json(x) for x in _items(_json(r), "webhooks")])


def breakers_call() -> Call[List[Breaker]]:
    return Call("GET", "/v1/breakers", lambda r: [Breaker.from_json(x) for x in _items(_json(r), "breakers")])


def _breaker_answer(name: str) -> Callable[[httpx.Response], Breaker]:
    def parse(r: httpx.Response) -> Breaker:
        body = _json(r)
        if isinstance(body, dict) and isinstance(body.get("breaker"), dict):
            body = body["breaker"]
        if isinstance(body, dict) and isinstance(body.get("breakers"), list) and body["breakers"]:
            body = body["breakers"][0]
        b = Breaker.from_json(body if isinstance(body, dict) else {})
        if not b.name:
            b.name = name
        return b

    return parse


def breaker_call(name: str, action: str, scope: Optional[str], idempotency_key: Optional[str]) -> Call[Breaker]:
    body: Dict[str, Any] = {}
    if scope is not None:
        body["scope"] = scope
    return Call(
        "POST",
        f"/v1/breakers/{seg(name)}/{action}",
        _breaker_answer(name),
        body=body,
        headers=_key_header(idempotency_key),
    )


def anomalies_call() -> Call[List[Flag]]:
    return Call("GET", "/v1/anomalies", lambda r: [Flag.from_json(x) for x in _items(_json(r), "flags", "anomalies")])


def clear_flag_call(subject: str, anomaly: str, idempotency_key: Optional[str]) -> Call[Subject]:
    return Call(
        "DELETE",
        f"/v1/subjects/{seg(subject)}/flags/{seg(anomaly)}",
        lambda r: Subject.from_json(_obj(r) if r.content.strip() else {"subject": subject}, r.headers),
        headers=_key_header(idempotency_key),
    )


def usage_call(
    subject: str,
    from_: TimeArg,
    to: TimeArg,
    granularity: Optional[str],
    timezone_: Optional[str],
    group_by: Optional[str] = None,
) -> Call[Usage]:
    params = _clean(
        {
            "from": fmt_time(from_),
            "to": fmt_time(to),
            "granularity": granularity,
            "timezone": timezone_,
            "group_by": group_by,
        }
    )
    return Call("GET", f"/v1/subjects/{seg(subject)}/usage", lambda r: Usage.from_json(_obj(r)), params=params)


def usage_export_call(
    from_: TimeArg,
    to: TimeArg,
    granularity: Optional[str],
    format: str,
    after: Optional[str],
    timezone_: Optional[str] = None,
    limit: Optional[int] = None,
    group_by: Optional[str] = None,
) -> Call[Union[UsagePage, str]]:
    if format not in ("json", "csv"):
        raise ValueError(f"format must be 'json' or 'csv', got {format!r}")
    params = _clean(
        {
            "from": fmt_time(from_),
            "to": fmt_time(to),
            "granularity": granularity,
            "timezone": timezone_,
            "format": format,
            "after": after,
            "limit": str(limit) if limit is not None else None,
            "group_by": group_by,
        }
    )

    def parse(r: httpx.Response) -> Union[UsagePage, str]:
        return r.text if format == "csv" else UsagePage.from_json(_obj(r), group_by)

    headers = {"Accept": "text/csv"} if format == "csv" else {}
    return Call("GET", "/v1/usage", parse, params=params, headers=headers)


def usage_top_call(
    metric: str, from_: TimeArg, to: TimeArg, timezone_: Optional[str], limit: Optional[int]
) -> Call[TopUsage]:
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty string, got {metric!r}")
    params = _clean(
        {
            "metric": metric,
            "from": fmt_time(from_),
            "to": fmt_time(to),
            "timezone": timezone_,
            "limit": str(limit) if limit is not None else None,
        }
    )
    return Call("GET", "/v1/usage/top", lambda r: TopUsage.from_json(_obj(r)), params=params)


def counters_call(min_fraction: Optional[float], limit: Optional[int]) -> Call[List[FullCounter]]:
    if min_fraction is not None and (isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float))):
        raise ValueError(f"min_fraction must be a number above 0, got {min_fraction!r}")
    params = _clean(
        {
            "min_fraction": str(min_fraction) if min_fraction is not None else None,
            "limit": str(limit) if limit is not None else None,
        }
    )
    return Call(
        "GET",
        "/v1/counters",
        lambda r: [FullCounter.from_json(x) for x in _items(_json(r), "counters")],
        params=params,
    )


# ---------- policy as data ----------


def _version_arg(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a policy version (a whole number >= 0), got {value!r}")
    return value


def _write_headers(if_version: Optional[int], idempotency_key: Optional[str]) -> Dict[str, str]:
    """The headers of a policy write: an ``Idempotency-Key`` (generated once
    per call, so its retries are answered, not applied twice) and, with
    ``if_version``, ``If-Match: "N"``."""
    h = _key_header(idempotency_key)
    if if_version is not None:
        h["If-Match"] = f'"{_version_arg(if_version, "if_version")}"'
    return h


def _doc(value: Any, what: str) -> Dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    return dict(value)


def _parse_change(r: httpx.Response) -> PolicyChange:
    return PolicyChange.from_json(_obj(r), r.headers)


def get_policy_call(version: Optional[int]) -> Call[Policy]:
    params = {"version": str(_version_arg(version, "version"))} if version is not None else None
    return Call("GET", "/v1/policy", lambda r: Policy.from_json(_obj(r)), params=params)


def put_policy_call(
    policy: Mapping[str, Any], if_version: Optional[int], idempotency_key: Optional[str]
) -> Call[PolicyChange]:
    return Call(
        "PUT",
        "/v1/policy",
        _parse_change,
        body={"policy": _doc(policy, "policy")},
        headers=_write_headers(if_version, idempotency_key),
    )


def policy_versions_call() -> Call[List[PolicyVersion]]:
    return Call(
        "GET", "/v1/policy/versions", lambda r: [PolicyVersion.from_json(x) for x in _items(_json(r), "versions")]
    )


def get_plan_call(name: str) -> Call[PlanDoc]:
    return Call("GET", f"/v1/plans/{seg(name)}", lambda r: cast(PlanDoc, _obj(r)))


def get_limit_call(name: str) -> Call[LimitDoc]:
    return Call("GET", f"/v1/limits/{seg(name)}", lambda r: cast(LimitDoc, _obj(r)))


def put_item_call(
    kind: str, name: str, item: Mapping[str, Any], if_version: Optional[int], idempotency_key: Optional[str]
) -> Call[PolicyChange]:
    return Call(
        "PUT",
        f"/v1/{kind}/{seg(name)}",
        _parse_change,
        body=_doc(item, kind[:-1]),
        headers=_write_headers(if_version, idempotency_key),
    )


def delete_item_call(
    kind: str, name: str, if_version: Optional[int], idempotency_key: Optional[str]
) -> Call[PolicyChange]:
    return Call(
        "DELETE", f"/v1/{kind}/{seg(name)}", _parse_change, headers=_write_headers(if_version, idempotency_key)
    )


def openapi_call() -> Call[Dict[str, Any]]:
    return Call("GET", "/v1/openapi.json", _obj)


# ---------- Server-Sent Events ----------


@dataclass
class SSEMessage:
    id: Optional[str]
    event: str
    data: str


class SSEParser:
    """Incremental parser of the ``text/event-stream`` format (WHATWG): feed it
    lines without their terminators; it returns a message at each blank line."""

    def __init__(self, last_id: Optional[str] = None) -> None:
        self.last_id = last_id
        self.retry_ms: Optional[int] = None
        self._data: List[str] = []
        self._event = ""

    def feed(self, line: str) -> Optional[SSEMessage]:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            msg = SSEMessage(self.last_id, self._event or "message", "\n".join(self._data))
            self._data = []
            self._event = ""
            return msg
        if line.startswith(":"):
            return None  # a comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None


def event_from_sse(msg: SSEMessage) -> Event:
    try:
        data = json.loads(msg.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"data": msg.data}
    return Event.from_json(data, sse_id=msg.id, sse_type=msg.event if msg.event != "message" else None)


def stream_params(type: Optional[str]) -> Dict[str, str]:
    """The event stream's query: ``type`` filters by type or prefix (``"breaker.*"``)."""
    return {"type": type} if type else {}


def stream_headers(last_id: Optional[str]) -> Dict[str, str]:
    h = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_id is not None:
        h["Last-Event-ID"] = str(last_id)
    return h


def stream_timeout(settings: Settings, read_timeout: Optional[float]) -> httpx.Timeout:
    t = settings.timeout
    return httpx.Timeout(connect=t.connect, read=read_timeout, write=t.write, pool=t.pool)


def split_pages_guard(prev: Any, nxt: Any, count: int) -> bool:
    """True when paging should go on: a next cursor that moved and a page with rows."""
    return nxt is not None and count > 0 and nxt != prev


def back_pages_guard(prev: Optional[int], nxt: Optional[int]) -> bool:
    """Newest first: True when paging back should go on, i.e. the answer's
    ``next_before`` is set (``None`` once the oldest event was read) and older
    than the ``before`` that was sent. A page may be empty (a filter that
    matched nothing in the events scanned) and paging still goes on."""
    return nxt is not None and (prev is None or nxt < prev)


__all__: Sequence[str] = []
