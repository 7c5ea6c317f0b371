"""The account-wide upstream rate limit: a GCRA schedule with a fair queue in front of it.

Slots are taken only when they come due. Waiters queue with callers served in turn (each caller's
calls in its own order); only the one at the head asks the schedule, sleeps until its slot is due,
takes it, and hands the head to the next. A waiter that leaves (cancelled, refused, or its
deadline too near) takes nothing with it, so abandoned calls cost other callers nothing, on this
replica or on any other sharing the schedule.

Admission: an attempt starts only if its slot plus ``need`` (the time an upstream round trip is
expected to take) fits the time left. A call whose turn, by its own place in the order, would come
too late is refused at once, RateLimitExceeded with the predicted wait; one whose deadline cannot
hold a round trip even with no wait is DeadlineExceeded. A 429 from Twilio pushes the schedule
back for every caller (``penalize``); the head simply finds its slot later.

``LocalSchedule`` keeps the schedule in this process; ``service.shared.RedisSchedule`` keeps it in
Redis so that every replica draws from one budget.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from .deadline import Deadline
from .errors import CallerQuotaExceeded, DeadlineExceeded, Draining, RateLimitExceeded


class Schedule(Protocol):
    # Callers with calls waiting on every replica that shares the schedule, as last seen; 0 when
    # the schedule is this replica's alone.
    contenders: int

    async def take(self, callers: Sequence[str]) -> tuple[float, str]:
        """Takes a slot if one is due now for one of ``callers`` (those with calls waiting here,
        the head's first) and returns (0, the caller it is for); else (the seconds until one may
        be, "")."""
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
    """This replica's schedule: the queue's order alone says whose turn it is."""

    contenders = 0

    def __init__(
        self, rate_per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.gcra = Gcra(rate_per_second, burst)
        self._tat = 0.0
        self._clock = clock

    async def take(self, callers: Sequence[str] = ("",)) -> tuple[float, str]:
        wait, self._tat = self.gcra.take(self._tat, self._clock())
        return wait, "" if wait > 0 else callers[0]

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
    __slots__ = ("caller", "deadline", "granted", "need", "order", "signal")

    def __init__(
        self, caller: str, order: tuple[int, int], deadline: Deadline, need: float
    ) -> None:
        self.caller = caller
        self.order = order  # (round, arrival): the queue is sorted by it
        self.deadline = deadline
        self.need = need
        self.granted = False  # the head took a slot for this waiter's caller and gave it here
        # True when this waiter may be at the head, is granted a slot, or the limiter closes;
        # False when its time is up.
        self.signal: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def can_start(self) -> bool:
        return self.deadline.remaining() >= self.need


def _order(waiter: _Waiter) -> tuple[int, int]:
    return waiter.order


def _time_up(signal: asyncio.Future[bool]) -> None:
    if not signal.done():
        signal.set_result(False)


class RateLimiter:
    """The queue in front of a schedule, serving callers in turn (start-time fair queueing).

    Each call gets a round: one past its caller's previous queued call, and never earlier than
    the round being served. Calls are served by round, and within a round in arrival order, so
    each caller's calls keep their order and a caller with one call waits behind one call of each
    other active caller, however many those have queued. A call is admitted by its own place in
    that order.

    The head asks the schedule for a slot on behalf of every caller waiting here; a shared
    schedule answers which caller's turn it is across the replicas, and the slot goes to that
    caller's first call here."""

    def __init__(self, schedule: Schedule, interval: float) -> None:
        self._schedule = schedule
        self._interval = interval
        self._queue: list[_Waiter] = []  # sorted by order; the head asks the schedule
        self._round = 0  # the round of the call served last
        self._last_round: dict[str, int] = {}  # each queued caller's latest round
        self._queued: Counter[str] = Counter()
        self._arrivals = 0
        self._head_due = 0.0  # monotonic time the head expects its slot
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def acquire(self, deadline: Deadline, need: float = 0.0, caller: str = "") -> float:
        """Waits for a slot; returns the seconds waited. Raises RateLimitExceeded,
        DeadlineExceeded or Draining, having taken nothing."""
        if self._closed:
            raise Draining()
        require_time_for(need, deadline)
        started = time.monotonic()
        self._arrivals += 1
        order = (max(self._round, self._last_round.get(caller, 0)) + 1, self._arrivals)
        ahead = bisect.bisect_left(self._queue, order, key=_order)
        if ahead:
            predicted = max(self._head_due - started, 0.0) + ahead * self._spacing(caller)
            if predicted + need > deadline.remaining():
                raise RateLimitExceeded(retry_after=predicted)
        waiter = self._enter(_Waiter(caller, order, deadline, need), ahead)
        try:
            while not waiter.granted:
                if self._closed:
                    raise Draining()
                if self._queue[0] is not waiter:  # another's turn: wait to be the head or granted
                    waiter.signal = asyncio.get_running_loop().create_future()
                    came = await self._park(waiter, deadline.remaining() - need)
                    if not came and not waiter.granted:
                        raise RateLimitExceeded(retry_after=self._place(waiter) * self._interval)
                    continue
                if deadline.remaining() < need:
                    raise RateLimitExceeded(retry_after=len(self._queue) * self._interval)
                wait, turn = await self._schedule.take(self._callers(waiter))
                if wait <= 0:
                    self._grant(turn, waiter)
                    continue  # this waiter's slot, or ask again (a burst may hold another)
                self._head_due = time.monotonic() + wait
                if wait + need > deadline.remaining():
                    raise RateLimitExceeded(retry_after=wait + len(self._queue) * self._interval)
                waiter.signal = asyncio.get_running_loop().create_future()
                await self._park(waiter, wait)  # woken early if the head changes or we close
            return time.monotonic() - started
        finally:
            self._leave(waiter)

    def _spacing(self, caller: str) -> float:
        """The expected time between slots for this replica's queue: one interval, or more while
        callers waiting on other replicas take their turns too."""
        here = len(self._queued) + (caller not in self._queued)
        return self._interval * max(1.0, self._schedule.contenders / here)

    def _callers(self, head: _Waiter) -> list[str]:
        """Every caller waiting here, the head's first."""
        return [head.caller, *(caller for caller in self._queued if caller != head.caller)]

    def _grant(self, caller: str, head: _Waiter) -> None:
        """Gives the slot just taken to ``caller``'s first call here that can still use it (to
        the head's when none can)."""
        chosen = next((w for w in self._queue if w.caller == caller and w.can_start()), head)
        chosen.granted = True
        self._round = max(self._round, chosen.order[0])
        if not chosen.signal.done():
            chosen.signal.set_result(True)

    def _enter(self, waiter: _Waiter, place: int) -> _Waiter:
        self._queue.insert(place, waiter)
        self._last_round[waiter.caller] = waiter.order[0]
        self._queued[waiter.caller] += 1
        return waiter

    def _place(self, waiter: _Waiter) -> int:
        return bisect.bisect_left(self._queue, waiter.order, key=_order)

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
        place = self._place(waiter)
        del self._queue[place]
        self._queued[waiter.caller] -= 1
        if not self._queued[waiter.caller]:
            del self._queued[waiter.caller]
            del self._last_round[waiter.caller]
        if place == 0 and self._queue and not self._queue[0].signal.done():
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

    async def acquire(self, deadline: Deadline, need: float = 0.0, caller: str = "") -> float:
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
