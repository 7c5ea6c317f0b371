"""Upstream work that outlives its caller once a request may have left.

Each call's upstream work runs in a task of its own; the RPC waits for it until the caller's
deadline. When the caller leaves (deadline, cancellation, connection ageing, drain) before any
request went out, the work is cancelled: nothing was sent, and a queued call gives its rate-limit
turn back. Once a request may have left, it is never abandoned mid-flight: the attempt runs to its
own timeout in the background, no further attempt starts, and what it produced is kept (stored
for a request_id, or reported as an orphan without one). The drain waits for these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from service.deadline import Deadline
from service.errors import DeadlineExceeded

log = logging.getLogger("flexwebchat.execution")

T = TypeVar("T")


class Execution:
    """One call's upstream work: whether a request is out, and whether its caller is gone."""

    __slots__ = ("abandoned", "before_send", "last_sent_at", "sending")

    def __init__(self) -> None:
        self.sending = 0  # requests that may be at Twilio right now
        self.abandoned = False
        self.last_sent_at = 0.0  # wall time the latest request started to leave
        # Awaited just before a request may leave (e.g. to note it in the shared records).
        self.before_send: Callable[[], Awaitable[None]] | None = None

    @contextlib.contextmanager
    def send(self) -> Iterator[None]:
        """Marks the span in which a request may have left."""
        self.last_sent_at = time.time()
        self.sending += 1
        try:
            yield
        finally:
            self.sending -= 1


_current: ContextVar[Execution | None] = ContextVar("flexwebchat_execution", default=None)


def current() -> Execution:
    """The running work's Execution (a detached one outside any, e.g. in unit tests)."""
    execution = _current.get()
    return execution if execution is not None else Execution()


class Executions:
    """Runs upstream work for RPCs and keeps what outlives its caller, for the drain."""

    def __init__(self) -> None:
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def in_background(self) -> int:
        return len(self._background)

    async def run(
        self,
        work: Callable[[], Coroutine[Any, Any, T]],
        deadline: Deadline,
        *,
        after_caller_left: Callable[[T], None] | None = None,
    ) -> T:
        """``work()``'s result, or DeadlineExceeded at the deadline. If the caller leaves while
        a request is out, ``after_caller_left`` gets the result when the work finishes."""
        execution = Execution()

        async def tracked() -> T:
            _current.set(execution)
            return await work()

        task = asyncio.create_task(tracked())
        try:
            return await asyncio.wait_for(asyncio.shield(task), deadline.remaining())
        except TimeoutError:
            self._abandon(task, execution, after_caller_left)
            raise DeadlineExceeded(
                "the deadline passed before Twilio answered"
                + (
                    "; the request in flight will finish and be recorded"
                    if execution.sending
                    else ""
                )
            ) from None
        except asyncio.CancelledError:
            self._abandon(task, execution, after_caller_left)
            raise

    def _abandon(
        self,
        task: asyncio.Task[T],
        execution: Execution,
        after_caller_left: Callable[[T], None] | None,
    ) -> None:
        execution.abandoned = True
        if not execution.sending:
            task.cancel()  # nothing is out: stop waiting for a slot, a backoff or a lookup
        self._background.add(task)

        def finished(done: asyncio.Task[T]) -> None:
            self._background.discard(done)
            if done.cancelled():
                return
            if done.exception() is None and after_caller_left is not None:
                after_caller_left(done.result())

        task.add_done_callback(finished)

    async def drain(self, within: float) -> None:
        """Waits for work that outlived its callers, at most ``within`` seconds."""
        if not self._background:
            return
        log.info(
            "waiting for requests in flight", extra={"fields": {"count": len(self._background)}}
        )
        _, pending = await asyncio.wait(set(self._background), timeout=within)
        if pending:
            log.error(
                "stopped with requests still in flight at Twilio",
                extra={"fields": {"count": len(pending)}},
            )
