"""check / consume / batch against a real daemon, over TCP and the Unix socket."""

from __future__ import annotations

import math
import time

import pytest

import quotad


def test_consume_allows_counts_and_carries_headers(client, subject):
    d = client.consume(subject, event="llm.chat", amounts={"tokens": 1200})
    assert isinstance(d, quotad.Decision)
    assert d.allowed is True and d.decision == "allow" and not d.denied and not d.degraded
    assert d.subject == subject
    assert d.plan == "free"
    assert d.replayed is False and d.fallback is False
    assert d.reservation_id is None and d.expires_at is None
    assert d.reasons == [] and d.retry_after_ms is None
    tokens = d.counter("tokens-per-day")
    assert tokens is not None
    assert (tokens.metric, tokens.scope, tokens.max, tokens.used, tokens.remaining, tokens.mode) == (
        "tokens",
        subject,
        10000,
        1200,
        8800,
        "enforce",
    )
    assert tokens.resets_at is not None and tokens.resets_at.tzinfo is not None
    assert d.counter("requests-per-day").used == 1
    # Headers: from the matched limit with the least remaining (requests-per-day: 999).
    assert d.limit == 1000 and d.remaining == 999
    assert isinstance(d.reset, int) and d.reset > time.time()
    assert d.retry_after is None
    # The raw answer is kept whole.
    assert d.raw["subject"] == subject and "counters" in d.raw


def test_consume_denied_with_reasons_and_headers(client, subject):
    assert client.consume(subject, amounts={"tokens": 9000}).allowed
    d = client.consume(subject, event="llm.chat", amounts={"tokens": 2000})
    assert d.allowed is False and d.decision == "deny" and d.denied
    assert [(r.limit, r.code) for r in d.reasons] == [("tokens-per-day", "limit_exceeded")]
    assert d.reasons[0].retry_after_ms and d.reasons[0].retry_after_ms > 0
    assert d.retry_after_ms == d.reasons[0].retry_after_ms
    # Headers come from the limit that denied, not from one that passed.
    assert d.limit == 10000 and d.remaining == 1000
    assert d.retry_after == math.ceil(d.retry_after_ms / 1000)
    assert d.reset is not None and d.reset >= int(time.time())
    # A denial charges nothing.
    assert client.subject(subject).counter("tokens-per-day").used == 9000
    with pytest.raises(quotad.Denied) as exc:
        d.raise_if_denied()
    assert "tokens-per-day: limit_exceeded" in str(exc.value)
    assert not isinstance(exc.value, quotad.QuotadError)


def test_check_changes_nothing(client, subject):
    d = client.check(subject, event="llm.chat", amounts={"tokens": 500})
    assert d.allowed and d.counter("tokens-per-day").used == 0
    assert client.subject(subject).counter("tokens-per-day").used == 0
    assert client.check(subject, amounts={"tokens": 20000}).allowed is False


def test_degrade_allows_but_marks(client, subject):
    d = client.consume(subject, event="llm.chat", attributes={"model": "gpt-4o"}, amounts={"tokens": 6000})
    assert d.allowed and d.decision == "degrade" and d.degraded
    assert [(r.limit, r.code) for r in d.reasons] == [("gpt4o-tokens-per-hour", "degraded")]
    assert d.counter("gpt4o-tokens-per-hour").used == 6000
    assert d.counter("gpt4o-tokens-per-hour").remaining == 0


def test_exceeds_capacity_has_no_retry_time(client, subject):
    d = client.consume(subject, amounts={"tokens": 2_000_000})
    assert not d.allowed
    codes = {(r.limit, r.code) for r in d.reasons}
    assert ("global-tokens", "exceeds_capacity") in codes
    assert all(r.retry_after_ms is None for r in d.reasons)
    assert d.retry_after_ms is None and d.retry_after is None


