"""AsyncClient against the real daemon, over TCP and the Unix socket."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import quotad


def run(coro):
    return asyncio.run(coro)


def test_async_consume_check_and_headers(daemon, transport, subject):
    async def main():
        async with daemon.aclient(transport) as c:
            d = await c.consume(subject, event="llm.chat", amounts={"tokens": 9000})
            assert d.allowed and d.counter("tokens-per-day").used == 9000
            assert d.limit == 1000 and d.remaining == 999  # least remaining: requests-per-day
            denied = await c.consume(subject, amounts={"tokens": 2000})
            assert not denied.allowed and denied.reasons[0].code == "limit_exceeded"
            assert denied.retry_after is not None and denied.retry_after_ms > 0
            assert denied.limit == 10000 and denied.remaining == 1000  # from the limit that denied
            chk = await c.check(subject, amounts={"tokens": 500})
            assert chk.allowed and chk.counter("tokens-per-day").used == 9000

    run(main())


def test_async_reservation_context_manager(daemon, transport, subject):
    async def main():
        async with daemon.aclient(transport) as c:
            async with c.reserve(subject, event="llm.chat", amounts={"tokens": 4000}) as hold:
                assert isinstance(hold, quotad.AsyncReservation)
                assert (await c.subject(subject)).counter("tokens-per-day").used == 4000
                hold.actual = {"tokens": 2630}
            assert hold.result.status == "committed" and hold.result.charged["tokens"] == 2630
            assert (await c.subject(subject)).counter("tokens-per-day").used == 2630

            with pytest.raises(ValueError):
                async with c.reserve(subject, amounts={"tokens": 1000}) as hold2:
                    raise ValueError("boom")
            assert hold2.result.status == "released"
            assert (await c.subject(subject)).counter("tokens-per-day").used == 2630

            hold3 = await c.reserve(subject, amounts={"tokens": 100}, ttl_ms=5000)
            assert hold3.reservation_id
            fin = await hold3.commit({"tokens": 1})
            assert fin.charged["tokens"] == 1
            hold4 = await c.reserve(subject, amounts={"tokens": 100})
            assert (await hold4.release()).status == "released"

    run(main())


def test_async_denied_and_errors(daemon, transport, subject):
    async def main():
        async with daemon.aclient(transport) as c:
            with pytest.raises(quotad.Denied) as exc:
                async with c.reserve(subject, amounts={"tokens": 50000}):
                    pytest.fail("must not run")
            assert exc.value.decision.reasons[0].code == "exceeds_capacity"
            with pytest.raises(quotad.InvalidRequest) as e2:
                await c.consume(subject, amounts={"bogus": 1})
            assert e2.value.code == "unknown_metric"
            with pytest.raises(quotad.NotFound) as e3:
                await c.release("rsv_nope")
            assert e3.value.code == "unknown_reservation"
            key = f"k-{subject}"
            a = await c.consume(subject, idempotency_key=key)
            b = await c.consume(subject, idempotency_key=key)
            assert not a.replayed and b.replayed

    run(main())


def test_async_batch_and_admin(daemon, transport, subject):
    async def main():
        async with daemon.aclient(transport) as c:
            res = await c.batch(
                [
                    {"op": "consume", "subject": subject, "amounts": {"tokens": 10}},
                    {"op": "release", "reservation_id": "rsv_nope"},
                ]
            )
            assert res[0].decision.allowed and res[1].error.code == "unknown_reservation"
            s = await c.set_plan(subject, "pro", overrides={"tokens-per-day": 777})
            assert s.plan == "pro" and s.counter("tokens-per-day").max == 777
            s = await c.reset(subject, "tokens-per-day")
            assert s.counter("tokens-per-day").used == 0
            s = await c.credit(subject, "image-credits", 5)
            assert s.counter("image-credits").max == 105
            prefix = f"apage:{uuid.uuid4().hex[:8]}:"
            for i in range(3):
                await c.set_plan(f"{prefix}{i}", "pro")
            seen = [e.subject async for e in c.iter_subjects(after=prefix, page_size=2) if e.subject.startswith(prefix)]
            assert seen == [f"{prefix}{i}" for i in range(3)]
            assert (await c.plans()).plan("pro") is not None
            assert (await c.reload()).plans == 2
            assert await c.health() and await c.ready()
            assert "quotad_" in await c.metrics()
            assert (await c.delete_subject(subject)).deleted

    run(main())


def test_async_concurrent_consumes_are_exact(daemon, transport, subject):
    async def main():
        async with daemon.aclient(transport) as c:
            results = await asyncio.gather(*(c.consume(subject, amounts={"tokens": 1000}) for _ in range(15)))
            assert sum(1 for d in results if d.allowed) == 10
            assert (await c.subject(subject)).counter("tokens-per-day").used == 10000

    run(main())
