"""Subjects and administration."""

from __future__ import annotations

import uuid

import pytest

import quotad


def test_subject_of_unassigned(client, subject):
    s = client.subject(subject)
    assert isinstance(s, quotad.Subject)
    assert (s.subject, s.plan, s.assigned, s.overrides) == (subject, "free", False, {})
    assert {c.limit for c in s.counters} >= {"tokens-per-day", "requests-per-day", "image-credits", "global-tokens"}
    credits = s.counter("image-credits")
    assert credits.resets_at is None and credits.max == 3


def test_set_plan_with_overrides(client, subject):
    client.consume(subject, amounts={"tokens": 1234})
    s = client.set_plan(subject, "pro", overrides={"tokens-per-day": 50000})
    assert (s.plan, s.assigned) == ("pro", True)
    assert s.overrides == {"tokens-per-day": {"max": 50000}}
    c = s.counter("tokens-per-day")
    assert (c.max, c.used) == (50000, 1234)  # usage kept across plan change
    # Fields left out are kept; the long form works too.
    s = client.set_plan(subject, overrides={"requests-per-day": {"max": "unlimited"}})
    assert s.plan == "pro"
    assert s.counter("requests-per-day").max == "unlimited" and s.counter("requests-per-day").unlimited
    assert s.counter("requests-per-day").remaining is None


def test_set_plan_unknown_plan(client, subject):
    with pytest.raises(quotad.NotFound) as exc:
        client.set_plan(subject, "platinum")
    assert exc.value.code == "unknown_plan" and "platinum" in exc.value.message


def test_admin_write_replay(client, subject):
    key = f"put-{subject}"
    a = client.set_plan(subject, "pro", idempotency_key=key)
    b = client.set_plan(subject, "pro", idempotency_key=key)
    assert a.replayed is False and b.replayed is True
    with pytest.raises(quotad.Conflict):
        client.set_plan(subject, "free", idempotency_key=key)


def test_reset_one_and_all(client, subject):
    client.consume(subject, amounts={"tokens": 300})
    s = client.reset(subject, "tokens-per-day")
    assert s.counter("tokens-per-day").used == 0
    assert s.counter("requests-per-day").used == 1
    s = client.reset(subject)
    assert s.counter("requests-per-day").used == 0
    with pytest.raises(quotad.NotFound) as exc:
        client.reset(subject, "no-such-limit")
    assert exc.value.code == "unknown_limit"


def test_lifetime_credit(client, subject):
    for _ in range(3):
        assert client.consume(subject, event="image.render").allowed
    d = client.consume(subject, event="image.render")
    assert not d.allowed and d.reasons[0].limit == "image-credits"
    assert d.retry_after_ms is None  # lifetime: no retry time
    s = client.credit(subject, "image-credits", 2)
    assert s.counter("image-credits").max == 5
    assert client.consume(subject, event="image.render").allowed
    with pytest.raises(quotad.NotFound) as exc:
        client.credit(subject, "nope", 1)
    assert exc.value.code == "unknown_limit"
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.credit(subject, "image-credits", 0)
    assert "amount" in exc.value.message


def test_delete_subject(client, subject):
    client.set_plan(subject, "pro")
    r = client.delete_subject(subject)
    assert isinstance(r, quotad.Deleted) and r.subject == subject and r.deleted is True
    assert client.subject(subject).plan == "free"
    assert subject not in {e.subject for e in client.iter_subjects()}


def test_subjects_pages_and_iterator(client):
    prefix = f"page:{uuid.uuid4().hex[:8]}:"
    names = [f"{prefix}{i}" for i in range(5)]
    for n in names:
        client.set_plan(n, "pro")
    page = client.subjects(after=prefix, limit=2)
    assert isinstance(page, quotad.SubjectPage)
    assert [e.subject for e in page.subjects] == names[:2]
    assert page.subjects[0].plan == "pro"
    assert page.next_after == names[1]
    seen = [e.subject for e in client.iter_subjects(after=prefix, page_size=2) if e.subject.startswith(prefix)]
    assert seen == names
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.subjects(limit=0)
    assert "limit" in exc.value.message


def test_plans(client):
    p = client.plans()
    assert [x.name for x in p.plans] == ["free", "pro"]
    assert p.plan("free").default is True and p.plan("pro").default is False
    assert "tokens-per-day" in {lim["name"] for lim in p.plan("free").limits}
    assert [lim["name"] for lim in p.limits] == ["global-tokens"]
    assert "cost_micros" in p.metrics


def test_reload(client):
    r = client.reload()
    assert isinstance(r, quotad.ReloadReport)
    assert (r.plans, r.restart_required) == (2, [])
    assert r.limits >= 4


def test_health_ready_metrics_digest(client, subject):
    assert client.health() is True
    assert client.ready() is True
    client.wait_ready(timeout=5)
    client.consume(subject)
    text = client.metrics()
    assert "quotad_decisions_total" in text
    assert isinstance(client.digest(), dict)


def test_generic_request(client):
    assert client.request("GET", "/healthz") == {"status": "ok"}
    with pytest.raises(quotad.QuotadError) as exc:
        client.request("PATCH", "/v1/plans")
    assert exc.value.status == 405
