"""Endpoints and fields of the contract that a quotad may not serve yet.

Each test skips, naming the reason, when the daemon answers 404 `not_found`
for the path (or 400 "unknown field" for a new request field), and runs as
soon as the daemon serves it.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

import quotad
from conftest import accepted, aserved, served


def test_events_page_and_iterator(client):
    page = served(lambda: client.events(limit=10), "GET /v1/events")
    assert isinstance(page, quotad.EventPage)
    assert isinstance(page.events, list) and len(page.events) <= 10
    for e in page.events:
        assert isinstance(e, quotad.Event) and e.type and e.seq is not None
    seqs = [e.seq for e in client.iter_events(page_size=5)]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    typed = client.events(type="threshold.*")
    assert all(e.type.startswith("threshold.") for e in typed.events)


def test_events_bad_limit(client):
    served(lambda: client.events(limit=1), "GET /v1/events")
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.events(limit=5000)
    assert "limit" in exc.value.message


def test_event_stream_opens(client):
    stream = client.stream_events(reconnect=False, read_timeout=1.0)
    try:
        served(lambda: next(stream), "GET /v1/events/stream")
    except quotad.Unavailable as e:
        assert e.code == "timeout"  # an idle stream: nothing to send within a second
    except StopIteration:
        pass
    finally:
        stream.close()


def test_webhooks(client):
    hooks = served(lambda: client.webhooks(), "GET /v1/webhooks")
    assert isinstance(hooks, list)
    for h in hooks:
        assert isinstance(h, quotad.Webhook) and h.name


def test_breakers(client):
    breakers = served(lambda: client.breakers(), "GET /v1/breakers")
    assert isinstance(breakers, list)
    for b in breakers:
        assert b.state in ("open", "closed")


def test_breaker_unknown_name(client):
    try:
        client.open_breaker("no-such-breaker")
    except quotad.NotFound as e:
        if e.code == "not_found":
            pytest.skip("POST /v1/breakers/{name}/open: not served by this quotad yet (404 not_found)")
        assert "no-such-breaker" in e.message
    else:
        pytest.fail("opening an unknown breaker must be 404")
    with pytest.raises(quotad.NotFound):
        client.close_breaker("no-such-breaker")


def test_anomalies(client):
    flags = served(lambda: client.anomalies(), "GET /v1/anomalies")
    assert isinstance(flags, list)
    for f in flags:
        assert isinstance(f, quotad.Flag) and f.anomaly


def test_clear_flag_that_is_not_set(client, subject):
    try:
        s = client.clear_flag(subject, "usage-spike")
    except quotad.NotFound as e:
        if e.code == "not_found":
            pytest.skip("DELETE /v1/subjects/{s}/flags/{anomaly}: not served by this quotad yet (404 not_found)")
        assert e.code.startswith("unknown_")
    else:
        assert isinstance(s, quotad.Subject)
        assert not any(f.get("anomaly") == "usage-spike" for f in s.flags)


def test_subject_usage(client, subject):
    client.consume(subject, event="llm.chat", amounts={"tokens": 1200})
    with client.reserve(subject, amounts={"tokens": 900}) as hold:
        hold.actual = {"tokens": 300}
    client.reserve(subject, amounts={"tokens": 5000}).release()  # released holds add nothing
    today = dt.datetime.now(dt.timezone.utc).date()
    u = served(
        lambda: client.usage(subject, from_=today, to=today + dt.timedelta(days=1), granularity="hour"),
        "GET /v1/subjects/{s}/usage",
    )
    assert isinstance(u, quotad.Usage)
    assert u.subject == subject and u.granularity == "hour"
    assert u.totals().get("tokens") == 1500
    assert u.totals().get("requests") == 2
    day = client.usage(subject, from_=today, to=today + dt.timedelta(days=1), granularity="day")
    assert day.totals() == u.totals()


def test_usage_export_json_and_csv(client, subject):
    client.consume(subject, amounts={"tokens": 42})
    today = dt.datetime.now(dt.timezone.utc).date()
    page = served(
        lambda: client.usage_export(from_=today, to=today + dt.timedelta(days=1), granularity="day"),
        "GET /v1/usage",
    )
    assert isinstance(page, quotad.UsagePage)
    rows = [r for r in client.iter_usage_export(from_=today, to=today + dt.timedelta(days=1), granularity="day")]
    mine = [r for r in rows if r.subject == subject]
    assert sum(r.amounts.get("tokens", 0) for r in mine) == 42
    text = client.usage_export(from_=today, to=today + dt.timedelta(days=1), granularity="day", format="csv")
    lines = text.strip().splitlines()
    assert lines[0].replace(" ", "") == "subject,start,metric,amount"
    assert any(line.startswith(f"{subject},") and line.endswith(",tokens,42") for line in lines[1:])


def test_openapi(client):
    doc = served(lambda: client.openapi(), "GET /v1/openapi.json")
    assert str(doc.get("openapi", "")).startswith("3.1")
    assert "/v1/consume" in doc.get("paths", {})


def test_priority_field(client, subject):
    d = accepted(lambda: client.consume(subject, priority="critical"), "priority")
    assert d.allowed
    assert client.check(subject, priority="low").allowed
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.consume(subject, priority="urgent")
    assert "priority" in exc.value.message


def test_wait_ms_field(client, subject):
    d = accepted(lambda: client.consume(subject, amounts={"tokens": 10}, wait_ms=100), "wait_ms")
    assert d.allowed
    # Allowed at once: no wait, or a zero one.
    assert d.waited_ms in (None, 0)
    # A denial no wait can cure answers at once.
    d = client.consume(subject, amounts={"tokens": 2_000_000}, wait_ms=1000)
    assert not d.allowed and d.waited_ms in (None, 0)


def test_decision_answers_plan(client, subject):
    d = client.consume(subject)
    assert d.plan == "free"
    assert d.cost is None  # no [pricing] in the test config


def test_async_upcoming(daemon, transport):
    async def main():
        async with daemon.aclient(transport) as c:
            page = await aserved(c.events(limit=5), "GET /v1/events")
            assert isinstance(page.events, list)
            assert isinstance(await c.breakers(), list)
            assert isinstance(await c.anomalies(), list)
            assert isinstance(await c.webhooks(), list)
            assert "paths" in await c.openapi()

    asyncio.run(main())
