"""Bearer tokens: 401 without or with a wrong token, 403 for a client token on
admin endpoints (a daemon started with [auth] tokens)."""

from __future__ import annotations

import asyncio

import pytest

import quotad
from conftest import ADMIN_TOKEN, CLIENT_TOKEN


def test_no_token_is_unauthorized(auth_daemon, transport, subject):
    with auth_daemon.client(transport) as c:
        with pytest.raises(quotad.Unauthorized) as exc:
            c.consume(subject)
        e = exc.value
        assert (e.status, e.code) == (401, "unauthorized")
        assert "Authorization" in e.message
        # Probes need no token.
        assert c.health() and c.ready()


def test_wrong_token_is_unauthorized(auth_daemon, transport, subject):
    with auth_daemon.client(transport, token="not-a-valid-token-at-all") as c:
        with pytest.raises(quotad.Unauthorized) as exc:
            c.check(subject)
        assert exc.value.code == "unauthorized"


def test_unauthorized_is_not_turned_into_a_fallback(auth_daemon, transport, subject):
    # on_unavailable covers outages only: a bad token must still raise.
    with auth_daemon.client(transport, on_unavailable="allow") as c:
        with pytest.raises(quotad.Unauthorized):
            c.consume(subject)


def test_client_token_decides_but_cannot_administer(auth_daemon, transport, subject):
    with auth_daemon.client(transport, token=CLIENT_TOKEN) as c:
        assert c.consume(subject, amounts={"tokens": 5}).allowed
        with c.reserve(subject, amounts={"tokens": 5}) as hold:
            hold.actual = {"tokens": 3}
        assert c.subject(subject).counter("tokens-per-day").used == 8
        assert c.plans().plans
        assert "quotad_" in c.metrics()
        for call in (
            lambda: c.subjects(),
            lambda: c.set_plan(subject, "pro"),
            lambda: c.reset(subject),
            lambda: c.credit(subject, "image-credits", 1),
            lambda: c.delete_subject(subject),
            lambda: c.reload(),
        ):
            with pytest.raises(quotad.Forbidden) as exc:
                call()
            assert (exc.value.status, exc.value.code) == (403, "forbidden")
            assert "admin" in exc.value.message


def test_admin_token_may_do_everything(auth_daemon, transport, subject):
    with auth_daemon.client(transport, token=ADMIN_TOKEN) as c:
        assert c.consume(subject).allowed
        assert c.set_plan(subject, "pro").plan == "pro"
        assert any(e.subject == subject for e in c.iter_subjects())
        assert c.reload().tokens == 2
        assert c.delete_subject(subject).deleted


def test_async_auth_errors(auth_daemon, transport, subject):
    async def main():
        async with auth_daemon.aclient(transport) as c:
            with pytest.raises(quotad.Unauthorized):
                await c.consume(subject)
        async with auth_daemon.aclient(transport, token=CLIENT_TOKEN) as c:
            assert (await c.consume(subject)).allowed
            with pytest.raises(quotad.Forbidden):
                await c.subjects()

    asyncio.run(main())
