"""The account-wide limiter: the GCRA schedule on a fake clock, and the queue in front of it on
real (short) time: callers served in turn, fast refusal, and waiters that leave taking nothing
with them."""

from __future__ import annotations

import asyncio

import pytest

from service.deadline import Deadline
from service.errors import CallerQuotaExceeded, DeadlineExceeded, Draining, RateLimitExceeded
from service.ratelimit import CallerQuota, LocalSchedule, RateLimiter, Unlimited


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def takes(schedule: LocalSchedule, clock: FakeClock, count: int) -> list[float]:
    """When each of ``count`` back-to-back requests gets its slot (seconds from now)."""
    start, times = clock.now, []
    for _ in range(count):
        while (wait := (await schedule.take())[0]) > 0:
            clock.now += wait
        times.append(round(clock.now - start, 6))
    return times


async def test_slots_are_spaced_by_the_rate_with_a_margin() -> None:
    clock = FakeClock()
    # 5/s paced at 0.21 s: six requests never fall within one second, even a little late.
    times = await takes(LocalSchedule(5, 1, clock), clock, 6)
    assert times == pytest.approx([0, 0.21, 0.42, 0.63, 0.84, 1.05])


async def test_burst_goes_at_once_then_the_rate_applies() -> None:
    clock = FakeClock()
    schedule = LocalSchedule(5, 3, clock)
    assert await takes(schedule, clock, 5) == pytest.approx([0, 0, 0, 0.21, 0.42])


async def test_a_slot_not_yet_due_is_not_taken() -> None:
    clock = FakeClock()
    schedule = LocalSchedule(5, 1, clock)
    assert await schedule.take(["a"]) == (0, "a")
    assert await schedule.take(["a"]) == (pytest.approx(0.21), "")
    assert await schedule.take(["a"]) == (pytest.approx(0.21), "")  # asking again takes nothing
    clock.now += 0.21
    assert await schedule.take(["b", "a"]) == (0, "b")  # the first caller asking: the head's


async def test_a_429_slows_everybody_down() -> None:
    clock = FakeClock()
    schedule = LocalSchedule(5, 1, clock)
    await schedule.take()
    await schedule.penalize(3.0)
    assert (await schedule.take())[0] == pytest.approx(3.0)


async def test_idle_time_does_not_bank_more_than_the_burst() -> None:
    clock = FakeClock()
    schedule = LocalSchedule(5, 2, clock)
    clock.now += 3600
    assert await takes(schedule, clock, 3) == pytest.approx([0, 0, 0.21])


def limiter(rate: float = 20) -> RateLimiter:
    schedule = LocalSchedule(rate, 1)
    return RateLimiter(schedule, schedule.gcra.interval)


async def test_waiters_are_served_in_arrival_order() -> None:
    lim, order = limiter(), []

    async def call(n: int) -> None:
        await lim.acquire(Deadline.after(10))
        order.append(n)

    await asyncio.gather(*(call(n) for n in range(8)))
    assert order == list(range(8))


async def test_callers_are_served_in_turn_each_in_its_own_order() -> None:
    lim, order = limiter(), []

    async def call(caller: str, n: int) -> None:
        await lim.acquire(Deadline.after(10), caller=caller)
        order.append(f"{caller}{n}")

    flood = [asyncio.create_task(call("a", n)) for n in range(6)]
    await asyncio.sleep(0)  # a0 has the slot now; a1..a5 are queued
    others = [asyncio.create_task(call(c, n)) for c in "bc" for n in range(2)]
    await asyncio.gather(*flood, *others)
    assert order == ["a0", "a1", "b0", "c0", "a2", "b1", "c1", "a3", "a4", "a5"]


async def test_a_call_is_admitted_by_its_own_place_not_the_queue_length() -> None:
    lim = limiter(rate=5)
    flood = [asyncio.create_task(lim.acquire(Deadline.after(60), caller="a")) for _ in range(50)]
    await asyncio.sleep(0)
    # Ten seconds of queue, all one caller's: another caller's turn is one slot away.
    waited = await lim.acquire(Deadline.after(1.0), caller="b")
    assert waited < 1.0
    with pytest.raises(RateLimitExceeded):  # while the flooder's own next call waits its turn
        await lim.acquire(Deadline.after(1.0), caller="a")
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    assert lim.queued == 0


