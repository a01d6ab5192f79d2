"""The synchronous client."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union, overload

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

__all__ = ["Client", "Reservation"]


class Reservation:
    """A hold made by :meth:`Client.reserve` (only allowed reservations exist:
    a denied reserve raises :class:`~quotad.Denied` instead).

    Use it as a context manager: on normal exit it commits ``actual`` (default:
    what was held); if the block raises, it releases the hold and the
    exception propagates. Or call :meth:`commit` / :meth:`release` yourself.
    Finishing twice is a no-op that returns the first answer.

    ``fallback`` is true when quotad was unavailable and the client was built
    with ``on_unavailable="allow"``: there is no hold, and commit/release do
    nothing and return ``None``.
    """

    def __init__(self, client: "Client", decision: Decision, amounts: Optional[Mapping[str, int]]) -> None:
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

    def commit(self, amounts: Optional[Mapping[str, int]] = None) -> Optional[Finish]:
        """Commits the actual usage: ``amounts``, else :attr:`actual`, else
        what was held. Metrics not named keep what was held."""
        if self._finished:
            return self.result
        if amounts is None and self.actual is not None:
            amounts = self.actual
        if self.fallback or self.reservation_id is None:
            self._finished = True
            return None
        self.result = self._client.commit(self.reservation_id, amounts)
        self._finished = True
        return self.result

    def release(self) -> Optional[Finish]:
        """Gives the whole hold back (the work did not happen)."""
        if self._finished:
            return self.result
        if self.fallback or self.reservation_id is None:
            self._finished = True
            return None
        self.result = self._client.release(self.reservation_id)
        self._finished = True
        return self.result

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        if self._finished:
            return False
        if exc_type is None:
            try:
                self.commit()
            except Unavailable as e:
                # The work is done; whether losing its accounting is worse than
                # failing the caller is the on_unavailable choice.
                if self._client.on_unavailable == "raise":
                    raise
                self.error = e
                log.warning("quotad: commit of %s failed, the hold will expire: %s", self.reservation_id, e)
        else:
            try:
                self.release()
            except Exception as e:  # never hide the block's own exception
                self.error = e if isinstance(e, QuotadError) else None
                log.warning("quotad: release of %s failed, the hold will expire: %s", self.reservation_id, e)
        return False

    def __repr__(self) -> str:
        state = "finished" if self._finished else "open"
        return f"<Reservation {self.reservation_id} {self.decision.decision} {state}>"


class Client:
    """A synchronous quotad client (thread-safe; reuse one per process).

    ``Client(url="http://127.0.0.1:7878")`` or
    ``Client(socket="/run/quotad/quotad.sock")``; with neither, the default
    URL. For a cluster, pass every node:
    ``Client(["http://10.0.0.1:7878", "http://10.0.0.2:7878", "http://10.0.0.3:7878"])``;
    a request that one node cannot answer is retried on the next. ``token`` is
    sent as ``Authorization: Bearer``. ``timeout`` is in seconds per attempt.
    ``retries`` is how many times a request is retried after a connection
    error, a timeout, or a 502/503/504 (never after a 4xx), with jittered
    exponential backoff from ``backoff`` seconds up to ``max_backoff`` (or
    the server's ``Retry-After``); by default 2, or 8 with several URLs, enough
    to outlast a leader election. Writes carry an idempotency key (generated
    unless you pass one) that stays the same across those retries, so a
    retried call is counted once.

    ``on_unavailable`` decides what check/consume/reserve do when quotad
    stays unavailable after the retries: ``"raise"`` :class:`~quotad.Unavailable`
    (default), or return a synthetic decision with ``fallback=True`` that
    allows (``"allow"``, fail open) or denies (``"deny"``, fail closed).
    """

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
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self._s = Settings(url, socket, token, timeout, retries, backoff, max_backoff, on_unavailable, headers)
        if transport is None:
            transport = httpx.HTTPTransport(uds=socket) if socket is not None else httpx.HTTPTransport()
        self._http = httpx.Client(
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

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<quotad.Client {self._s.where}>"

    def _send(self, call: Call[Any]) -> httpx.Response:
        content = call.content()
        headers = call.request_headers()
        timeout = self._s.timeout_for(call)
        attempt = 0
        while True:
            try:
                resp = self._http.request(
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
                    time.sleep(self._s.delay(attempt))
                    attempt += 1
                    continue
                raise self._s.transport_error(e, call, attempt + 1) from e
            if resp.status_code in _core.RETRY_STATUSES and call.retry and attempt < self._s.retries:
                self._s.next_endpoint()
                time.sleep(self._s.delay(attempt, resp.headers.get("retry-after")))
                attempt += 1
                continue
            return resp

    def _call(self, call: Call[T]) -> T:
        return self._s.finish(self._send(call), call)

    def _decide(self, call: Call[Decision]) -> Decision:
        try:
            return self._call(call)
        except Unavailable as e:
            return self._s.fallback(call, e)

    def request(
        self, method: str, path: str, *, json: Any = None, params: Optional[Mapping[str, str]] = None
    ) -> Any:
        """Any endpoint, with this client's auth, retries and error mapping;
        answers the decoded JSON (or text for non-JSON answers)."""

        def parse(r: httpx.Response) -> Any:
            if "json" in r.headers.get("content-type", ""):
                return r.json()
            return r.text

        call = Call(method.upper(), path, parse, params=dict(params) if params else None)
        if json is not None:
            call.body = json
        return self._call(call)

    # ----- decisions -----

    def check(
        self,
        subject: str,
        *,
        event: Optional[str] = None,
        attributes: Optional[Mapping[str, str]] = None,
        amounts: Optional[Mapping[str, int]] = None,
        priority: Optional[str] = None,
    ) -> Decision:
        """Would this call be allowed? Changes nothing."""
        return self._decide(
            _core.decision_call("check", subject, event, attributes, amounts, None, None, priority, None)
        )

    def consume(
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
        """Checks every matching limit and, when allowed, charges them all.
        A denial is an answer (``allowed=False``), not an exception."""
        return self._decide(
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
    ) -> Reservation:
        """Holds ``amounts`` until commit/release (or ``ttl_ms``). Raises
        :class:`~quotad.Denied` when denied; returns a :class:`Reservation`."""
        d = self._decide(
            _core.decision_call(
                "reserve", subject, event, attributes, amounts, idempotency_key, ttl_ms, priority, wait_ms
            )
        )
        if not d.allowed:
            raise Denied(d)
        return Reservation(self, d, amounts)

    def commit(self, reservation_id: str, amounts: Optional[Mapping[str, int]] = None) -> Finish:
        """Charges the actual usage of a hold (default: what was held)."""
        return self._call(_core.commit_call(reservation_id, amounts))

    def release(self, reservation_id: str) -> Finish:
        """Gives a hold back."""
        return self._call(_core.release_call(reservation_id))

    def batch(self, operations: Iterable[Mapping[str, Any]]) -> BatchResult:
        """Up to 1000 operations (dicts with ``op``: consume, check, reserve,
        commit, release, and the fields of the single call) in one request.
        consume/reserve operations without a key get one."""
        return self._call(_core.batch_call(operations))

    # ----- subjects and administration -----

    def subject(self, subject: str) -> Subject:
        return self._call(_core.subject_call(subject))

    def set_plan(
        self,
        subject: str,
        plan: Optional[str] = None,
        *,
        overrides: Optional[Mapping[str, Any]] = None,
        idempotency_key: Optional[str] = None,
    ) -> Subject:
        """Assigns a plan and/or per-limit overrides (``{"tokens-per-day":
        {"max": 500000}}``, or the shorthand ``{"tokens-per-day": 500000}``).
        Fields left out are kept."""
        return self._call(_core.set_plan_call(subject, plan, overrides, idempotency_key))

    def delete_subject(self, subject: str, *, idempotency_key: Optional[str] = None) -> Deleted:
        return self._call(_core.delete_subject_call(subject, idempotency_key))

    def reset(self, subject: str, limit: Optional[str] = None, *, idempotency_key: Optional[str] = None) -> Subject:
        """Zeroes one limit's counters for the subject, or all of them."""
        return self._call(_core.reset_call(subject, limit, idempotency_key))

    def credit(self, subject: str, limit: str, amount: int, *, idempotency_key: Optional[str] = None) -> Subject:
        """Gives back ``amount`` of a limit (a top-up of a lifetime limit)."""
        return self._call(_core.credit_call(subject, limit, amount, idempotency_key))

    def subjects(self, *, after: Optional[str] = None, limit: Optional[int] = None) -> SubjectPage:
        """One page of subjects in byte order."""
        return self._call(_core.subjects_call(after, limit))

    def iter_subjects(self, *, after: Optional[str] = None, page_size: int = 100) -> Iterator[SubjectEntry]:
        """Every subject, page after page."""
        while True:
            page = self.subjects(after=after, limit=page_size)
            yield from page.subjects
            if not _core.split_pages_guard(after, page.next_after, len(page.subjects)):
                return
            after = page.next_after

    def mint_subject_token(self, subject: str, *, ttl: TtlArg = None) -> SubjectToken:
        """A read-only token for ``subject`` alone (admin), for a page where
        an end user sees their own usage: hand ``token`` to their browser (or
        ``quotad.Client(url, token=t.token)``). It reads
        :meth:`subject` and :meth:`usage` of that subject until
        ``expires_at``; anything else with it is :class:`~quotad.Forbidden`,
        and after ``expires_at`` it is :class:`~quotad.Unauthorized`. ``ttl``
        is ``"1m"`` to ``"30d"`` (or a ``timedelta``; default 1 hour)."""
        return self._call(_core.subject_token_call(subject, ttl))

    def counters(self, *, min_fraction: Optional[float] = None, limit: Optional[int] = None) -> List[FullCounter]:
        """The counters whose usage is at least ``min_fraction`` of their max
        (server default 0.8), fullest first, then by scope and limit, at most
        ``limit`` (1-1000, default 100) (admin): subjects' counters and global
        and attribute ones. Unlimited limits and limits of 0 are not listed."""
        return self._call(_core.counters_call(min_fraction, limit))

    def plans(self) -> Plans:
        return self._call(_core.plans_call())

    def reload(self) -> ReloadReport:
        """Re-reads the daemon's config file (admin)."""
        return self._call(_core.reload_call())

    def digest(self) -> Dict[str, Any]:
        """A hash of the logical state (admin)."""
        return self._call(_core.digest_call())

    def health(self) -> bool:
        """True when the process answers ``/healthz``; False otherwise (also
        when it cannot be reached)."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """True once recovery has finished (``/readyz`` is 200); False while
        recovering, shutting down, or unreachable."""
        return self._probe("/readyz")

    def _probe(self, path: str) -> bool:
        try:
            return self._send(_core.health_call(path)).status_code == 200
        except Unavailable:
            return False

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.05) -> None:
        """Blocks until :meth:`ready` or raises :class:`~quotad.Unavailable`."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise Unavailable(f"quotad at {self._s.where} was not ready within {timeout} s", code="not_ready")
            time.sleep(interval)

    def metrics(self) -> str:
        """The Prometheus/OpenMetrics text."""
        return self._call(_core.metrics_call())

    # ----- policy as data -----

    def get_policy(self, version: Optional[int] = None) -> Policy:
        """The policy in force, its version and who made it (admin); with
        ``version``, an earlier version still kept (else :class:`~quotad.NotFound`
        ``unknown_version``)."""
        return self._call(_core.get_policy_call(version))

    def put_policy(
        self,
        policy: Union[PolicyDoc, Mapping[str, Any]],
        *,
        if_version: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> PolicyChange:
        """Replaces the whole policy (admin; ``[policy] source = "api"``).
        With ``if_version`` it applies only if that is still the version in
        force (else :class:`~quotad.PreconditionFailed` ``version_mismatch``).
        A policy that does not compile raises :class:`~quotad.InvalidRequest`
        ``invalid_policy`` naming the path, and changes nothing."""
        return self._call(_core.put_policy_call(policy, if_version, idempotency_key))

    def list_policy_versions(self) -> List[PolicyVersion]:
        """The kept policy versions, newest first (admin)."""
        return self._call(_core.policy_versions_call())

    def get_plan(self, name: str) -> PlanDoc:
        """One plan as written (a dict that can be edited and passed back to
        :meth:`put_plan`); :class:`~quotad.NotFound` ``unknown_plan``."""
        return self._call(_core.get_plan_call(name))

    def put_plan(
        self,
        name: str,
        plan: Union[PlanDoc, Mapping[str, Any]],
        *,
        if_version: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> PolicyChange:
        """Creates or replaces one plan (admin). ``plan`` may leave out
        ``name``; if given it must equal ``name``."""
        return self._call(_core.put_item_call("plans", name, plan, if_version, idempotency_key))

    def delete_plan(
        self, name: str, *, if_version: Optional[int] = None, idempotency_key: Optional[str] = None
    ) -> PolicyChange:
        """Removes one plan (admin); :class:`~quotad.Conflict` ``plan_in_use``
        while subjects are assigned to it or it is the default plan."""
        return self._call(_core.delete_item_call("plans", name, if_version, idempotency_key))

    def get_limit(self, name: str) -> LimitDoc:
        """One top-level limit as written; :class:`~quotad.NotFound` ``unknown_limit``."""
        return self._call(_core.get_limit_call(name))

    def put_limit(
        self,
        name: str,
        limit: Union[LimitDoc, Mapping[str, Any]],
        *,
        if_version: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> PolicyChange:
        """Creates or replaces one top-level limit (admin)."""
        return self._call(_core.put_item_call("limits", name, limit, if_version, idempotency_key))

    def delete_limit(
        self, name: str, *, if_version: Optional[int] = None, idempotency_key: Optional[str] = None
    ) -> PolicyChange:
        """Removes one top-level limit and its counters (admin)."""
        return self._call(_core.delete_item_call("limits", name, if_version, idempotency_key))

    # ----- events, breakers, anomalies -----

    def events(
        self,
        *,
        after: Optional[int] = None,
        limit: Optional[int] = None,
        type: Optional[str] = None,
        order: Optional[Literal["asc", "desc"]] = None,
        before: Optional[int] = None,
    ) -> EventPage:
        """One page of recorded events (admin), oldest first after ``after``;
        or with ``order="desc"``, newest first before ``before`` (default: the
        newest), paged back with the page's ``next_before``. ``before``
        without ``order="desc"``, or ``after`` with it, is
        :class:`~quotad.InvalidRequest`. ``type`` is a type or a prefix with
        ``*`` (``"breaker.*"``)."""
        return self._call(_core.events_call(after, limit, type, order, before))

    def iter_events(
        self,
        *,
        after: Optional[int] = None,
        type: Optional[str] = None,
        page_size: int = 1000,
        order: Optional[Literal["asc", "desc"]] = None,
        before: Optional[int] = None,
    ) -> Iterator[Event]:
        """Every recorded event after ``after``, oldest first, page after
        page; or with ``order="desc"``, newest first from before ``before``
        (default: the newest) back to the oldest."""
        if order == "desc":
            while True:
                page = self.events(after=after, before=before, limit=page_size, type=type, order="desc")
                yield from page.events
                if not _core.back_pages_guard(before, page.next_before):
                    return
                before = page.next_before
        while True:
            page = self.events(after=after, before=before, limit=page_size, type=type, order=order)
            yield from page.events
            if not _core.split_pages_guard(after, page.next_after, len(page.events)):
                return
            after = page.next_after

    def stream_events(
        self,
        *,
        last_event_id: Union[int, str, None] = None,
        reconnect: Union[bool, int] = True,
        read_timeout: Optional[float] = None,
        type: Optional[str] = None,
    ) -> Iterator[Event]:
        """Live events over Server-Sent Events (admin), as a generator.

        Resumes after ``last_event_id`` (a seq). When the connection drops, it
        reconnects with ``Last-Event-ID`` set to the last event received, so
        nothing is missed or repeated: forever with ``reconnect=True``, not at
        all with ``False``, or at most N failed attempts in a row with an int.
        4xx answers are raised at once. ``read_timeout`` (seconds) treats a
        silent connection as dropped. ``type`` keeps only events of a type or
        a prefix with ``*`` (``"breaker.*"``), filtered by the server. Close
        the generator (or ``break``) to disconnect.
        """
        last = str(last_event_id) if last_event_id is not None else None
        limit = None if reconnect is True else (0 if reconnect is False else int(reconnect))
        call = Call("GET", "/v1/events/stream", lambda r: None)
        failures = 0
        while True:
            delay_hint: Optional[float] = None
            error: Optional[QuotadError] = None
            got_any = False
            try:
                with self._http.stream(
                    "GET",
                    call.path,
                    params=_core.stream_params(type),
                    headers=_core.stream_headers(last),
                    timeout=_core.stream_timeout(self._s, read_timeout),
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        error = self._s.error_for(resp, call)
                        if resp.status_code not in _core.RETRY_STATUSES:
                            raise error
                    else:
                        parser = _core.SSEParser(last)
                        for line in resp.iter_lines():
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
            time.sleep(min(delay_hint, self._s.max_backoff) if delay_hint is not None else self._s.delay(max(failures - 1, 0)))

    def webhooks(self) -> List[Webhook]:
        """Each webhook's delivery state (admin)."""
        return self._call(_core.webhooks_call())

    def breakers(self) -> List[Breaker]:
        """Each circuit breaker (and scope value) and its state."""
        return self._call(_core.breakers_call())

    def open_breaker(
        self, name: str, *, scope: Optional[str] = None, idempotency_key: Optional[str] = None
    ) -> Breaker:
        """Trips a breaker by hand (the kill switch; admin). ``scope`` picks
        the value of a per-attribute breaker (``"model=gpt-4o"``)."""
        return self._call(_core.breaker_call(name, "open", scope, idempotency_key))

    def close_breaker(
        self, name: str, *, scope: Optional[str] = None, idempotency_key: Optional[str] = None
    ) -> Breaker:
        """Resets a breaker by hand (admin)."""
        return self._call(_core.breaker_call(name, "close", scope, idempotency_key))

    def anomalies(self) -> List[Flag]:
        """Current anomaly flags."""
        return self._call(_core.anomalies_call())

    def clear_flag(self, subject: str, anomaly: str, *, idempotency_key: Optional[str] = None) -> Subject:
        """Clears one anomaly flag of a subject (admin)."""
        return self._call(_core.clear_flag_call(subject, anomaly, idempotency_key))

    # ----- usage history -----

    def usage(
        self,
        subject: str,
        *,
        from_: TimeArg = None,
        to: TimeArg = None,
        granularity: Optional[str] = None,
        timezone: Optional[str] = None,
        group_by: Optional[str] = None,
    ) -> Usage:
        """A subject's usage buckets (``granularity`` hour, day or month;
        ``to`` exclusive; datetimes, dates or strings). ``group_by`` (an
        attribute in the daemon's ``history.dimensions``, such as ``"model"``)
        splits each bucket into one per value of it
        (:attr:`UsageBucket.group`); another attribute is
        :class:`~quotad.InvalidRequest` naming ``group_by``. A subject token
        of that subject may call this too."""
        return self._call(_core.usage_call(subject, from_, to, granularity, timezone, group_by))

    @overload
    def usage_export(
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
    def usage_export(
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

    def usage_export(
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
        """Every subject's usage for billing (admin): a JSON page
        (:class:`UsagePage`, ``limit`` subjects after ``after``), or with
        ``format="csv"`` the CSV text (``subject,start,metric,amount``).
        With ``group_by`` (such as ``"model"``) each row carries the value of
        that attribute (:attr:`UsageRow.group`) and the CSV has a column for
        it (``subject,start,model,metric,amount``)."""
        return self._call(
            _core.usage_export_call(from_, to, granularity, format, after, timezone, limit, group_by)
        )

    def iter_usage_export(
        self,
        *,
        from_: TimeArg = None,
        to: TimeArg = None,
        granularity: Optional[str] = None,
        timezone: Optional[str] = None,
        group_by: Optional[str] = None,
        page_size: Optional[int] = None,
    ) -> Iterator[UsageRow]:
        """Every row of the JSON billing export, page after page
        (``page_size`` subjects a page)."""
        after: Optional[str] = None
        while True:
            page = self.usage_export(
                from_=from_,
                to=to,
                granularity=granularity,
                format="json",
                after=after,
                timezone=timezone,
                limit=page_size,
                group_by=group_by,
            )
            yield from page.rows
            if not _core.split_pages_guard(after, page.next_after, len(page.rows)):
                return
            after = page.next_after

    def usage_top(
        self,
        metric: str,
        *,
        from_: TimeArg = None,
        to: TimeArg = None,
        timezone: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> TopUsage:
        """The ``limit`` (1-1000, default 10) subjects with the most of
        ``metric`` in ``[from_, to)``, most first, ties by subject (admin).
        Exact: the amounts are those :meth:`usage_export` would sum for each
        subject. Shares ``history.max_exports`` with CSV exports
        (:class:`~quotad.Unavailable` ``busy`` when all are taken)."""
        return self._call(_core.usage_top_call(metric, from_, to, timezone, limit))

    def openapi(self) -> Dict[str, Any]:
        """The OpenAPI document the daemon serves."""
        return self._call(_core.openapi_call())
