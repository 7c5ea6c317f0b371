"""Upstream work that outlives its caller once a request may have left.

The upstream work that may send runs in a task of its own; the RPC waits for it until the
caller's deadline. What sends nothing (a replay of a stored outcome, a wait for a rate-limit
turn) runs in the RPC itself, with no task. When the caller leaves (deadline, cancellation,
connection ageing, drain) before any request went out, the work is cancelled: nothing was sent,
and a queued call gives its rate-limit turn back. Once a request may have left, the work is never
abandoned: the attempt runs to its own timeout in the background, no further create starts, and
what it produced is kept (stored for a request_id, or reported as an orphan without one). The
drain waits for these.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, copy_context
from typing import Any, TypeVar

from .deadline import Deadline
from .errors import DeadlineExceeded

log = logging.getLogger("flexwebchat.execution")

T = TypeVar("T")


class Execution:
    """One call's upstream work: whether a request has gone out, and whether its caller left."""

    __slots__ = ("abandoned", "before_send", "last_sent_at")

    def __init__(self) -> None:
        self.abandoned = False
        self.last_sent_at = 0.0  # monotonic time the latest request started to leave; 0: none
        # Awaited just before a request may leave (e.g. to note it in the shared records).
        self.before_send: Callable[[], Awaitable[None]] | None = None


_current: ContextVar[Execution | None] = ContextVar("flexwebchat_execution", default=None)


def current() -> Execution:
    """The running work's Execution (a detached one outside any, e.g. in unit tests)."""
    execution = _current.get()
    return execution if execution is not None else Execution()


class Executions:
    """Runs upstream work for RPCs and keeps what outlives its caller, for the drain."""

    def __init__(self) -> None:
        self._running: dict[asyncio.Task[Any], Execution] = {}

    @property
    def in_background(self) -> int:
        return sum(1 for execution in self._running.values() if execution.abandoned)

    async def run(
        self,
        work: Callable[[], Coroutine[Any, Any, T]],
        deadline: Deadline,
        *,
        after_caller_left: Callable[[T], None] | None = None,
        when_done: Callable[[], None] | None = None,
    ) -> T:
        """``work()``'s result, or DeadlineExceeded at the deadline. If the caller leaves after
        a request went out, the work finishes in the background and ``after_caller_left`` gets
        its result; ``when_done`` is called when the work ends, whoever waited for it."""
        execution = Execution()

        # The work sees its Execution through a context of its own (no wrapping coroutine).
        context = copy_context()
        context.run(_current.set, execution)
        task = asyncio.create_task(work(), context=context)
        self._running[task] = execution
        # What the RPC awaits: resolved when the work ends or the deadline comes, whichever is
        # first. One future and one timer per call, where wait_for(shield(task)) made three
        # futures, a timer and four callbacks (CPU per call, memory per waiting call).
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished(done: asyncio.Task[T]) -> None:
            del self._running[done]
            _wake(woken)
            if when_done is not None:
                when_done()
            if done.cancelled() or done.exception() is not None:
                return
            if execution.abandoned and after_caller_left is not None:
                after_caller_left(done.result())

        task.add_done_callback(finished)
        # Awaited even when no time is left: the work's first step is scheduled before any
        # wake-up of this coroutine, so work that holds something (a claimed request_id) always
        # enters the code that gives it back before it can be cancelled.
        timer = asyncio.get_running_loop().call_later(deadline.remaining(), _wake, woken)
        try:
            await woken
        except asyncio.CancelledError:
            if task.done():  # as wait_for: the work's outcome wins over a late cancellation
                return task.result()
            self._abandon(task, execution)
            raise
        finally:
            timer.cancel()
        if task.done():
            return task.result()
        self._abandon(task, execution)
        raise DeadlineExceeded(
            "the deadline passed before Twilio answered"
            + ("; the request sent will finish and be recorded" if execution.last_sent_at else "")
        )

    @staticmethod
    def _abandon(task: asyncio.Task[Any], execution: Execution) -> None:
        execution.abandoned = True
        if not execution.last_sent_at:
            task.cancel()  # nothing went out: stop waiting for a slot, a backoff or a lookup

    async def drain(self, within: float) -> None:
        """Cancels work that has sent nothing; waits for the rest, at most ``within`` seconds."""
        for task, execution in list(self._running.items()):
            self._abandon(task, execution)
        if not self._running:
            return
        log.info("waiting for requests sent", extra={"fields": {"count": len(self._running)}})
        _, pending = await asyncio.wait(set(self._running), timeout=within)
        if pending:
            log.error(
                "stopped with requests still in flight at Twilio",
                extra={"fields": {"count": len(pending)}},
            )


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
