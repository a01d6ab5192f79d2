"""The asyncio client: the methods of :class:`quotad.Client`, awaited."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Generator,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
    overload,
)

import httpx

from typing import Literal

from . import _core
from ._core import Call, Settings, T, TimeArg, TimeoutArg, TtlArg
from .errors import Denied, QuotadError, Unavailable
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
    PolicyDoc,
    PolicyVersion,
    ReloadReport,
    Subject,
    SubjectEntry,
    SubjectPage,
    SubjectToken,
    TopUsage,
    Usage,
    UsagePage,
    UsageRow,
    Webhook,
)

log = logging.getLogger("quotad")

__all__ = ["AsyncClient", "AsyncReservation", "PendingReservation"]


class AsyncReservation:
    """The asyncio twin of :class:`quotad.Reservation`: ``async with`` commits
    ``actual`` (default: what was held) on normal exit and releases if the
    block raises; or ``await hold.commit()`` / ``await hold.release()``."""

    def __init__(self, client: "AsyncClient", decision: Decision, amounts: Optional[Mapping[str, int]]) -> None:
        self._client = client
        self.decision = decision
        self.reservation_id: Optional[str] = decision.reservation_id
        self.expires_at = decision.expires_at
        self.held: Dict[str, int] = dict(amounts or {})
        self.actual: Optional[Dict[str, int]] = None
        self.result: Optional[Finish] = None
        self.error: Optional[QuotadError] = None
        self._finished = False

    @property
    def fallback(self) -> bool:
        return self.decision.fallback

    @property
    def degraded(self) -> bool:
        return self.decision.degraded

    @property
    def finished(self) -> bool:
        return self._finished

    async def commit(self, amounts: Optional[Mapping[str, int]] = None) -> Optional[Finish]:
        if self._finished:
            return self.result
        if amounts is None and self.actual is not None:
            amounts = self.actual
        if self.fallback or self.reservation_id is None:
            self._finished = True
            return None
        self.result = await self._client.commit(self.reservation_id, amounts)
        self._finished = True
        return self.result

    async def release(self) -> Optional[Finish]:
        if self._finished:
            return self.result
        if self.fallback or self.reservation_id is None:
            self._finished = True
            return None
        self.result = await self._client.release(self.reservation_id)
        self._finished = True
        return self.result

    async def __aenter__(self) -> "AsyncReservation":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        if self._finished:
            return False
        if exc_type is None:
            try:
                await self.commit()
            except Unavailable as e:
                if self._client.on_unavailable == "raise":
                    raise
                self.error = e
                log.warning("quotad: commit of %s failed, the hold will expire: %s", self.reservation_id, e)
        else:
            try:
                # Shielded: a cancelled task still gives its hold back.
                await asyncio.shield(self.release())
            except BaseException as e:  # never hide the block's own exception
                self.error = e if isinstance(e, QuotadError) else None
                log.warning("quotad: release of %s failed, the hold will expire: %s", self.reservation_id, e)
        return False

    def __repr__(self) -> str:
        state = "finished" if self._finished else "open"
        return f"<AsyncReservation {self.reservation_id} {self.decision.decision} {state}>"


class PendingReservation:
    """What :meth:`AsyncClient.reserve` returns: ``await`` it for an
    :class:`AsyncReservation`, or use it directly with ``async with``."""

    def __init__(self, start: Callable[[], Awaitable[AsyncReservation]]) -> None:
        self._start = start
        self._hold: Optional[AsyncReservation] = None

    async def _get(self) -> AsyncReservation:
        if self._hold is None:
            self._hold = await self._start()
        return self._hold

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncReservation:
        return await self._get()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        assert self._hold is not None
        return await self._hold.__aexit__(exc_type, exc, tb)


class AsyncClient:
    """An asyncio quotad client. Same arguments and behaviour as
    :class:`quotad.Client`; use ``async with AsyncClient(...) as c`` or
    ``await c.aclose()``."""

    def __init__(
        self,
        url: Union[str, Sequence[str], None] = None,
        *,
        socket: Optional[str] = None,
        token: Optional[str] = None,
        timeout: TimeoutArg = 5.0,
        retries: Optional[int] = None,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        on_unavailable: Literal["raise", "allow", "deny"] = "raise",
        headers: Optional[Mapping[str, str]] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self._s = Settings(url, socket, token, timeout, retries, backoff, max_backoff, on_unavailable, headers)
        if transport is None:
            transport = httpx.AsyncHTTPTransport(uds=socket) if socket is not None else httpx.AsyncHTTPTransport()
        self._http = httpx.AsyncClient(
            base_url=self._s.base_url,
            headers=self._s.headers,
            timeout=self._s.timeout,
            transport=transport,
        )

    # ----- plumbing -----

    @property
    def on_unavailable(self) -> str:
        return self._s.on_unavailable

    @property
    def retries(self) -> int:
        return self._s.retries

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<quotad.AsyncClient {self._s.where}>"

    async def _send(self, call: Call[Any]) -> httpx.Response:
        content = call.content()
        headers = call.request_headers()
        timeout = self._s.timeout_for(call)
        attempt = 0
        while True:
            try:
                resp = await self._http.request(
                    call.method,
                    self._s.url_for(call),
                    params=call.params or None,
                    content=content,
                    headers=headers,
                    timeout=timeout,
                )
            except httpx.TransportError as e:
                if call.retry and attempt < self._s.retries and _core.retryable_transport_error(e):
                    self._s.next_endpoint()
                    await asyncio.sleep(self._s.delay(attempt))
                    attempt += 1
                    continue
                raise self._s.transport_error(e, call, attempt + 1) from e
            if resp.status_code in _core.RETRY_STATUSES and call.retry and attempt < self._s.retries:
                self._s.next_endpoint()
                await asyncio.sleep(self._s.delay(attempt, resp.headers.get("retry-after")))
                attempt += 1
                continue
            return resp

    async def _call(self, call: Call[T]) -> T:
        return self._s.finish(await self._send(call), call)

    async def _decide(self, call: Call[Decision]) -> Decision:
        try:
            return await self._call(call)
        except Unavailable as e:
            return self._s.fallback(call, e)

    async def request(
        self, method: str, path: str, *, json: Any = None, params: Optional[Mapping[str, str]] = None
    ) -> Any:
        """Any endpoint, with this client's auth, retries and error mapping."""

        def parse(r: httpx.Response) -> Any:
            if "json" in r.headers.get("content-type", ""):
                return r.json()
            return r.text

        call = Call(method.upper(), path, parse, params=dict(params) if params else None)
        if json is not None:
            call.body = json
        return await self._call(call)

    # ----- decisions -----

    async def check(
        self,
        subject: str,
        *,
        event: Optional[str] = None,
        attributes: Optional[Mapping[str, str]] = None,
        amounts: Optional[Mapping[str, int]] = None,
        priority: Optional[str] = None,
    ) -> Decision:
        return await self._decide(
            _core.decision_call("check", subject, event, attributes, amounts, None, None, priority, None)
        )

    async def consume(
        self,
        subject: str,
        *,
        event: Optional[str] = None,
        attributes: Optional[Mapping[str, str]] = None,
        amounts: Optional[Mapping[str, int]] = None,
        idempotency_key: Optional[str] = None,
        priority: Optional[str] = None,
        wait_ms: Optional[int] = None,
    ) -> Decision:
        return await self._decide(
            _core.decision_call(
                "consume", subject, event, attributes, amounts, idempotency_key, None, priority, wait_ms
            )
        )

    def reserve(
        self,
        subject: str,
        *,
        event: Optional[str] = None,
        attributes: Optional[Mapping[str, str]] = None,
        amounts: Optional[Mapping[str, int]] = None,
        idempotency_key: Optional[str] = None,
        ttl_ms: Optional[int] = None,
        priority: Optional[str] = None,
        wait_ms: Optional[int] = None,
    ) -> PendingReservation:
        """``hold = await c.reserve(...)`` or ``async with c.reserve(...) as
        hold:``. Raises :class:`~quotad.Denied` when denied."""
        call = _core.decision_call(
            "reserve", subject, event, attributes, amounts, idempotency_key, ttl_ms, priority, wait_ms
        )

        async def start() -> AsyncReservation:
            d = await self._decide(call)
            if not d.allowed:
                raise Denied(d)
            return AsyncReservation(self, d, amounts)

        return PendingReservation(start)

    async def commit(self, reservation_id: str, amounts: Optional[Mapping[str, int]] = None) -> Finish:
        return await self._call(_core.commit_call(reservation_id, amounts))

    async def release(self, reservation_id: str) -> Finish:
        return await self._call(_core.release_call(reservation_id))

    async def batch(self, operations: Iterable[Mapping[str, Any]]) -> BatchResult:
        return await self._call(_core.batch_call(operations))

    # ----- subjects and administration -----

    async def subject(self, subject: str) -> Subject:
        return await self._call(_core.subject_call(subject))

    async def set_plan(
        self,
        subject: str,
        plan: Optional[str] = None,
        *,
        overrides: Optional[Mapping[str, Any]] = None,
        idempotency_key: Optional[str] = None,
    ) -> Subject:
        return await self._call(_core.set_plan_call(subject, plan, overrides, idempotency_key))

    async def delete_subject(self, subject: str, *, idempotency_key: Optional[str] = None) -> Deleted:
        return await self._call(_core.delete_subject_call(subject, idempotency_key))

    async def reset(
        self, subject: str, limit: Optional[str] = None, *, idempotency_key: Optional[str] = None
    ) -> Subject:
        return await self._call(_core.reset_call(subject, limit, idempotency_key))

    async def credit(
        self, subject: str, limit: str, amount: int, *, idempotency_key: Optional[str] = None
    ) -> Subject:
        return await self._call(_core.credit_call(subject, limit, amount, idempotency_key))

    async def subjects(self, *, after: Optional[str] = None, limit: Optional[int] = None) -> SubjectPage:
        return await self._call(_core.subjects_call(after, limit))

    async def iter_subjects(
        self, *, after: Optional[str] = None, page_size: int = 100
    ) -> AsyncIterator[SubjectEntry]:
        while True:
            page = await self.subjects(after=after, limit=page_size)
            for s in page.subjects:
                yield s
            if not _core.split_pages_guard(after, page.next_after, len(page.subjects)):
                return
            after = page.next_after

    async def mint_subject_token(self, subject: str, *, ttl: TtlArg = None) -> SubjectToken:
        """A read-only token for ``subject`` alone (admin); see
        :meth:`quotad.Client.mint_subject_token`."""
        return await self._call(_core.subject_token_call(subject, ttl))

    async def counters(
        self, *, min_fraction: Optional[float] = None, limit: Optional[int] = None
    ) -> List[FullCounter]:
        """The counters at least ``min_fraction`` full, fullest first (admin);
        see :meth:`quotad.Client.counters`."""
        return await self._call(_core.counters_call(min_fraction, limit))

    async def plans(self) -> Plans:
        return await self._call(_core.plans_call())

    async def reload(self) -> ReloadReport:
        return await self._call(_core.reload_call())

    async def digest(self) -> Dict[str, Any]:
        return await self._call(_core.digest_call())

    async def health(self) -> bool:
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        return await self._probe("/readyz")

    async def _probe(self, path: str) -> bool:
        try:
            return (await self._send(_core.health_call(path))).status_code == 200
        except Unavailable:
            return False

    async def wait_ready(self, timeout: float = 30.0, interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise Unavailable(f"quotad at {self._s.where} was not ready within {timeout} s", code="not_ready")
            await asyncio.sleep(interval)

    async def metrics(self) -> str:
        return await self._call(_core.metrics_call())

    # ----- policy as data -----

    async def get_policy(self, version: Optional[int] = None) -> Policy:
        return await self._call(_core.get_policy_call(version))

    async def put_policy(
        self,
        policy: Union[PolicyDoc, Mapping[str, Any]],
        *,
        if_version: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> PolicyChange:
        return await self._call(_core.put_policy_call(policy, if_version, idempotency_key))

    async def list_policy_versions(self) -> List[PolicyVersion]:
        return await self._call(_core.policy_versions_call())

    async def get_plan(self, name: str) -> PlanDoc:
        return await self._call(_core.get_plan_call(name))

    async def put_plan(
        self,
        name: str,
        plan: Union[PlanDoc, Mapping[str, Any]],
        *,
        if_version: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> PolicyChange:
        return await self._call(_core.put_item_call("plans", name, plan, if_version, idempotency_key))

    async def delete_plan(
        self, name: str, *, if_version: Optional[int] = None, idempotency_key: Optional[str] = None
    ) -> PolicyChange:
        return await self._call(_core.delete_item_call("plans", name, if_version, idempotency_key))

    async def get_limit(self, name: str) -> LimitDoc:
        return await self._call(_core.get_limit_call(name))

    async def put_limit(
        self,
        name: str,
        limit: Union[LimitDoc, Mapping[str, Any]],
        *,
        if_version: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> PolicyChange:
        return await self._call(_core.put_item_call("limits", name, limit, if_version, idempotency_key))

    async def delete_limit(
        self, name: str, *, if_version: Optional[int] = None, idempotency_key: Optional[str] = None
    ) -> PolicyChange:
        return await self._call(_core.delete_item_call("limits", name, if_version, idempotency_key))

    # ----- events, breakers, anomalies -----

    async def events(
        self,
        *,
        after: Optional[int] = None,
        limit: Optional[int] = None,
        type: Optional[str] = None,
        order: Optional[Literal["asc", "desc"]] = None,
        before: Optional[int] = None,
    ) -> EventPage:
        """One page of recorded events (admin), oldest first, or newest first
        with ``order="desc"``; see :meth:`quotad.Client.events`."""
        return await self._call(_core.events_call(after, limit, type, order, before))

    async def iter_events(
        self,
        *,
        after: Optional[int] = None,
        type: Optional[str] = None,
        page_size: int = 1000,
        order: Optional[Literal["asc", "desc"]] = None,
        before: Optional[int] = None,
    ) -> AsyncIterator[Event]:
        """Every recorded event, page after page: oldest first after
        ``after``, or with ``order="desc"`` newest first from before
        ``before`` back to the oldest."""
        if order == "desc":
            while True:
                page = await self.events(after=after, before=before, limit=page_size, type=type, order="desc")
                for e in page.events:
                    yield e
                if not _core.back_pages_guard(before, page.next_before):
                    return
                before = page.next_before
        while True:
            page = await self.events(after=after, before=before, limit=page_size, type=type, order=order)
            for e in page.events:
                yield e
            if not _core.split_pages_guard(after, page.next_after, len(page.events)):
                return
            after = page.next_after

    async def stream_events(
        self,
        *,
        last_event_id: Union[int, str, None] = None,
        reconnect: Union[bool, int] = True,
        read_timeout: Optional[float] = None,
        type: Optional[str] = None,
    ) -> AsyncIterator[Event]:
        """Live events over Server-Sent Events; see :meth:`quotad.Client.stream_events`."""
        last = str(last_event_id) if last_event_id is not None else None
        limit = None if reconnect is True else (0 if reconnect is False else int(reconnect))
        call = Call("GET", "/v1/events/stream", lambda r: None)
        failures = 0
        while True:
            delay_hint: Optional[float] = None
            error: Optional[QuotadError] = None
            got_any = False
            try:
                async with self._http.stream(
                    "GET",
                    call.path,
                    params=_core.stream_params(type),
                    headers=_core.stream_headers(last),
                    timeout=_core.stream_timeout(self._s, read_timeout),
                ) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        error = self._s.error_for(resp, call)
                        if resp.status_code not in _core.RETRY_STATUSES:
                            raise error
                    else:
                        parser = _core.SSEParser(last)
                        async for line in resp.aiter_lines():
                            msg = parser.feed(line)
                            if parser.retry_ms is not None:
                                delay_hint = parser.retry_ms / 1000.0
                            if msg is None:
                                continue
                            last = parser.last_id
                            got_any = True
                            failures = 0
                            yield _core.event_from_sse(msg)
                        last = parser.last_id
            except httpx.TransportError as e:
                if not _core.retryable_transport_error(e):
                    raise self._s.transport_error(e, call, failures + 1) from e
                error = self._s.transport_error(e, call, failures + 1)
            if limit == 0:
                if error is not None:
                    raise error
                return
            if not got_any:
                failures += 1
            if limit is not None and failures > limit:
                if error is not None:
                    raise error
                return
            await asyncio.sleep(
                min(delay_hint, self._s.max_backoff) if delay_hint is not None else self._s.delay(max(failures - 1, 0))
            )

    async def webhooks(self) -> List[Webhook]:
        return await self._call(_core.webhooks_call())

    async def breakers(self) -> List[Breaker]:
        return await self._call(_core.breakers_call())

    async def open_breaker(
        self, name: str, *, scope: Optional[str] = None, idempotency_key: Optional[str] = None
    ) -> Breaker:
        return await self._call(_core.breaker_call(name, "open", scope, idempotency_key))

    async def close_breaker(
        self, name: str, *, scope: Optional[str] = None, idempotency_key: Optional[str] = None
    ) -> Breaker:
        return await self._call(_core.breaker_call(name, "close", scope, idempotency_key))

    async def anomalies(self) -> List[Flag]:
        return await self._call(_core.anomalies_call())

    async def clear_flag(self, subject: str, anomaly: str, *, idempotency_key: Optional[str] = None) -> Subject:
        return await self._call(_core.clear_flag_call(subject, anomaly, idempotency_key))

    # ----- usage history -----

    async def usage(
        self,
        subject: str,
        *,
        from_: TimeArg = None,
        to: TimeArg = None,
        granularity: Optional[str] = None,
        timezone: Optional[str] = None,
        group_by: Optional[str] = None,
    ) -> Usage:
        """A subject's usage buckets, split per value of ``group_by`` when
        given; see :meth:`quotad.Client.usage`."""
        return await self._call(_core.usage_call(subject, from_, to, granularity, timezone, group_by))

    @overload
    async def usage_export(
        self,
        *,
        from_: TimeArg = ...,
        to: TimeArg = ...,
        granularity: Optional[str] = ...,
        format: Literal["json"] = ...,
        after: Optional[str] = ...,
        timezone: Optional[str] = ...,
        limit: Optional[int] = ...,
        group_by: Optional[str] = ...,
    ) -> UsagePage: ...

    @overload
    async def usage_export(
        self,
        *,
        from_: TimeArg = ...,
        to: TimeArg = ...,
        granularity: Optional[str] = ...,
        format: Literal["csv"],
        after: Optional[str] = ...,
        timezone: Optional[str] = ...,
        limit: Optional[int] = ...,
        group_by: Optional[str] = ...,
    ) -> str: ...

    async def usage_export(
        self,
        *,
        from_: TimeArg = None,
        to: TimeArg = None,
        granularity: Optional[str] = None,
        format: str = "json",
        after: Optional[str] = None,
        timezone: Optional[str] = None,
        limit: Optional[int] = None,
        group_by: Optional[str] = None,
    ) -> Union[UsagePage, str]:
        """Every subject's usage for billing (admin); see
        :meth:`quotad.Client.usage_export`."""
        return await self._call(
            _core.usage_export_call(from_, to, granularity, format, after, timezone, limit, group_by)
        )

    async def iter_usage_export(
        self,
        *,
        from_: TimeArg = None,
        to: TimeArg = None,
        granularity: Optional[str] = None,
        timezone: Optional[str] = None,
        group_by: Optional[str] = None,
        page_size: Optional[int] = None,
    ) -> AsyncIterator[UsageRow]:
        """Every row of the JSON billing export, page after page."""
        after: Optional[str] = None
        while True:
            page = await self.usage_export(
                from_=from_,
                to=to,
                granularity=granularity,
                format="json",
                after=after,
                timezone=timezone,
                limit=page_size,
                group_by=group_by,
            )
            for r in page.rows:
                yield r
            if not _core.split_pages_guard(after, page.next_after, len(page.rows)):
                return
            after = page.next_after

    async def usage_top(
        self,
        metric: str,
        *,
        from_: TimeArg = None,
        to: TimeArg = None,
        timezone: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> TopUsage:
        """The subjects with the most of ``metric`` in ``[from_, to)``, most
        first (admin); see :meth:`quotad.Client.usage_top`."""
        return await self._call(_core.usage_top_call(metric, from_, to, timezone, limit))

    async def openapi(self) -> Dict[str, Any]:
        return await self._call(_core.openapi_call())
