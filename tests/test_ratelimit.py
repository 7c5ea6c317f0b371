"""The local GCRA limiter, on a fake clock: FIFO slots, fast refusal, shared slow-down on 429."""

from __future__ import annotations

import pytest

from service.deadline import Deadline
from service.errors import RateLimitExceeded
from service.ratelimit import LocalRateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def limiter(clock: FakeClock, rate: float = 5, burst: int = 1) -> LocalRateLimiter:
    return LocalRateLimiter(rate, burst, clock=clock, sleep=clock.sleep)


async def test_requests_are_spaced_in_arrival_order() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    waits = [await lim.acquire(Deadline.after(60)) for _ in range(5)]
    assert waits == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])


async def test_burst_goes_at_once_then_the_rate_applies() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=5, burst=3)
    waits = [await lim.acquire(Deadline.after(60)) for _ in range(5)]
    assert waits == pytest.approx([0, 0, 0, 0.2, 0.4])


async def test_a_wait_beyond_the_deadline_is_refused_at_once_without_taking_a_slot() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    for _ in range(5):
        await lim.acquire(Deadline.after(60))
    with pytest.raises(RateLimitExceeded) as caught:
        await lim.acquire(Deadline.after(0.5))
    assert caught.value.retry_after == pytest.approx(1.0)
    # The refused request did not consume the slot: the next one gets it.
    assert await lim.acquire(Deadline.after(60)) == pytest.approx(1.0)


async def test_a_429_slows_everybody_down() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    await lim.acquire(Deadline.after(60))
    await lim.penalize(3.0)
    assert await lim.acquire(Deadline.after(60)) == pytest.approx(3.0)


async def test_idle_time_does_not_bank_more_than_the_burst() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=5, burst=2)
    clock.now += 3600
    waits = [await lim.acquire(Deadline.after(60)) for _ in range(3)]
    assert waits == pytest.approx([0, 0, 0.2])


async def test_requests_already_waiting_queue_again_after_a_429() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    await lim.acquire(Deadline.after(60))  # slot at 0: sent, and answered 429
    real_sleep = clock.sleep

    async def sleep_through_a_429(seconds: float) -> None:
        await real_sleep(seconds)
        clock.now += seconds
        if len(clock.sleeps) == 1:
            await lim.penalize(2.0)  # arrives while the second request waits for its slot

    lim._sleep = sleep_through_a_429
    waited = await lim.acquire(Deadline.after(60))
    assert clock.sleeps == pytest.approx([0.2, 2.0])  # its old slot, then a new one after the pause
    assert waited == pytest.approx(2.2)


def test_a_call_without_deadline_gets_the_default_and_none_exceeds_the_maximum() -> None:
    assert Deadline.for_call(None, default=30, maximum=60).remaining() == pytest.approx(30, abs=0.1)
    assert Deadline.for_call(500, default=30, maximum=60).remaining() == pytest.approx(60, abs=0.1)
    assert Deadline.for_call(0.5, default=30, maximum=60).remaining() == pytest.approx(0.5, abs=0.1)
