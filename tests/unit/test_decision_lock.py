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


@pytest.mark.parametrize("handed", [False, True], ids=["before-its-turn", "after-handed"])
def test_a_cancelled_waiter_is_skipped_or_passes_the_lock_on(handed: bool) -> None:
    """Cancelled before its turn: release skips it.  Cancelled after release handed it the
    lock (before it ran): it passes the lock on.  Either way b gets it, nothing leaks."""

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
        if handed:
            lock.release()  # handed to a ...
            a.cancel()  # ... which is cancelled before it runs
        else:
            a.cancel()
            await asyncio.sleep(0)
            lock.release()
        # A lock that leaked would leave b waiting: fail, do not hang.
        await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 5)
        assert a.cancelled()
        assert not lock.locked()
        return got

    assert asyncio.run(body()) == ["b"]