def test_unknown_metric_is_invalid_request(client, subject):
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.consume(subject, amounts={"tokenz": 3})
    e = exc.value
    assert (e.status, e.code) == (400, "unknown_metric")
    assert "tokenz" in e.message and "tokenz" in str(e)
    assert isinstance(e, quotad.QuotadError)


def test_bad_field_is_named(client, subject):
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.consume(subject, amounts={"tokens": -1})
    assert exc.value.code == "invalid_request"
    assert "amounts.tokens" in exc.value.message
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.consume("x" * 300)
    assert "subject" in exc.value.message


def test_client_rejects_empty_subject(client):
    with pytest.raises(ValueError):
        client.consume("")


def test_idempotent_replay_and_conflict(client, subject):
    key = f"order-{subject}"
    first = client.consume(subject, amounts={"tokens": 100}, idempotency_key=key)
    again = client.consume(subject, amounts={"tokens": 100}, idempotency_key=key)
    assert first.replayed is False and again.replayed is True
    assert again.counter("tokens-per-day").used == 100
    assert client.subject(subject).counter("tokens-per-day").used == 100
    with pytest.raises(quotad.Conflict) as exc:
        client.consume(subject, amounts={"tokens": 999}, idempotency_key=key)
    assert (exc.value.status, exc.value.code) == (409, "idempotency_conflict")


def test_generated_keys_are_unique_per_call(client, subject):
    a = client.consume(subject, amounts={"tokens": 10})
    b = client.consume(subject, amounts={"tokens": 10})
    assert not a.replayed and not b.replayed
    assert client.subject(subject).counter("tokens-per-day").used == 20


def test_subjects_with_reserved_characters(client):
    for s in ["org/acme team", "user:ü#1?x=y", "100%"]:
        d = client.consume(s)
        assert d.subject == s
        assert client.subject(s).subject == s


def test_batch(client, subject):
    res = client.batch(
        [
            {"op": "consume", "subject": subject, "amounts": {"tokens": 100}},
            {"op": "check", "subject": subject, "amounts": {"tokens": 1}, "event": None},
            {"op": "reserve", "subject": subject, "amounts": {"tokens": 50}, "ttl_ms": 30000},
            {"op": "commit", "reservation_id": "rsv_does_not_exist"},
            {"op": "bogus"},
            {"op": "consume", "subject": subject, "amounts": {"tokenz": 1}},
        ]
    )
    assert isinstance(res, quotad.BatchResult) and len(res) == 6
    consume, check, reserve, commit, bogus, bad_metric = res
    assert consume.ok and consume.decision.allowed and consume.decision.counter("tokens-per-day").used == 100
    assert consume.op == "consume" and consume.decision.limit is None  # no headers inside a batch
    assert check.ok and check.decision.allowed
    assert reserve.ok and reserve.decision.reservation_id
    assert commit.status == 404 and isinstance(commit.error, quotad.NotFound)
    assert commit.error.code == "unknown_reservation"
    assert bogus.status == 400 and bogus.error.code == "invalid_request" and "op" in bogus.error.message
    assert bad_metric.status == 400 and bad_metric.error.code == "unknown_metric"
    # The reservation made in the batch can be finished in another one.
    res2 = client.batch([{"op": "commit", "reservation_id": reserve.decision.reservation_id, "amounts": {"tokens": 20}}])
    assert res2[0].ok and res2[0].finish.status == "committed" and res2[0].finish.charged["tokens"] == 20
    assert client.subject(subject).counter("tokens-per-day").used == 120


def test_batch_keys_make_retries_safe(client, subject):
    key = f"b-{subject}"
    ops = [{"op": "consume", "subject": subject, "amounts": {"tokens": 7}, "idempotency_key": key}]
    assert client.batch(ops)[0].decision.replayed is False
    assert client.batch(ops)[0].decision.replayed is True
    assert client.subject(subject).counter("tokens-per-day").used == 7


def test_batch_rejects_empty_and_malformed(client):
    with pytest.raises(ValueError):
        client.batch([])
    with pytest.raises(ValueError):
        client.batch([{"subject": "x"}])
