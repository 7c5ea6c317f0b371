"""The account-wide upstream rate limit: a GCRA (token bucket) that queues instead of failing.

Each upstream attempt reserves the next free slot in arrival order, so waiting is fair FIFO. A
request whose slot lies beyond its deadline is refused at once with RateLimitExceeded rather than
timing out later. A 429 from Twilio pushes the next slot back for every caller (``penalize``),
including those already waiting for a slot: they wake, see the pause, and take a new slot after it.

``LocalRateLimiter`` holds the schedule in this process; ``service.shared.RedisRateLimiter`` holds
it in Redis so that every replica draws from one budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from service.deadline import Deadline
from service.errors import RateLimitExceeded


class RateLimiter(Protocol):
    async def acquire(self, deadline: Deadline) -> float:
        """Waits for a slot; returns the seconds waited. Raises RateLimitExceeded."""
        ...

    async def penalize(self, seconds: float) -> None:
        """Twilio said 429: admit nobody for ``seconds``."""
        ...

    async def close(self) -> None: ...


class Unlimited:
    """FLEX_RATE_LIMIT_RPS=0: no local limit (Twilio's own 429s are still retried)."""

    async def acquire(self, deadline: Deadline) -> float:
        return 0.0

    async def penalize(self, seconds: float) -> None:
        return None

    async def close(self) -> None:
        return None


class Gcra:
    """The schedule arithmetic, shared by the local and the Redis limiter (which runs it in Lua).

    ``tat`` is the theoretical arrival time of the next request. A request arriving at ``now``
    may start at ``max(now, tat - tolerance)``; reserving it moves ``tat`` one interval on.
    """

    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.interval = 1.0 / rate_per_second
        self.tolerance = (burst - 1) * self.interval

    def reserve(self, tat: float, now: float) -> tuple[float, float]:
        """(seconds to wait, new tat)."""
        start = max(now, tat - self.tolerance)
        return start - now, max(tat, now) + self.interval

    def penalized(self, tat: float, now: float, seconds: float) -> float:
        return max(tat, now + seconds + self.tolerance)


class QueuedRateLimiter:
    """The waiting shared by both limiters: reserve a slot, sleep until it, and take a new one if
    a 429 pause began meanwhile. Subclasses keep the schedule (``_reserve``, ``_pauses``)."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._sleep = sleep

    async def _reserve(self, max_wait: float) -> tuple[float, int]:
        """Reserves the next slot: (seconds until it, pauses so far). RateLimitExceeded when the
        slot is more than ``max_wait`` away (then nothing is reserved)."""
        raise NotImplementedError

    async def _pauses(self) -> int:
        raise NotImplementedError

    async def acquire(self, deadline: Deadline) -> float:
        waited = 0.0
        while True:
            wait, pauses = await self._reserve(deadline.remaining())
            if wait <= 0:
                return waited
            await self._sleep(wait)
            waited += wait
            if await self._pauses() == pauses:
                return waited
            # Twilio answered 429 while this request waited: queue again, after the pause.


class LocalRateLimiter(QueuedRateLimiter):
    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(sleep)
        self._gcra = Gcra(rate_per_second, burst)
        self._tat = 0.0
        self._pause_count = 0  # how many 429 pauses so far
        self._clock = clock

    async def _reserve(self, max_wait: float) -> tuple[float, int]:
        wait, tat = self._gcra.reserve(self._tat, self._clock())
        if wait > max_wait:
            raise RateLimitExceeded(retry_after=wait)
        self._tat = tat
        return wait, self._pause_count

    async def _pauses(self) -> int:
        return self._pause_count

    async def penalize(self, seconds: float) -> None:
        self._tat = self._gcra.penalized(self._tat, self._clock(), seconds)
        self._pause_count += 1

    async def close(self) -> None:
        return None
