"""``nebula.service.DecisionLock``: one signing decision at a time per chain.

An asyncio lock (first come, first served; a released lock goes to the first waiter)
that ``SigningService.begin`` can also take without waiting.  A waiter cancelled before
its turn is skipped; one cancelled after it was handed the lock passes it on."""

from __future__ import annotations

import asyncio

import pytest

from nebula.service import DecisionLock


def test_try_acquire_takes_a_free_lock_only() -> None:
    lock = DecisionLock()
    assert not lock.locked()
    assert lock.try_acquire()
    assert lock.locked()
    assert not lock.try_acquire()
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="not acquired"):
        lock.release()


def test_waiters_get_the_lock_in_arrival_order_and_no_one_barges_in() -> None:
    async def body() -> list[int]:
        lock = DecisionLock()
        order: list[int] = []
        assert lock.try_acquire()

        async def user(k: int) -> None:
            async with lock:
                order.append(k)
                await asyncio.sleep(0)

        tasks = [asyncio.ensure_future(user(k)) for k in range(4)]
        await asyncio.sleep(0)  # all four wait
        lock.release()
        # Handed straight to the first waiter: still held, try_acquire cannot barge in.
        assert lock.locked() and not lock.try_acquire()
        await asyncio.gather(*tasks)
        assert not lock.locked()
        return order

    assert asyncio.run(body()) == [0, 1, 2, 3]


def test_a_waiter_cancelled_before_its_turn_is_skipped() -> None:
    async def body() -> list[str]:
        lock = DecisionLock()
        got: list[str] = []
        await lock.acquire()

        async def user(name: str) -> None:
            async with lock:
                got.append(name)

        a = asyncio.ensure_future(user("a"))
        b = asyncio.ensure_future(user("b"))
        await asyncio.sleep(0)
        a.cancel()
        await asyncio.sleep(0)
        lock.release()
        await b
        assert a.cancelled()
        assert not lock.locked()
        return got

    assert asyncio.run(body()) == ["b"]


def test_a_waiter_cancelled_after_it_was_handed_the_lock_passes_it_on() -> None:
    async def body() -> list[str]:
        lock = DecisionLock()
        got: list[str] = []
        await lock.acquire()

        async def user(name: str) -> None:
            async with lock:
                got.append(name)

        a = asyncio.ensure_future(user("a"))
        b = asyncio.ensure_future(user("b"))
        await asyncio.sleep(0)
        lock.release()  # handed to a ...
        a.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(a, b, return_exceptions=True)
        assert a.cancelled()
        assert not lock.locked()  # b had it and released it: nothing leaked
        return got

    assert asyncio.run(body()) == ["b"]
