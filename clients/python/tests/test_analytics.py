"""Analytics and end-user reads: top usage, the fullest counters, events newest
first, usage split per attribute (group_by) and subject tokens. Each test has
a daemon of its own (``fresh_daemon``: auth on, ``[history] dimensions =
["model"]``), so the answers that span every subject are exact."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from typing import Dict, List, Optional

import pytest

import quotad
from conftest import ADMIN_TOKEN, CLIENT_TOKEN

# A top-level limit with alerts: each "alert.ping" of a subject crosses one
# threshold (1/4, 2/4, 3/4 of max), so each records one threshold.crossed event.
PING_ALERTS = """
[[limits]]
name = "pings"
match = { event = "alert.ping" }
period = "1d"
max = 4
alerts = [0.25, 0.5, 0.75]
"""


def today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


def day_range() -> Dict[str, dt.date]:
    return {"from_": today(), "to": today() + dt.timedelta(days=1)}


def uniq(prefix: str) -> str:
    return f"{prefix}:{uuid.uuid4().hex[:8]}"


def add(into: Dict[str, int], amounts: Dict[str, int]) -> None:
    for k, v in amounts.items():
        into[k] = into.get(k, 0) + v


# ---------- GET /v1/usage/top ----------


def test_usage_top_exact_rows(fresh_daemon, transport):
    d = fresh_daemon()
    with d.client(transport, token=ADMIN_TOKEN) as q:
        q.consume("t:bob", amounts={"tokens": 900})
        q.consume("t:amy", amounts={"tokens": 200})
        q.consume("t:amy", amounts={"tokens": 300})  # 500 in all, tied with t:cal
        with q.reserve("t:cal", amounts={"tokens": 2000}) as hold:
            hold.actual = {"tokens": 500}  # a commit counts what it charged
        q.reserve("t:dan", amounts={"tokens": 5000}).release()  # a release adds nothing
        q.consume("t:dan", amounts={"tokens": 100})
        q.consume("t:eve", amounts={"tokens": 0})  # none of the metric: left out

        top = q.usage_top("tokens", **day_range())
        assert isinstance(top, quotad.TopUsage)
        assert top.metric == "tokens"
        assert all(isinstance(r, quotad.TopRow) for r in top)
        # Most first, ties by subject; t:eve has none and is left out.
        assert [(r.subject, r.amount) for r in top.rows] == [
            ("t:bob", 900),
            ("t:amy", 500),
            ("t:cal", 500),
            ("t:dan", 100),
        ]
        assert top.raw["rows"][0] == {"subject": "t:bob", "amount": 900}

        two = q.usage_top("tokens", limit=2, **day_range())
        assert [(r.subject, r.amount) for r in two] == [("t:bob", 900), ("t:amy", 500)]

        # Another metric; the amounts are those the export sums per subject.
        reqs = q.usage_top("requests", limit=1000, **day_range())
        assert dict((r.subject, r.amount) for r in reqs) == {
            "t:amy": 2,
            "t:bob": 1,
            "t:cal": 1,
            "t:dan": 1,
            "t:eve": 1,
        }
        exported: Dict[str, int] = {}
        for row in q.iter_usage_export(**day_range()):
            exported[row.subject] = exported.get(row.subject, 0) + row.amounts.get("tokens", 0)
        assert {s: a for s, a in exported.items() if a} == {r.subject: r.amount for r in top}

        # Nothing in a range before any usage.
        yesterday = today() - dt.timedelta(days=1)
        assert q.usage_top("tokens", from_=yesterday, to=today()).rows == []

        with pytest.raises(quotad.InvalidRequest) as exc:
            q.usage_top("tokens", limit=0, **day_range())
        assert "limit" in exc.value.message
        with pytest.raises(quotad.InvalidRequest) as exc:
            q.usage_top("tokens", from_=today())  # `to` is required
        assert "to" in exc.value.message
        with pytest.raises(ValueError):
            q.usage_top("", **day_range())

    with d.client(transport, token=CLIENT_TOKEN) as c:
        with pytest.raises(quotad.Forbidden):
            c.usage_top("tokens", **day_range())


# ---------- GET /v1/counters ----------


def test_counters_fullest_first(fresh_daemon, transport):
    d = fresh_daemon()
    with d.client(transport, token=ADMIN_TOKEN) as q:
        for _ in range(3):
            q.consume("c:dora", event="image.render")  # image-credits: 3 of 3
        q.consume("c:erin", amounts={"tokens": 9500})  # tokens-per-day: 9500 of 10000
        q.consume("c:abel", amounts={"tokens": 9500})  # the same fraction: by scope
        q.consume("c:bert", amounts={"tokens": 8500})
        q.consume("c:carl", amounts={"tokens": 5000})  # half full: not listed at 0.8

        full = q.counters(min_fraction=0.8)
        assert all(isinstance(c, quotad.FullCounter) for c in full)
        assert [(c.scope, c.limit, c.fraction) for c in full] == [
            ("c:dora", "image-credits", 1.0),
            ("c:abel", "tokens-per-day", 0.95),
            ("c:erin", "tokens-per-day", 0.95),
            ("c:bert", "tokens-per-day", 0.85),
        ]
        bert = full[3]
        assert (bert.metric, bert.max, bert.used, bert.remaining, bert.mode) == ("tokens", 10000, 8500, 1500, "enforce")
        assert bert.resets_at is not None and bert.resets_at > dt.datetime.now(dt.timezone.utc)
        dora = full[0]
        assert (dora.max, dora.used, dora.remaining, dora.resets_at) == (3, 3, 0, None)  # lifetime: no reset
        assert all(abs(c.fraction - c.used / c.max) < 1e-9 for c in full)

        # The server's default is 0.8.
        assert [(c.scope, c.limit) for c in q.counters()] == [(c.scope, c.limit) for c in full]
        assert [(c.scope, c.limit) for c in q.counters(min_fraction=0.9, limit=2)] == [
            ("c:dora", "image-credits"),
            ("c:abel", "tokens-per-day"),
        ]
        low = q.counters(min_fraction=0.4, limit=1000)
        assert [c.scope for c in low if c.limit == "tokens-per-day"] == ["c:abel", "c:erin", "c:bert", "c:carl"]
        fractions = [c.fraction for c in low]
        assert fractions == sorted(fractions, reverse=True)
        # Down to a small fraction: 3 of the 1000 requests a day.
        everything = q.counters(min_fraction=0.003, limit=1000)
        assert ("c:dora", "requests-per-day", 0.003) in [(c.scope, c.limit, c.fraction) for c in everything]
        assert len(everything) > len(low)

        with pytest.raises(quotad.InvalidRequest) as exc:
            q.counters(min_fraction=0)
        assert "min_fraction" in exc.value.message
        with pytest.raises(quotad.InvalidRequest) as exc:
            q.counters(limit=1001)
        assert "limit" in exc.value.message

    with d.client(transport, token=CLIENT_TOKEN) as c:
        with pytest.raises(quotad.Forbidden):
            c.counters()


# ---------- GET /v1/events?order=desc ----------


def wait_for_events(q: quotad.Client, n: int) -> List[quotad.Event]:
    """Events are read once durable: wait until ``n`` are listed."""
    deadline = time.monotonic() + 10
    while True:
        events = list(q.iter_events())
        if len(events) >= n or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def test_events_newest_first_across_pages(fresh_daemon, transport):
    d = fresh_daemon(extra=PING_ALERTS)
    with d.client(transport, token=ADMIN_TOKEN) as q:
        for s in ("e:one", "e:two", "e:three"):
            for _ in range(3):
                assert q.consume(s, event="alert.ping").allowed
        oldest_first = wait_for_events(q, 9)
        assert len(oldest_first) == 9
        assert all(e.type == "threshold.crossed" for e in oldest_first)
        seqs = [e.seq for e in oldest_first]
        assert seqs == sorted(seqs)

        # Pages of 4, newest first: 4, 4, then the oldest one.
        p1 = q.events(order="desc", limit=4)
        assert [e.seq for e in p1.events] == seqs[::-1][:4]
        assert p1.next_after == seqs[-1]  # the newest seq in the page
        assert p1.next_before == p1.events[-1].seq
        p2 = q.events(order="desc", before=p1.next_before, limit=4)
        assert [e.seq for e in p2.events] == seqs[::-1][4:8]
        assert p2.next_after == p2.events[0].seq
        p3 = q.events(order="desc", before=p2.next_before, limit=4)
        assert [e.seq for e in p3.events] == [seqs[0]]
        assert p3.next_before is None  # the oldest was read

        # The iterator pages back the same way, from the newest or from `before`.
        assert [e.seq for e in q.iter_events(order="desc", page_size=4)] == seqs[::-1]
        assert [e.seq for e in q.iter_events(order="desc", page_size=2, before=seqs[5])] == seqs[:5][::-1]
        assert [e.seq for e in q.iter_events(order="desc", page_size=1000)] == seqs[::-1]
        # A filter, newest first.
        mine = [e.seq for e in q.iter_events(order="desc", type="threshold.*", page_size=3)]
        assert mine == seqs[::-1]
        assert q.events(order="desc", type="breaker.*").events == []
        # From a page's next_after, newer events follow in the default order.
        assert q.events(after=p1.next_after).events == []
        assert [e.seq for e in q.events(after=p2.next_after).events] == seqs[-4:]
        # The newest events carry their fields.
        newest = p1.events[0]
        assert newest.subject == "e:three" and newest.get("limit") == "pings" and newest.get("threshold") == 0.75

        with pytest.raises(quotad.InvalidRequest) as exc:
            q.events(before=seqs[3])  # before without order=desc
        assert "before" in exc.value.message
        with pytest.raises(quotad.InvalidRequest) as exc:
            q.events(order="desc", after=seqs[3])  # after with it
        assert "after" in exc.value.message
        with pytest.raises(ValueError):
            q.events(order="newest")  # type: ignore[arg-type]


# ---------- group_by ----------


def test_usage_group_by_adds_up_to_the_totals(fresh_daemon, transport):
    d = fresh_daemon()
    s, other = uniq("g"), uniq("g")
    with d.client(transport, token=ADMIN_TOKEN) as q:
        q.consume(s, event="llm.chat", attributes={"model": "gpt-4o"}, amounts={"tokens": 1000})
        q.consume(s, event="llm.chat", attributes={"model": "claude"}, amounts={"tokens": 300})
        q.consume(s, amounts={"tokens": 50})  # no model
        with q.reserve(s, event="llm.chat", attributes={"model": "gpt-4o"}, amounts={"tokens": 900}) as hold:
            hold.actual = {"tokens": 400}  # the commit is filed under the reservation's model
        q.consume(other, attributes={"model": "claude"}, amounts={"tokens": 7})

        plain = q.usage(s, granularity="hour", **day_range())
        assert plain.group_by is None and all(b.group is None for b in plain.buckets)
        assert plain.totals() == {"requests": 4, "tokens": 1750}

        for granularity in ("hour", "day", "month"):
            u = q.usage(s, granularity=granularity, group_by="model", **day_range())
            assert isinstance(u, quotad.Usage)
            assert u.group_by == "model" and u.raw["group_by"] == "model"
            for b in u.buckets:
                assert "model" in b.raw and b.group == b.raw["model"]
            assert u.totals_by_group() == {
                "gpt-4o": {"requests": 2, "tokens": 1400},
                "claude": {"requests": 1, "tokens": 300},
                None: {"requests": 1, "tokens": 50},
            }
            assert u.totals() == plain.totals()

        # The export: each row has the model; the groups add up to the ungrouped rows.
        grouped: Dict[Optional[str], Dict[str, int]] = {}
        total_grouped: Dict[str, int] = {}
        for row in q.iter_usage_export(group_by="model", page_size=1, **day_range()):
            assert isinstance(row, quotad.UsageRow)
            assert "model" in row.raw and row.group == row.raw["model"]
            if row.subject == s:
                add(grouped.setdefault(row.group, {}), row.amounts)
            add(total_grouped, row.amounts)
        assert grouped == {
            "gpt-4o": {"requests": 2, "tokens": 1400},
            "claude": {"requests": 1, "tokens": 300},
            None: {"requests": 1, "tokens": 50},
        }
        total_plain: Dict[str, int] = {}
        for row in q.iter_usage_export(**day_range()):
            assert row.group is None
            add(total_plain, row.amounts)
        assert total_grouped == total_plain == {"requests": 5, "tokens": 1757}
        page = q.usage_export(group_by="model", limit=1000, **day_range())
        assert page.group_by == "model" and page.next_after is None
        assert {r.subject for r in page.rows} == {s, other}

        csv = q.usage_export(format="csv", group_by="model", **day_range())
        lines = csv.strip().splitlines()
        assert lines[0] == "subject,start,model,metric,amount"
        mine = sorted(line.split(",", 2)[2] for line in lines[1:] if line.startswith(f"{s},"))
        assert mine == sorted(
            [",requests,1", ",tokens,50", "claude,requests,1", "claude,tokens,300", "gpt-4o,requests,2", "gpt-4o,tokens,1400"]
        )

        # Only attributes listed in history.dimensions.
        with pytest.raises(quotad.InvalidRequest) as exc:
            q.usage(s, group_by="team", **day_range())
        assert "group_by" in exc.value.message
        with pytest.raises(quotad.InvalidRequest) as exc:
            q.usage_export(group_by="team", **day_range())
        assert "group_by" in exc.value.message


def test_group_by_needs_the_dimension(daemon, transport, subject):
    # The shared test daemon keeps no dimensions: any group_by is refused.
    with daemon.client(transport) as q:
        q.consume(subject, attributes={"model": "gpt-4o"}, amounts={"tokens": 5})
        with pytest.raises(quotad.InvalidRequest) as exc:
            q.usage(subject, group_by="model", **day_range())
        assert "group_by" in exc.value.message


# ---------- subject tokens ----------


def test_subject_token_reads_its_subject_only(fresh_daemon, transport):
    d = fresh_daemon()
    s, other = uniq("user"), uniq("user")
    with d.client(transport, token=ADMIN_TOKEN) as admin:
        admin.consume(s, event="llm.chat", attributes={"model": "gpt-4o"}, amounts={"tokens": 120})
        admin.consume(other, amounts={"tokens": 7})
        before = dt.datetime.now(dt.timezone.utc)
        t = admin.mint_subject_token(s)
        assert isinstance(t, quotad.SubjectToken)
        assert t.token.startswith("qst_") and t.subject == s
        assert t.token not in repr(t)  # a credential stays out of logs
        # Default ttl: one hour.
        assert t.expires_at is not None
        assert abs((t.expires_at - before).total_seconds() - 3600) < 60

        short = admin.mint_subject_token(s, ttl="15m")
        assert abs((t.expires_at - short.expires_at).total_seconds() - 45 * 60) < 60
        delta = admin.mint_subject_token(s, ttl=dt.timedelta(minutes=2))
        assert abs((short.expires_at - delta.expires_at).total_seconds() - 13 * 60) < 60
        week = admin.mint_subject_token(s, ttl="7d")
        assert abs((week.expires_at - t.expires_at).total_seconds() - (7 * 86400 - 3600)) < 60
        for bad in ("30s", "31d", "soon"):
            with pytest.raises(quotad.InvalidRequest) as exc:
                admin.mint_subject_token(s, ttl=bad)
            assert "ttl" in exc.value.message

    with d.client(transport, token=t.token) as mine:
        got = mine.subject(s)
        assert got.subject == s and got.counter("tokens-per-day").used == 120
        u = mine.usage(s, **day_range())
        assert u.totals() == {"requests": 1, "tokens": 120}
        assert mine.usage(s, group_by="model", **day_range()).totals_by_group() == {
            "gpt-4o": {"requests": 1, "tokens": 120}
        }
        for call in (
            lambda: mine.subject(other),
            lambda: mine.usage(other, **day_range()),
            lambda: mine.consume(s),
            lambda: mine.check(s),
            lambda: mine.set_plan(s, "pro"),
            lambda: mine.reset(s),
            lambda: mine.mint_subject_token(s),
            lambda: mine.subjects(),
            lambda: mine.events(),
            lambda: mine.usage_export(**day_range()),
            lambda: mine.usage_top("tokens", **day_range()),
            lambda: mine.counters(),
            lambda: mine.plans(),
            lambda: mine.metrics(),
        ):
            with pytest.raises(quotad.Forbidden) as exc:
                call()
            assert (exc.value.status, exc.value.code) == (403, "forbidden")
        # Refused, a consume changed nothing.
        assert mine.subject(s).counter("tokens-per-day").used == 120

    # A token changed by one character is no token.
    forged = t.token[:-1] + ("0" if t.token[-1] != "0" else "1")
    with d.client(transport, token=forged) as bad:
        with pytest.raises(quotad.Unauthorized):
            bad.subject(s)
    # Only an admin mints them.
    with d.client(transport, token=CLIENT_TOKEN) as c:
        with pytest.raises(quotad.Forbidden):
            c.mint_subject_token(s)


def test_subject_token_ttl_argument():
    from quotad import _core

    assert _core.fmt_ttl(None) is None
    assert _core.fmt_ttl("1h") == "1h"
    assert _core.fmt_ttl(dt.timedelta(hours=2)) == "7200s"
    assert _core.fmt_ttl(dt.timedelta(seconds=90, milliseconds=5)) == "90005ms"
    for bad in (dt.timedelta(0), "", 3600):
        with pytest.raises(ValueError):
            _core.fmt_ttl(bad)  # type: ignore[arg-type]
    call = _core.subject_token_call("user:42", None)
    assert (call.method, call.path, call.body) == ("POST", "/v1/subjects/user%3A42/tokens", {})
    assert _core.subject_token_call("u", "2h").body == {"ttl": "2h"}


# ---------- asyncio ----------


def test_async_analytics(fresh_daemon, transport):
    d = fresh_daemon(extra=PING_ALERTS)
    s = uniq("a")

    async def main():
        async with d.aclient(transport, token=ADMIN_TOKEN) as q:
            await q.consume(s, event="llm.chat", attributes={"model": "gpt-4o"}, amounts={"tokens": 9000})
            await q.consume(s, event="alert.ping", amounts={"tokens": 100})  # crosses 1/4 of pings
            await q.consume(s, event="alert.ping")  # crosses 2/4
            top = await q.usage_top("tokens", **day_range())
            assert [(r.subject, r.amount) for r in top] == [(s, 9100)]
            full = await q.counters(min_fraction=0.5)
            # gpt4o-tokens-per-hour (max 5000) degrades instead of denying: past 1.
            assert [(c.limit, c.fraction) for c in full] == [
                ("gpt4o-tokens-per-hour", 1.8),
                ("tokens-per-day", 0.91),
                ("pings", 0.5),
            ]
            u = await q.usage(s, group_by="model", **day_range())
            assert u.totals_by_group() == {"gpt-4o": {"requests": 1, "tokens": 9000}, None: {"requests": 2, "tokens": 100}}
            rows = [r async for r in q.iter_usage_export(group_by="model", **day_range())]
            assert {r.group for r in rows} == {"gpt-4o", None}
            page = await q.usage_export(group_by="model", **day_range())
            assert page.group_by == "model"
            deadline = time.monotonic() + 10
            while len((await q.events()).events) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            asc = [e.seq async for e in q.iter_events()]
            assert len(asc) == 2
            desc = [e.seq async for e in q.iter_events(order="desc", page_size=1)]
            assert desc == asc[::-1]
            p = await q.events(order="desc", limit=1)
            assert p.next_before == asc[1] and p.next_after == asc[1]
            with pytest.raises(quotad.InvalidRequest):
                await q.events(before=1)
            t = await q.mint_subject_token(s, ttl="1m")
        async with d.aclient(transport, token=t.token) as mine:
            assert (await mine.subject(s)).subject == s
            assert (await mine.usage(s, **day_range())).totals()["tokens"] == 9100
            with pytest.raises(quotad.Forbidden):
                await mine.subject(s + "x")
            with pytest.raises(quotad.Forbidden):
                await mine.counters()

    asyncio.run(main())
