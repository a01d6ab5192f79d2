"""Parsing and helpers, without a daemon."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

import quotad
from quotad import _core
from quotad.errors import error_from_response
from quotad.models import parse_time


def test_parse_time_variants():
    assert parse_time("2026-11-22T00:00:00Z") == dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
    assert parse_time("2026-11-22T02:00:28.14Z").microsecond == 140000
    assert parse_time("2026-11-22T02:00:28.123456789Z").microsecond == 123456
    t = parse_time("2026-11-22T02:00:00+01:00")
    assert t.utcoffset() == dt.timedelta(hours=1)
    assert parse_time(None) is None and parse_time("soon") is None and parse_time(5) is None


def test_decision_keeps_new_fields():
    raw = {
        "allowed": True,
        "decision": "allow",
        "subject": "u",
        "plan": "pro",
        "counters": [
            {"limit": "x", "metric": "tokens", "scope": "u", "max": "unlimited", "used": 5, "mode": "monitor"}
        ],
        "reasons": [{"code": "would_deny", "limit": "y"}],
        "replayed": False,
        "reservation_id": None,
        "expires_at": None,
        "cost": {"amount_micros": 12500, "currency": "USD", "price": "gpt-4o"},
        "waited_ms": 120,
        "something_new": {"a": 1},
    }
    headers = httpx.Headers({"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "99"})
    d = quotad.Decision.from_json(raw, headers)
    assert d.cost == quotad.Cost(12500, "USD", "gpt-4o", raw=raw["cost"])
    assert d.waited_ms == 120 and d.plan == "pro"
    assert d.raw["something_new"] == {"a": 1}
    assert (d.limit, d.remaining, d.reset, d.retry_after) == (10, 3, 99, None)
    c = d.counters[0]
    assert c.unlimited and c.remaining is None and c.resets_at is None
    assert d.reasons[0].retry_after_ms is None


def test_fallback_decision():
    err = quotad.Unavailable("down", code="unreachable")
    d = quotad.Decision.fallback_for("u", True, err)
    assert d.allowed and d.fallback and d.error is err and d.raw["fallback"] is True
    d = quotad.Decision.fallback_for("u", False, err)
    assert not d.allowed and d.decision == "deny"


def test_error_mapping():
    e = error_from_response(409, b'{"error":{"code":"reservation_finished","message":"already committed"}}')
    assert isinstance(e, quotad.Conflict) and e.code == "reservation_finished" and e.status == 409
    assert str(e) == "already committed (409 reservation_finished)"
    e = error_from_response(502, b"<html>bad gateway</html>")
    assert isinstance(e, quotad.Unavailable) and e.code == "http_502" and "bad gateway" in e.message
    e = error_from_response(418, b"")
    assert type(e) is quotad.QuotadError and "418" in e.message
    for status, cls in [(400, quotad.InvalidRequest), (401, quotad.Unauthorized), (403, quotad.Forbidden),
                        (404, quotad.NotFound), (412, quotad.PreconditionFailed), (413, quotad.PayloadTooLarge),
                        (503, quotad.Unavailable)]:
        assert isinstance(error_from_response(status, b"{}"), cls)
    e = error_from_response(412, b'{"error":{"code":"version_mismatch","message":"the policy is at version 3, not 2"}}')
    assert isinstance(e, quotad.QuotadError) and (e.status, e.code) == (412, "version_mismatch")


def test_sse_parser():
    p = _core.SSEParser()
    lines = [": comment", "id: 5", "event: breaker.opened", "data: {\"a\":", "data: 1}", "", "retry: 3000", "",
             "data:no-space", "", "id: 6", ""]
    msgs = [m for m in (p.feed(line) for line in lines) if m]
    assert msgs[0] == _core.SSEMessage("5", "breaker.opened", '{"a":\n1}')
    assert msgs[1] == _core.SSEMessage("5", "message", "no-space")
    assert p.retry_ms == 3000 and p.last_id == "6" and len(msgs) == 2
    ev = _core.event_from_sse(_core.SSEMessage("9", "threshold.crossed", '{"used": 3}'))
    assert ev.seq == 9 and ev.type == "threshold.crossed" and ev.get("used") == 3


def test_request_building():
    call = _core.decision_call("check", "u", None, None, None, None, None, None, None)
    assert call.body == {"subject": "u"}  # optional fields only when given
    call = _core.decision_call("consume", "u", "e", {"m": "x"}, {"tokens": 1}, None, None, "high", 50)
    assert call.body["idempotency_key"].startswith("qpy-")
    assert call.body["priority"] == "high" and call.body["wait_ms"] == 50 and "ttl_ms" not in call.body
    call = _core.set_plan_call("a/b", None, {"x": 5, "y": {"max": "unlimited"}}, "k")
    assert call.path == "/v1/subjects/a%2Fb" and call.headers == {"Idempotency-Key": "k"}
    assert call.body == {"overrides": {"x": {"max": 5}, "y": {"max": "unlimited"}}}
    assert _core.fmt_time(dt.date(2026, 1, 2)) == "2026-01-02"
    assert _core.fmt_time(dt.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
    with pytest.raises(ValueError):
        _core.usage_export_call(None, None, None, "xml", None)


def test_mock_transport_end_to_end():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={"allowed": False, "decision": "deny", "subject": "u", "counters": [], "reasons": [],
                  "replayed": False, "reservation_id": None, "expires_at": None},
            headers={"Retry-After": "7"},
        )

    with quotad.Client("http://quotad.test/prefix", token="t0k", transport=httpx.MockTransport(handler)) as c:
        d = c.consume("u")
    assert d.retry_after == 7
    assert str(seen[0].url) == "http://quotad.test/prefix/v1/consume"
    assert seen[0].headers["authorization"] == "Bearer t0k"
    assert seen[0].headers["user-agent"].startswith("quotad-python/")


def test_policy_change_parsing():
    raw = {
        "version": 7,
        "previous_version": 6,
        "changed_at": "2026-12-04T21:13:39.882Z",
        "actor": "ops",
        "counters_reset": [{"limit": "team-day", "reason": "period 1d -> 1h"}],
        "plan": {"name": "team", "limits": []},
        "something_new": 1,
    }
    ch = quotad.PolicyChange.from_json(raw, httpx.Headers({"Idempotent-Replayed": "true", "ETag": '"7"'}))
    assert (ch.version, ch.previous_version, ch.actor, ch.replayed) == (7, 6, "ops", True)
    assert ch.changed_at == dt.datetime(2026, 12, 4, 21, 13, 39, 882000, tzinfo=dt.timezone.utc)
    assert [(r.limit, r.reason) for r in ch.counters_reset] == [("team-day", "period 1d -> 1h")]
    assert ch.plan == {"name": "team", "limits": []} and ch.policy is None and ch.limit is None
    assert ch.raw["something_new"] == 1
    assert quotad.PolicyChange.from_json({"version": 2, "previous_version": 1}).replayed is False
    p = quotad.Policy.from_json({"version": 3, "actor": "file", "policy": {"plans": [{"name": "free"}], "limits": []}})
    assert p.plan("free") == {"name": "free"} and p.plan("pro") is None and p.limit("x") is None
    v = quotad.PolicyVersion.from_json({"version": 1, "changed_at": "2026-12-04T00:00:00Z", "actor": "file"})
    assert (v.version, v.actor, v.changed_at.year) == (1, "file", 2026)


def test_policy_request_building():
    call = _core.put_item_call("plans", "team a", {"limits": []}, 4, None)
    assert (call.method, call.path, call.body) == ("PUT", "/v1/plans/team%20a", {"limits": []})
    assert call.headers["If-Match"] == '"4"' and call.headers["Idempotency-Key"].startswith("qpy-")
    call = _core.delete_item_call("limits", "x", None, "k")
    assert (call.method, call.path, call.headers) == ("DELETE", "/v1/limits/x", {"Idempotency-Key": "k"})
    call = _core.put_policy_call({"plans": []}, None, "k2")
    assert call.body == {"policy": {"plans": []}} and "If-Match" not in call.headers
    assert _core.get_policy_call(None).params is None and _core.get_policy_call(5).params == {"version": "5"}
    for bad in (-1, True, "3", 1.5):
        with pytest.raises(ValueError):
            _core.put_policy_call({}, bad, None)
    with pytest.raises(ValueError):
        _core.put_item_call("plans", "p", ["not", "a", "dict"], None, None)
    with pytest.raises(ValueError):
        _core.get_plan_call("")


def test_finish_carries_the_commit_cost():
    raw = {
        "reservation_id": "res_1",
        "subject": "u",
        "status": "committed",
        "expired": False,
        "held": {"tokens": 100},
        "charged": {"tokens": 40},
        "counters": [],
        "cost": {"amount_micros": 1200, "currency": "USD", "price": "gpt-4o"},
    }
    f = quotad.Finish.from_json(raw)
    assert f.cost is not None and (f.cost.amount_micros, f.cost.currency) == (1200, "USD")
    assert quotad.Finish.from_json({**raw, "cost": None}).cost is None


def test_analytics_requests_and_parsing():
    call = _core.events_call(None, 50, None, "desc", 42)
    assert call.params == {"before": "42", "limit": "50", "order": "desc"}
    assert _core.events_call(7, None, "breaker.*").params == {"after": "7", "type": "breaker.*"}
    with pytest.raises(ValueError):
        _core.events_call(None, None, None, "newest")
    call = _core.usage_call("u:1", dt.date(2026, 1, 1), "2026-02-01", "day", None, "model")
    assert call.params == {"from": "2026-01-01", "to": "2026-02-01", "granularity": "day", "group_by": "model"}
    call = _core.usage_export_call("2026-01-01", "2026-02-01", None, "json", "u:1", "Europe/Paris", 10, "model")
    assert call.params == {
        "from": "2026-01-01",
        "to": "2026-02-01",
        "timezone": "Europe/Paris",
        "format": "json",
        "after": "u:1",
        "limit": "10",
        "group_by": "model",
    }
    call = _core.usage_top_call("tokens", "2026-01-01", "2026-02-01", None, 3)
    assert (call.path, call.params) == ("/v1/usage/top", {"metric": "tokens", "from": "2026-01-01", "to": "2026-02-01", "limit": "3"})
    assert _core.counters_call(0.5, None).params == {"min_fraction": "0.5"}
    assert _core.counters_call(None, None).params == {}
    with pytest.raises(ValueError):
        _core.counters_call("lots", None)  # type: ignore[arg-type]
    assert _core.back_pages_guard(None, 5) and _core.back_pages_guard(9, 5)
    assert not _core.back_pages_guard(5, None) and not _core.back_pages_guard(5, 5)

    page = quotad.EventPage.from_json({"events": [{"seq": 9, "type": "x"}], "next_after": 9, "next_before": 9})
    assert (page.next_after, page.next_before) == (9, 9)
    assert quotad.EventPage.from_json({"events": [], "next_after": 0}).next_before is None
    top = quotad.TopUsage.from_json({"metric": "tokens", "rows": [{"subject": "a", "amount": 5}]})
    assert [(r.subject, r.amount) for r in top] == [("a", 5)] and len(top) == 1
    c = quotad.FullCounter.from_json(
        {"limit": "l", "metric": "tokens", "scope": "a", "max": 10, "used": 12, "remaining": 0, "mode": "monitor", "fraction": 1.2}
    )
    assert isinstance(c, quotad.Counter) and c.fraction == 1.2 and c.used == 12 and c.resets_at is None
    usage = quotad.Usage.from_json(
        {
            "subject": "a",
            "granularity": "day",
            "timezone": "UTC",
            "group_by": "model",
            "buckets": [
                {"start": "2026-01-01T00:00:00Z", "model": "gpt-4o", "amounts": {"tokens": 3}},
                {"start": "2026-01-02T00:00:00Z", "model": "gpt-4o", "amounts": {"tokens": 4}},
                {"start": "2026-01-01T00:00:00Z", "model": None, "amounts": {"tokens": 1}},
            ],
        }
    )
    assert usage.group_by == "model" and [b.group for b in usage.buckets] == ["gpt-4o", "gpt-4o", None]
    assert usage.totals_by_group() == {"gpt-4o": {"tokens": 7}, None: {"tokens": 1}}
    assert usage.totals() == {"tokens": 8}
    rows = quotad.UsagePage.from_json(
        {"rows": [{"subject": "a", "start": "2026-01-01T00:00:00Z", "model": "x", "amounts": {}}], "next_after": None},
        "model",
    )
    assert rows.group_by == "model" and rows.rows[0].group == "x"
    tok = quotad.SubjectToken.from_json({"token": "qst_abc", "subject": "a", "expires_at": "2026-01-01T01:00:00Z"})
    assert tok.expires_at == dt.datetime(2026, 1, 1, 1, tzinfo=dt.timezone.utc) and "qst_abc" not in repr(tok)