async def test_admission_counts_the_callers_waiting_on_other_replicas() -> None:
    """With callers waiting elsewhere too, this replica gets a slot only at its callers' turns:
    a place one slot away here is further in time, and admission says so."""

    async def second_caller_with(contenders: int) -> bool:
        schedule = LocalSchedule(5, 1)
        schedule.contenders = contenders  # as a shared schedule reports it
        lim = RateLimiter(schedule, schedule.gcra.interval)
        await lim.acquire(Deadline.after(10), caller="a")
        flood = [asyncio.create_task(lim.acquire(Deadline.after(10), caller="a")) for _ in range(2)]
        await asyncio.sleep(0)  # the head has asked: its slot is 0.21 s away
        try:
            # Place 1: 0.42 s away alone; 0.63 s with two more callers waiting elsewhere.
            await lim.acquire(Deadline.after(0.55), caller="b")
            return True
        except RateLimitExceeded:
            return False
        finally:
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)

    assert await second_caller_with(contenders=0)
    assert not await second_caller_with(contenders=4)


async def test_a_turn_beyond_the_deadline_is_refused_at_once_without_queueing() -> None:
    lim = limiter(rate=5)
    queued = [asyncio.create_task(lim.acquire(Deadline.after(10))) for _ in range(5)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimitExceeded) as refused:
        await lim.acquire(Deadline.after(0.5))
    assert 0.5 < refused.value.retry_after <= 1.1
    assert lim.queued == 4  # the refused call never joined the queue
    await asyncio.gather(*queued)


async def test_a_deadline_too_short_for_a_round_trip_is_deadline_exceeded() -> None:
    with pytest.raises(DeadlineExceeded, match="round trip"):
        await limiter().acquire(Deadline.after(0.2), need=0.3)
    with pytest.raises(DeadlineExceeded):
        await Unlimited().acquire(Deadline.after(0.2), need=0.3)


async def test_cancelled_waiters_give_their_turns_back() -> None:
    """150 callers queue and leave: a later caller is served as if they had never come."""
    lim = limiter(rate=10)
    await lim.acquire(Deadline.after(10))  # the slot now is used: everyone else must wait
    leavers = [asyncio.create_task(lim.acquire(Deadline.after(60))) for _ in range(150)]
    await asyncio.sleep(0.01)
    assert lim.queued == 150
    for task in leavers:
        task.cancel()
    await asyncio.gather(*leavers, return_exceptions=True)
    assert lim.queued == 0
    # One interval (0.1 s) away, not 15 s: admitted with a 1 s deadline.
    waited = await lim.acquire(Deadline.after(1.0))
    assert waited < 1.0


async def test_a_turn_leaving_too_little_time_for_the_round_trip_is_refused() -> None:
    lim = limiter(rate=2)
    await lim.acquire(Deadline.after(10))
    first = asyncio.create_task(lim.acquire(Deadline.after(10)))
    await asyncio.sleep(0)
    # Predicted to fit (0.5 s away) but with need=0.45 its turn comes too late: refused then.
    with pytest.raises(RateLimitExceeded):
        await lim.acquire(Deadline.after(1.3), need=0.45)
    assert await first < 1.0
    assert lim.queued == 0


async def test_drain_refuses_queued_waiters_at_once() -> None:
    lim = limiter(rate=1)
    await lim.acquire(Deadline.after(10))
    queued = [asyncio.create_task(lim.acquire(Deadline.after(30))) for _ in range(3)]
    await asyncio.sleep(0.01)
    lim.close()
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 1)
    assert all(isinstance(r, Draining) for r in results)
    with pytest.raises(Draining):
        await lim.acquire(Deadline.after(30))


def test_caller_quota_caps_one_caller_and_not_the_others() -> None:
    quota = CallerQuota(2)
    first, _ = quota.take("a"), quota.take("a")
    with pytest.raises(CallerQuotaExceeded):
        quota.take("a")
    quota.take("b")  # another caller is not affected
    first()  # a call of "a" ended (its work included): room for one more
    quota.take("a")
    with pytest.raises(CallerQuotaExceeded):
        quota.take("a")


def test_a_call_without_deadline_gets_the_default_and_none_exceeds_the_maximum() -> None:
    assert Deadline.for_call(None, default=30, maximum=60).remaining() == pytest.approx(30, abs=0.1)
    assert Deadline.for_call(500, default=30, maximum=60).remaining() == pytest.approx(60, abs=0.1)
    assert Deadline.for_call(0.5, default=30, maximum=60).remaining() == pytest.approx(0.5, abs=0.1)
