"""Policy as data: GET|PUT /v1/policy, /v1/policy/versions, GET|PUT|DELETE
/v1/plans/{name} and /v1/limits/{name}, against a daemon with
``[policy] source = "api"`` (and one with the default ``"file"``)."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import uuid

import pytest

import quotad
from conftest import ADMIN_TOKEN, CLIENT_TOKEN


@pytest.fixture
def admin(policy_daemon, transport):
    with policy_daemon.client(transport, token=ADMIN_TOKEN) as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def day_plan(limit: str, max_: object = 1000) -> quotad.PlanDoc:
    return {"limits": [{"name": limit, "period": "1d", "max": max_}]}


def test_read_policy_and_versions(admin):
    p = admin.get_policy()
    assert isinstance(p, quotad.Policy)
    assert p.version >= 1 and p.actor
    assert isinstance(p.changed_at, dt.datetime) and p.changed_at.tzinfo is not None
    assert p.raw["version"] == p.version
    free = p.plan("free")
    assert free is not None and free["default"] is True
    assert [lim["name"] for lim in free["limits"]][:2] == ["tokens-per-day", "requests-per-day"]
    assert p.limit("global-tokens")["algorithm"] == "token_bucket"
    assert "cost_micros" in p.policy["metrics"]

    versions = admin.list_policy_versions()
    assert all(isinstance(v, quotad.PolicyVersion) for v in versions)
    numbers = [v.version for v in versions]
    assert numbers == sorted(numbers, reverse=True)  # newest first
    assert numbers[0] >= p.version and numbers[-1] == 1
    assert versions[-1].actor == "file"  # the config file seeded version 1
    assert all(v.changed_at is not None for v in versions)

    first = admin.get_policy(version=1)
    assert (first.version, first.actor) == (1, "file")
    assert first.plan("free")["limits"][0]["name"] == "tokens-per-day"
    with pytest.raises(quotad.NotFound) as exc:
        admin.get_policy(version=10**9)
    assert (exc.value.status, exc.value.code) == (404, "unknown_version")
    with pytest.raises(ValueError):
        admin.get_policy(version=-1)


def test_get_plan_and_limit_as_written(admin):
    free = admin.get_plan("free")
    assert free["name"] == "free" and free["default"] is True
    tokens = free["limits"][0]
    # Defaults are filled in, in the names of the file.
    assert (tokens["name"], tokens["metric"], tokens["scope"], tokens["algorithm"]) == (
        "tokens-per-day",
        "tokens",
        "subject",
        "fixed",
    )
    assert (tokens["max"], tokens["period"], tokens["mode"]) == (10000, "1d", "enforce")
    g = admin.get_limit("global-tokens")
    assert (g["name"], g["scope"], g["refill"]) == ("global-tokens", "global", 1000000)
    with pytest.raises(quotad.NotFound) as exc:
        admin.get_plan("no-such-plan")
    assert exc.value.code == "unknown_plan" and "no-such-plan" in exc.value.message
    with pytest.raises(quotad.NotFound) as exc:
        admin.get_limit("no-such-limit")
    assert exc.value.code == "unknown_limit"


def test_plan_put_read_assign_and_delete(admin, subject):
    name, limit = unique("team"), unique("team-day")
    before = admin.get_policy().version
    ch = admin.put_plan(name, day_plan(limit))
    assert isinstance(ch, quotad.PolicyChange)
    assert ch.version > before and ch.previous_version == ch.version - 1
    assert ch.actor and isinstance(ch.changed_at, dt.datetime)
    assert ch.counters_reset == [] and ch.replayed is False
    assert ch.plan["name"] == name and ch.policy is None and ch.limit is None
    assert ch.plan["limits"][0]["metric"] == "requests"  # default filled in
    got = admin.get_plan(name)
    assert got == ch.plan
    assert admin.get_policy().version == ch.version

    # Read, edit, write back: a raised max keeps the counters.
    admin.set_plan(subject, name)
    assert admin.consume(subject).counter(limit).used == 1
    got["limits"][0]["max"] = 2000
    ch2 = admin.put_plan(name, got)
    assert ch2.counters_reset == [] and ch2.plan["limits"][0]["max"] == 2000
    c = admin.consume(subject).counter(limit)
    assert (c.used, c.max) == (2, 2000)
    # A changed period starts afresh, and says so.
    got["limits"][0]["period"] = "1h"
    ch3 = admin.put_plan(name, got)
    assert [r.limit for r in ch3.counters_reset] == [limit] and ch3.counters_reset[0].reason

    # Refused while a subject is on it, and for the default plan.
    with pytest.raises(quotad.Conflict) as exc:
        admin.delete_plan(name)
    assert (exc.value.status, exc.value.code) == (409, "plan_in_use")
    assert "1 subject" in exc.value.message
    with pytest.raises(quotad.Conflict) as exc:
        admin.delete_plan("free")
    assert exc.value.code == "plan_in_use" and "default" in exc.value.message

    admin.set_plan(subject, "free")
    gone = admin.delete_plan(name)
    assert gone.plan is None and gone.version == ch3.version + 1
    assert [(r.limit, r.reason) for r in gone.counters_reset] == [(limit, "removed")]
    with pytest.raises(quotad.NotFound) as exc:
        admin.get_plan(name)
    assert exc.value.code == "unknown_plan"
    with pytest.raises(quotad.NotFound):
        admin.delete_plan(name)


def test_plan_name_must_match_the_path(admin):
    with pytest.raises(quotad.InvalidRequest) as exc:
        admin.put_plan(unique("a"), {"name": "something-else", "limits": []})
    assert exc.value.code == "invalid_policy" and "name" in exc.value.message


def test_limit_put_get_delete(admin, subject):
    name = unique("calls-per-hour")
    ch = admin.put_limit(name, {"scope": "global", "period": "1h", "max": 1_000_000, "alerts": [0.8, 1.0]})
    assert ch.limit["name"] == name and ch.limit["max"] == 1_000_000 and ch.limit["alerts"] == [0.8, 1.0]
    assert ch.plan is None and ch.policy is None
    assert admin.get_limit(name) == ch.limit
    c = admin.consume(subject).counter(name)
    assert c is not None and c.scope == "global" and c.used >= 1
    ch2 = admin.put_limit(name, {"scope": "global", "period": "1h", "max": "unlimited"})
    assert admin.get_limit(name)["max"] == "unlimited" and ch2.version == ch.version + 1
    assert ch2.counters_reset == []
    assert admin.consume(subject).counter(name).unlimited
    gone = admin.delete_limit(name)
    assert gone.limit is None
    assert [(r.limit, r.reason) for r in gone.counters_reset] == [(name, "removed")]
    assert admin.consume(subject).counter(name) is None
    with pytest.raises(quotad.NotFound) as exc:
        admin.get_limit(name)
    assert exc.value.code == "unknown_limit"
    with pytest.raises(quotad.NotFound) as exc:
        admin.delete_limit(name)
    assert exc.value.code == "unknown_limit"


def test_stale_if_version_is_version_mismatch(admin):
    name = unique("guarded")
    v = admin.get_policy().version
    ch = admin.put_limit(name, {"scope": "global", "period": "1h", "max": 100}, if_version=v)
    assert ch.previous_version == v
    for write in (
        lambda: admin.put_limit(name, {"scope": "global", "period": "1h", "max": 200}, if_version=v),
        lambda: admin.delete_limit(name, if_version=v),
        lambda: admin.put_plan(unique("p"), {"limits": []}, if_version=v),
        lambda: admin.put_policy(admin.get_policy().policy, if_version=v),
    ):
        with pytest.raises(quotad.PreconditionFailed) as exc:
            write()
        e = exc.value
        assert isinstance(e, quotad.QuotadError)
        assert (e.status, e.code) == (412, "version_mismatch")
        assert str(ch.version) in e.message
    assert admin.get_limit(name)["max"] == 100  # nothing changed
    assert admin.delete_limit(name, if_version=ch.version).previous_version == ch.version


def test_put_policy_round_trip(admin):
    p = admin.get_policy()
    ch = admin.put_policy(p.policy, if_version=p.version)
    # The same policy again: no new version.
    assert ch.previous_version == p.version and ch.version == p.version
    assert ch.policy == p.policy and ch.plan is None and ch.limit is None
    assert ch.counters_reset == []
    now = admin.get_policy()
    assert (now.version, now.policy) == (ch.version, p.policy)
    assert admin.list_policy_versions()[0].version == ch.version


def test_invalid_policy_names_the_path(admin):
    p = admin.get_policy()
    doc = copy.deepcopy(p.policy)
    doc["plans"][0]["limits"][0]["max"] = -5
    with pytest.raises(quotad.InvalidRequest) as exc:
        admin.put_policy(doc)
    e = exc.value
    assert (e.status, e.code) == (400, "invalid_policy")
    assert "plans[0].limits[0].max" in e.message
    doc = copy.deepcopy(p.policy)
    doc["plans"][1]["limits"][0]["period"] = "banana"
    with pytest.raises(quotad.InvalidRequest) as exc:
        admin.put_policy(doc)
    assert exc.value.code == "invalid_policy" and "plans[1].limits[0].period" in exc.value.message
    with pytest.raises(quotad.InvalidRequest) as exc:
        admin.put_plan(unique("bad"), {"limits": [{"name": "x", "period": "1d", "max": "lots"}]})
    assert exc.value.code == "invalid_policy" and "limits[0].max" in exc.value.message
    with pytest.raises(quotad.InvalidRequest) as exc:
        admin.put_limit(unique("bad"), {"period": "1h", "max": 1, "bogus": True})
    assert exc.value.code == "invalid_policy" and "bogus" in exc.value.message
    assert admin.get_policy().version == p.version  # nothing changed


def test_idempotent_put_plan(admin):
    name, key, plan = unique("idem"), unique("key"), day_plan(unique("d"))
    a = admin.put_plan(name, plan, idempotency_key=key)
    b = admin.put_plan(name, plan, idempotency_key=key)
    assert (a.replayed, b.replayed) == (False, True)
    assert (b.version, b.previous_version) == (a.version, a.previous_version)
    assert b.plan == a.plan
    assert admin.get_policy().version == a.version  # applied once
    with pytest.raises(quotad.Conflict) as exc:
        admin.put_plan(name, day_plan("other"), idempotency_key=key)
    assert exc.value.code == "idempotency_conflict"
    d1 = admin.delete_plan(name, idempotency_key=key + "-del")
    d2 = admin.delete_plan(name, idempotency_key=key + "-del")
    assert d2.replayed and d2.version == d1.version


def test_policy_changed_events(admin):
    name = unique("evt")
    ch = admin.put_limit(name, {"scope": "global", "period": "1h", "max": 5})
    admin.delete_limit(name)
    events = list(admin.iter_events(type="policy.changed"))
    mine = [e for e in events if e.get("version") == ch.version]
    assert len(mine) == 1
    e = mine[0]
    assert e.type == "policy.changed"
    assert (e.get("previous_version"), e.get("actor")) == (ch.previous_version, ch.actor)


def test_client_token_reads_plans_but_not_the_policy(policy_daemon, transport):
    with policy_daemon.client(transport, token=CLIENT_TOKEN) as c:
        assert c.get_plan("free")["name"] == "free"
        assert c.get_limit("global-tokens")["name"] == "global-tokens"
        for call in (
            lambda: c.get_policy(),
            lambda: c.list_policy_versions(),
            lambda: c.put_plan("x", {"limits": []}),
            lambda: c.delete_limit("global-tokens"),
        ):
            with pytest.raises(quotad.Forbidden):
                call()


def test_writes_refused_when_the_policy_comes_from_the_file(client):
    p = client.get_policy()
    assert p.version >= 1 and p.plan("free") is not None
    assert client.get_plan("pro")["name"] == "pro"
    for write in (
        lambda: client.put_plan("team", {"limits": []}),
        lambda: client.delete_plan("pro"),
        lambda: client.put_limit("x", {"period": "1h", "max": 1}),
        lambda: client.delete_limit("global-tokens"),
        lambda: client.put_policy(p.policy, if_version=p.version),
    ):
        with pytest.raises(quotad.Conflict) as exc:
            write()
        assert (exc.value.status, exc.value.code) == (409, "policy_from_file")
    assert client.get_policy().version == p.version


def test_async_policy(policy_daemon, transport, subject):
    async def main():
        async with policy_daemon.aclient(transport, token=ADMIN_TOKEN) as c:
            p = await c.get_policy()
            assert (await c.get_policy(version=1)).version == 1
            assert (await c.list_policy_versions())[0].version >= p.version
            plan, limit = unique("aplan"), unique("alimit")
            ch = await c.put_plan(plan, day_plan(unique("aday")), if_version=p.version)
            assert (await c.get_plan(plan)) == ch.plan
            replay = await c.put_plan(plan, ch.plan, idempotency_key="k-" + plan)
            again = await c.put_plan(plan, ch.plan, idempotency_key="k-" + plan)
            assert again.replayed and again.version == replay.version
            await c.set_plan(subject, plan)
            with pytest.raises(quotad.Conflict) as exc:
                await c.delete_plan(plan)
            assert exc.value.code == "plan_in_use"
            await c.set_plan(subject, "free")
            assert (await c.delete_plan(plan)).plan is None
            lc = await c.put_limit(limit, {"scope": "global", "period": "1h", "max": 10})
            assert (await c.get_limit(limit))["max"] == 10
            with pytest.raises(quotad.PreconditionFailed):
                await c.delete_limit(limit, if_version=lc.previous_version)
            assert (await c.delete_limit(limit, if_version=lc.version)).counters_reset[0].limit == limit
            now = await c.get_policy()
            ch = await c.put_policy(now.policy, if_version=now.version)
            assert ch.policy == now.policy

    asyncio.run(main())


def test_stream_events_filters_by_type(admin):
    name = unique("stream")
    admin.put_limit(name, {"scope": "global", "period": "1h", "max": 5})
    admin.delete_limit(name)
    got = []
    stream = admin.stream_events(last_event_id=0, type="policy.*", reconnect=False, read_timeout=1.0)
    try:
        for e in stream:
            got.append(e)
    except quotad.Unavailable as e:
        assert e.code == "timeout"  # nothing more within a second
    finally:
        stream.close()
    assert got and all(e.type == "policy.changed" for e in got)
    # A type nothing has: the stream stays silent.
    none = admin.stream_events(last_event_id=0, type="breaker.*", reconnect=False, read_timeout=1.0)
    try:
        assert list(none) == []
    except quotad.Unavailable as e:
        assert e.code == "timeout"
    finally:
        none.close()
