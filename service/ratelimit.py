"""The account-wide upstream rate limit: a GCRA schedule with a FIFO queue in front of it.

Slots are taken only when they come due. Waiters queue in arrival order; only the one at the head
asks the schedule, sleeps until its slot is due, takes it, and hands the head to the next. A
waiter that leaves (cancelled, refused, or its deadline too near) takes nothing with it, so
abandoned calls cost other callers nothing, on this replica or on any other sharing the schedule.

Admission: an attempt starts only if its slot plus ``need`` (the time an upstream round trip is
expected to take) fits the time left. A call whose turn would come too late is refused at once,
RateLimitExceeded with the predicted wait; one whose deadline cannot hold a round trip even with
no wait is DeadlineExceeded. A 429 from Twilio pushes the schedule back for every caller
(``penalize``); the head simply finds its slot later.

``LocalSchedule`` keeps the schedule in this process; ``service.shared.RedisSchedule`` keeps it in
Redis so that every replica draws from one budget.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from .deadline import Deadline
from .errors import CallerQuotaExceeded, DeadlineExceeded, Draining, RateLimitExceeded


class Schedule(Protocol):
    async def take(self) -> float:
        """Takes a slot if one is due now and returns 0; else the seconds until one is."""
        ...

    async def penalize(self, seconds: float) -> None:
        """Twilio said 429: no slot comes due for ``seconds``."""
        ...


class Gcra:
    """The schedule arithmetic, shared by the local and the Redis schedule (which runs it in Lua).

    ``tat`` is the theoretical arrival time of the next request. A slot is due at
    ``tat - tolerance``; taking it moves ``tat`` one interval on.
    """

    # Slots are spaced 5% wider than the rate: a request sent a few milliseconds late (event loop,
    # network) would otherwise put rate + 1 requests into one second at Twilio.
    PACING_MARGIN = 1.05

    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.interval = self.PACING_MARGIN / rate_per_second
        self.tolerance = (burst - 1) * self.interval

    def take(self, tat: float, now: float) -> tuple[float, float]:
        """(seconds until a slot is due, 0 if taken now; the new tat)."""
        due = tat - self.tolerance
        if due > now:
            return due - now, tat
        return 0.0, max(tat, now) + self.interval

    def penalized(self, tat: float, now: float, seconds: float) -> float:
        return max(tat, now + seconds + self.tolerance)


class LocalSchedule:
    def __init__(
        self, rate_per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.gcra = Gcra(rate_per_second, burst)
        self._tat = 0.0
        self._clock = clock

    async def take(self) -> float:
        wait, self._tat = self.gcra.take(self._tat, self._clock())
        return wait

    async def penalize(self, seconds: float) -> None:
        self._tat = self.gcra.penalized(self._tat, self._clock(), seconds)


def require_time_for(need: float, deadline: Deadline) -> None:
    """DeadlineExceeded when the deadline cannot hold an upstream round trip at all."""
    if deadline.remaining() < need:
        raise DeadlineExceeded(
            f"the deadline leaves {deadline.remaining():.2f}s, less than an upstream round trip "
            f"takes (about {need:.2f}s); nothing was sent; retry with a longer deadline"
        )


class _Waiter:
    __slots__ = ("signal",)

    def __init__(self) -> None:
        # True when this waiter reaches the head or the limiter closes; False when its time is up.
        self.signal: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


def _time_up(signal: asyncio.Future[bool]) -> None:
    if not signal.done():
        signal.set_result(False)


class RateLimiter:
    """The FIFO queue in front of a schedule."""

    def __init__(self, schedule: Schedule, interval: float) -> None:
        self._schedule = schedule
        self._interval = interval
        self._queue: deque[_Waiter] = deque()
        self._head_due = 0.0  # monotonic time the head expects its slot
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def acquire(self, deadline: Deadline, need: float = 0.0) -> float:
        """Waits for a slot; returns the seconds waited. Raises RateLimitExceeded,
        DeadlineExceeded or Draining, having taken nothing."""
        if self._closed:
            raise Draining()
        require_time_for(need, deadline)
        started = time.monotonic()
        ahead = len(self._queue)
        if ahead:
            predicted = max(self._head_due - started, 0.0) + ahead * self._interval
            if predicted + need > deadline.remaining():
                raise RateLimitExceeded(retry_after=predicted)
        waiter = _Waiter()
        self._queue.append(waiter)
        try:
            if ahead and not await self._park(waiter, deadline.remaining() - need):
                raise RateLimitExceeded(retry_after=len(self._queue) * self._interval)
            while True:  # at the head (or woken because the limiter closed)
                if self._closed:
                    raise Draining()
                if deadline.remaining() < need:
                    raise RateLimitExceeded(retry_after=len(self._queue) * self._interval)
                wait = await self._schedule.take()
                if wait <= 0:
                    return time.monotonic() - started
                self._head_due = time.monotonic() + wait
                if wait + need > deadline.remaining():
                    raise RateLimitExceeded(retry_after=wait + len(self._queue) * self._interval)
                waiter.signal = asyncio.get_running_loop().create_future()
                await self._park(waiter, wait)
        finally:
            self._leave(waiter)

    @staticmethod
    async def _park(waiter: _Waiter, seconds: float) -> bool:
        """Waits up to ``seconds`` for the waiter's signal: True if it came. One timer and the
        signal itself are all a parked waiter holds (asyncio.wait_for adds a future and more)."""
        signal = waiter.signal
        timer = asyncio.get_running_loop().call_later(max(seconds, 0.0), _time_up, signal)
        try:
            return await signal
        finally:
            timer.cancel()

    def _leave(self, waiter: _Waiter) -> None:
        was_head = self._queue[0] is waiter
        self._queue.remove(waiter)
        if was_head and self._queue and not self._queue[0].signal.done():
            self._queue[0].signal.set_result(True)

    async def penalize(self, seconds: float) -> None:
        await self._schedule.penalize(seconds)

    def close(self) -> None:
        """Draining: refuse every queued waiter and every newcomer, at once."""
        self._closed = True
        for waiter in self._queue:
            if not waiter.signal.done():
                waiter.signal.set_result(True)  # wake: every waiter then sees the limiter closed


class Unlimited:
    """FLEX_RATE_LIMIT_RPS=0: no local limit (Twilio's own 429s are still retried)."""

    async def acquire(self, deadline: Deadline, need: float = 0.0) -> float:
        require_time_for(need, deadline)
        return 0.0

    async def penalize(self, seconds: float) -> None:
        return None

    def close(self) -> None:
        return None


Limiter = RateLimiter | Unlimited


class CallerQuota:
    """At most ``limit`` calls per caller queued or in flight upstream (work that outlived its
    caller included), so that one caller, careless or hostile, cannot fill the queue that every
    caller shares."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending: Counter[str] = Counter()

    def take(self, caller: str) -> Callable[[], None]:
        """Counts one call of ``caller``; the function returned gives it back (call it once)."""
        if self._pending[caller] >= self._limit:
            raise CallerQuotaExceeded(caller, self._limit)
        self._pending[caller] += 1

        def give_back() -> None:
            self._pending[caller] -= 1
            if not self._pending[caller]:
                del self._pending[caller]

        return give_back
