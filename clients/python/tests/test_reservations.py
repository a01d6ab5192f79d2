"""reserve -> commit / release, and the Reservation context manager."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import quotad


def used(client, subject, limit="tokens-per-day"):
    return client.subject(subject).counter(limit).used


def test_reserve_then_commit_less(client, subject):
    hold = client.reserve(subject, event="llm.chat", amounts={"tokens": 4000}, ttl_ms=30000)
    assert isinstance(hold, quotad.Reservation)
    assert hold.reservation_id and hold.reservation_id.startswith("rsv_")
    assert hold.decision.allowed and hold.decision.reservation_id == hold.reservation_id
    assert hold.expires_at is not None
    now = datetime.now(timezone.utc)
    assert now < hold.expires_at <= now + timedelta(seconds=31)
    assert used(client, subject) == 4000  # held counts as used
    fin = hold.commit({"tokens": 2630})
    assert isinstance(fin, quotad.Finish)
    assert (fin.status, fin.expired, fin.subject) == ("committed", False, subject)
    assert fin.held == {"requests": 1, "tokens": 4000}
    assert fin.charged == {"requests": 1, "tokens": 2630}
    assert used(client, subject) == 2630
    assert hold.finished and hold.result is fin


def test_reserve_then_release(client, subject):
    hold = client.reserve(subject, amounts={"tokens": 3000})
    fin = hold.release()
    assert fin.status == "released" and fin.charged == {}
    assert used(client, subject) == 0


def test_context_manager_commits_actual(client, subject):
    with client.reserve(subject, event="llm.chat", amounts={"tokens": 4000}) as hold:
        assert used(client, subject) == 4000
        hold.actual = {"tokens": 1000}
    assert hold.result.status == "committed"
    assert hold.result.charged["tokens"] == 1000
    assert used(client, subject) == 1000


def test_context_manager_commits_held_by_default(client, subject):
    with client.reserve(subject, amounts={"tokens": 700}) as hold:
        pass
    assert hold.result.status == "committed" and hold.result.charged["tokens"] == 700
    assert used(client, subject) == 700


def test_context_manager_releases_on_exception(client, subject):
    with pytest.raises(RuntimeError, match="model failed"):
        with client.reserve(subject, amounts={"tokens": 4000}) as hold:
            assert used(client, subject) == 4000
            raise RuntimeError("model failed")
    assert hold.result.status == "released"
    assert used(client, subject) == 0


def test_manual_commit_inside_block_is_not_repeated(client, subject):
    with client.reserve(subject, amounts={"tokens": 500}) as hold:
        first = hold.commit({"tokens": 200})
    assert hold.result is first
    assert used(client, subject) == 200


def test_denied_reserve_raises(client, subject):
    client.consume(subject, amounts={"tokens": 9500})
    with pytest.raises(quotad.Denied) as exc:
        with client.reserve(subject, amounts={"tokens": 4000}):
            pytest.fail("the block must not run when denied")
    d = exc.value.decision
    assert d.allowed is False and d.reservation_id is None
    assert [r.code for r in exc.value.reasons] == ["limit_exceeded"]
    assert exc.value.retry_after_ms and exc.value.retry_after_ms > 0
    assert d.retry_after is not None
    assert not isinstance(exc.value, quotad.QuotadError)
    assert used(client, subject) == 9500


def test_finishing_rules(client, subject):
    hold = client.reserve(subject, amounts={"tokens": 100})
    a = client.commit(hold.reservation_id, {"tokens": 50})
    b = client.commit(hold.reservation_id, {"tokens": 50})  # the same commit again: same answer
    assert a.raw == b.raw
    with pytest.raises(quotad.Conflict) as exc:
        client.release(hold.reservation_id)
    assert exc.value.code == "reservation_finished"
    with pytest.raises(quotad.Conflict) as exc:
        client.commit(hold.reservation_id, {"tokens": 60})
    assert exc.value.code == "reservation_finished"
    with pytest.raises(quotad.NotFound) as exc:
        client.commit("rsv_unknown")
    assert (exc.value.status, exc.value.code) == (404, "unknown_reservation")


def test_reservation_finishing_twice_locally_is_a_noop(client, subject):
    hold = client.reserve(subject, amounts={"tokens": 100})
    first = hold.release()
    assert hold.release() is first
    assert hold.commit() is first


def test_reserve_idempotent_replay(client, subject):
    key = f"rsv-{subject}"
    a = client.reserve(subject, amounts={"tokens": 10}, idempotency_key=key)
    b = client.reserve(subject, amounts={"tokens": 10}, idempotency_key=key)
    assert b.decision.replayed and b.reservation_id == a.reservation_id
    assert used(client, subject) == 10
    a.release()


def test_ttl_above_maximum_is_rejected(client, subject):
    with pytest.raises(quotad.InvalidRequest) as exc:
        client.reserve(subject, ttl_ms=10 * 3600 * 1000)
    assert "ttl_ms" in exc.value.message
