"""Retries, idempotency keys across retries, on_unavailable, and the SSE
client, using a scriptable proxy in front of the real daemon."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import pytest

import quotad
from conftest import Daemon, free_port

FAST = {"backoff": 0.01, "max_backoff": 0.05}


def test_503_is_retried_with_the_same_key(proxy_factory, subject):
    p = proxy_factory(["503", "503"])
    with quotad.Client(p.url, retries=2, **FAST) as c:
        d = c.consume(subject, amounts={"tokens": 10})
    assert d.allowed and d.replayed is False
    bodies = p.bodies()
    assert len(bodies) == 3
    keys = {b["idempotency_key"] for b in bodies}
    assert len(keys) == 1 and next(iter(keys)).startswith("qpy-")
    assert d.limit is not None  # headers survived the proxy


def test_dropped_connection_is_retried_with_the_same_key(proxy_factory, daemon, subject):
    p = proxy_factory(["drop", "pass"])
    with quotad.Client(p.url, retries=2, **FAST) as c:
        hold = c.reserve(subject, amounts={"tokens": 10})
    assert [b["idempotency_key"] for b in p.bodies()] == [p.bodies()[0]["idempotency_key"]] * 2
    with daemon.client("tcp") as c:
        assert c.subject(subject).counter("tokens-per-day").used == 10
        c.release(hold.reservation_id)


def test_retry_after_an_applied_request_is_a_replay(proxy_factory, daemon, subject):
    """The first attempt reached quotad but its answer was lost: the retry with
    the same key is answered from the log and charges nothing more."""
    p = proxy_factory(["pass"])
    key = f"lost-answer-{subject}"
    with quotad.Client(p.url, **FAST) as c:
        c.consume(subject, amounts={"tokens": 10}, idempotency_key=key)
        d = c.consume(subject, amounts={"tokens": 10}, idempotency_key=key)
    assert d.replayed
    with daemon.client("tcp") as c:
        assert c.subject(subject).counter("tokens-per-day").used == 10


def test_caller_key_is_reused_on_retries(proxy_factory, subject):
    p = proxy_factory(["503"])
    with quotad.Client(p.url, **FAST) as c:
        c.consume(subject, idempotency_key="my-key-" + subject)
    assert [b["idempotency_key"] for b in p.bodies()] == ["my-key-" + subject] * 2


def test_retries_are_bounded(proxy_factory, subject):
    p = proxy_factory(["503"] * 10)
    with quotad.Client(p.url, retries=3, **FAST) as c:
        with pytest.raises(quotad.Unavailable) as exc:
            c.consume(subject)
    assert (exc.value.status, exc.value.code) == (503, "unavailable")
    assert len(p.requests) == 4


def test_no_retries_when_zero(proxy_factory, subject):
    p = proxy_factory(["503"] * 3)
    with quotad.Client(p.url, retries=0, **FAST) as c:
        with pytest.raises(quotad.Unavailable):
            c.consume(subject)
    assert len(p.requests) == 1


def test_4xx_is_never_retried(proxy_factory, subject):
    p = proxy_factory()
    with quotad.Client(p.url, retries=3, **FAST) as c:
        with pytest.raises(quotad.InvalidRequest):
            c.consume(subject, amounts={"nope": 1})
        with pytest.raises(quotad.NotFound):
            c.commit("rsv_missing")
    assert len(p.requests) == 2


def test_admin_write_retry_reuses_header_key(proxy_factory, subject):
    p = proxy_factory(["503", "drop"])
    with quotad.Client(p.url, retries=2, **FAST) as c:
        s = c.set_plan(subject, "pro")
    assert s.plan == "pro" and s.replayed is False
    keys = [r["headers"].get("Idempotency-Key") for r in p.requests]
    assert len(keys) == 3 and keys[0] and len(set(keys)) == 1


def test_commit_is_retried(proxy_factory, daemon, subject):
    with daemon.client("tcp") as direct:
        hold = direct.reserve(subject, amounts={"tokens": 100})
    p = proxy_factory(["503"])
    with quotad.Client(p.url, **FAST) as c:
        fin = c.commit(hold.reservation_id, {"tokens": 40})
    assert fin.status == "committed" and len(p.requests) == 2


def nowhere_clients(mode):
    port = free_port()  # nothing listens here
    missing = str(Path(tempfile.gettempdir()) / f"quotad-missing-{port}.sock")
    return [
        quotad.Client(f"http://127.0.0.1:{port}", on_unavailable=mode, retries=1, timeout=2, **FAST),
        quotad.Client(socket=missing, on_unavailable=mode, retries=1, timeout=2, **FAST),
    ]


def test_unreachable_raises_by_default(subject):
    for c in nowhere_clients("raise"):
        with c:
            with pytest.raises(quotad.Unavailable) as exc:
                c.consume(subject)
            assert exc.value.status is None and exc.value.code == "unreachable"
            assert "after 2 attempts" in str(exc.value)
            assert c.health() is False and c.ready() is False


def test_on_unavailable_allow(subject):
    for c in nowhere_clients("allow"):
        with c:
            d = c.consume(subject, amounts={"tokens": 5})
            assert d.allowed and d.fallback and d.decision == "allow"
            assert [r.code for r in d.reasons] == ["unavailable"]
            assert isinstance(d.error, quotad.Unavailable)
            assert c.check(subject).fallback
            with c.reserve(subject, amounts={"tokens": 5}) as hold:
                assert hold.fallback and hold.reservation_id is None
                hold.actual = {"tokens": 3}
            assert hold.finished and hold.result is None
            # Non-decision calls still raise.
            with pytest.raises(quotad.Unavailable):
                c.subject(subject)


def test_on_unavailable_deny(subject):
    for c in nowhere_clients("deny"):
        with c:
            d = c.consume(subject)
            assert not d.allowed and d.fallback and d.decision == "deny"
            with pytest.raises(quotad.Denied) as exc:
                c.reserve(subject)
            assert exc.value.decision.fallback
            assert "unavailable" in str(exc.value)


def test_on_unavailable_applies_to_503_after_retries(proxy_factory, subject):
    p = proxy_factory(["503"] * 5)
    with quotad.Client(p.url, retries=1, on_unavailable="allow", **FAST) as c:
        d = c.consume(subject)
    assert d.fallback and d.allowed and d.error.status == 503
    assert len(p.requests) == 2


def test_stopped_daemon(subject):
    d = Daemon().start()
    try:
        with quotad.Client(d.url, retries=1, **FAST) as c, quotad.Client(
            d.url, retries=1, on_unavailable="deny", **FAST
        ) as closed:
            assert c.consume(subject).allowed
            d.stop()
            with pytest.raises(quotad.Unavailable):
                c.consume(subject)
            assert closed.consume(subject).fallback
    finally:
        d.cleanup()


def test_invalid_construction():
    with pytest.raises(ValueError):
        quotad.Client("http://127.0.0.1:1", socket="/tmp/x.sock")
    with pytest.raises(ValueError):
        quotad.Client(on_unavailable="maybe")
    with pytest.raises(ValueError):
        quotad.Client("127.0.0.1:7878")
    with pytest.raises(ValueError):
        quotad.Client(retries=-1)


def test_wait_ms_extends_the_read_timeout(proxy_factory, subject):
    p = proxy_factory()
    with quotad.Client(p.url, timeout=1.5, **FAST) as c:
        call = quotad._core.decision_call("consume", subject, None, None, None, None, None, None, 2000)
        assert c._s.timeout_for(call).read == pytest.approx(3.5)


# ---------- Server-Sent Events (scripted) ----------


def sse(*events):
    out = b""
    for seq, typ, data in events:
        out += f"id: {seq}\nevent: {typ}\ndata: {json.dumps(data)}\n\n".encode()
    return out


def test_stream_events_resumes_with_last_event_id(proxy_factory):
    first = b": keep-alive\nretry: 10\n\n" + sse(
        (1, "threshold.crossed", {"id": "evt_1", "seq": 1, "type": "threshold.crossed", "subject": "u", "threshold": 0.8}),
        (2, "breaker.opened", {"id": "evt_2", "seq": 2, "type": "breaker.opened", "at": "2026-11-21T10:00:00.123Z"}),
    )
    second = sse((3, "breaker.closed", {"id": "evt_3", "seq": 3, "type": "breaker.closed"}))
    p = proxy_factory([first, second], upstream=None)
    got = []
    with quotad.Client(p.url, **FAST) as c:
        stream = c.stream_events()
        for ev in stream:
            got.append(ev)
            if len(got) == 3:
                break
        stream.close()
    assert [e.seq for e in got] == [1, 2, 3]
    assert [e.type for e in got] == ["threshold.crossed", "breaker.opened", "breaker.closed"]
    assert got[0].subject == "u" and got[0].get("threshold") == 0.8 and got[0].id == "evt_1"
    assert got[1].at is not None and got[1].at.microsecond == 123000
    assert "Last-Event-ID" not in p.requests[0]["headers"]
    assert p.requests[1]["headers"]["Last-Event-ID"] == "2"
    assert p.requests[0]["headers"]["Accept"] == "text/event-stream"


def test_stream_events_starts_after_given_id_and_gives_up_when_told(proxy_factory):
    p = proxy_factory([sse((8, "anomaly.detected", {"seq": 8, "type": "anomaly.detected"}))], upstream=None)
    with quotad.Client(p.url, **FAST) as c:
        got = list(c.stream_events(last_event_id=7, reconnect=False))
    assert [e.seq for e in got] == [8]
    assert p.requests[0]["headers"]["Last-Event-ID"] == "7"


def test_stream_events_bounded_reconnects_raise(proxy_factory):
    p = proxy_factory(["drop"] * 5, upstream=None)
    with quotad.Client(p.url, **FAST) as c:
        with pytest.raises(quotad.Unavailable):
            list(c.stream_events(reconnect=2))
    assert len(p.requests) == 3


def test_async_retry_reuses_key(proxy_factory, subject):
    p = proxy_factory(["503", "drop"])

    async def main():
        async with quotad.AsyncClient(p.url, retries=2, **FAST) as c:
            return await c.consume(subject, amounts={"tokens": 1})

    d = asyncio.run(main())
    assert d.allowed
    keys = {json.loads(r["body"])["idempotency_key"] for r in p.requests}
    assert len(p.requests) == 3 and len(keys) == 1


def test_async_stream_events(proxy_factory):
    first = sse((1, "threshold.crossed", {"seq": 1, "type": "threshold.crossed"}))
    second = sse((2, "threshold.crossed", {"seq": 2, "type": "threshold.crossed"}))
    p = proxy_factory([first, second], upstream=None)

    async def main():
        got = []
        async with quotad.AsyncClient(p.url, **FAST) as c:
            agen = c.stream_events()
            async for ev in agen:
                got.append(ev.seq)
                if len(got) == 2:
                    break
            await agen.aclose()
        return got

    assert asyncio.run(main()) == [1, 2]
    assert p.requests[1]["headers"]["Last-Event-ID"] == "1"


def test_async_on_unavailable(subject):
    port = free_port()

    async def main():
        async with quotad.AsyncClient(f"http://127.0.0.1:{port}", on_unavailable="allow", retries=1, **FAST) as c:
            d = await c.consume(subject)
            assert d.fallback and d.allowed
            async with c.reserve(subject, amounts={"tokens": 1}) as hold:
                assert hold.fallback
        async with quotad.AsyncClient(f"http://127.0.0.1:{port}", on_unavailable="deny", retries=0) as c:
            with pytest.raises(quotad.Denied):
                await c.reserve(subject)
        async with quotad.AsyncClient(f"http://127.0.0.1:{port}", retries=0) as c:
            with pytest.raises(quotad.Unavailable):
                await c.check(subject)
            assert await c.ready() is False

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 10
