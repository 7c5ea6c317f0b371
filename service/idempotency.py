"""At-most-once execution per request_id (AIP-155).

The first call with an id claims it (a *pending* record owned by this call, whose lock a heartbeat
keeps alive) and runs; its outcome is stored for the TTL and returned to every later call with the
same id. Calls arriving while it runs wait for it rather than calling Twilio again. What is stored:

* success, failures determined by the request itself (Twilio 400/404/422), and a 2xx whose body
  was unusable (the conversation may well exist: re-posting could create a second): returned
  again as they were, for the whole TTL;
* everything else (unreachable, 5xx, 429, deadline, the account's 401/403, cancellation): the claim
  is released, so a retry with the same id runs again. A retry is exactly what those errors ask for.

When the owner dies (a replica killed mid-request), its heartbeat stops and the lock expires after
IDEMPOTENCY_LOCK_SECONDS; the next call with the id then runs it. An outcome that cannot be stored
at once (Redis stalled) keeps its lock alive and is stored in the background until it is, so the
lock never lapses while a success is unstored.

The same id with different request fields is INVALID_ARGUMENT (a BadRequest violation on
request_id): the caller sent a malformed retry, which is a property of the request, like any other
validation failure, and retrying it can never succeed.

Records live in a :class:`RecordBackend`: :class:`LocalRecords` (this process; a single replica
is then required for the guarantee) or ``service.shared.RedisRecords`` (all replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import observability as obs
from .deadline import Deadline
from .errors import (
    DeadlineExceeded,
    FacadeError,
    InvalidRequest,
    UpstreamBadResponse,
    UpstreamError,
)

log = logging.getLogger("flexwebchat.idempotency")

POLL_SECONDS = 0.025
# Rejections of the request's own content; 401 and 403 concern the facade's account instead.
STORED_HTTP_FAILURES = frozenset({400, 404, 422})


@dataclass(frozen=True, slots=True)
class Record:
    fingerprint: str
    owner: str
    done: bool = False
    ok: bool = False
    payload: bytes = b""
    # Wall time (unix seconds) the outcome was produced: for a success, the conversation's
    # creation, which is where its guest session starts; 0 when unknown.
    completed_at: float = 0.0


class RecordBackend(Protocol):
    async def claim(self, key: str, record: Record, lock_seconds: float) -> Record | None:
        """Stores ``record`` if ``key`` is free and returns None; else returns what is there."""
        ...

    async def refresh(self, key: str, owner: str, lock_seconds: float) -> None: ...

    async def complete(self, key: str, record: Record, ttl_seconds: float) -> bool:
        """Replaces the owner's pending record with the final one; False when another call
        took the id over meanwhile (its lock had lapsed), and nothing was stored."""
        ...

    async def release(self, key: str, owner: str) -> None: ...

    async def mark_sent(self, key: str, ttl_seconds: float, settle_seconds: float) -> None:
        """Notes that a request for ``key`` may reach Twilio now, by the records' own clock (one
        for every replica), and may stay in flight there ``settle_seconds``; forgotten when the
        outcome is stored."""
        ...

    async def sent_ago(self, key: str) -> SentMark | None:
        """The mark ``mark_sent`` left, aged by the same clock, when an earlier execution of
        ``key`` left no stored outcome."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SentMark:
    """A create for an id may have left ``ago`` seconds ago, and its sender said it can stay in
    flight ``settle`` seconds (None: a mark that does not say, whose reader uses its own)."""

    ago: float
    settle: float | None


@dataclass(frozen=True, slots=True)
class Produced:
    """What ``work`` may return instead of bare bytes, to say when its outcome came about (a
    conversation found at Twilio was created before this execution)."""

    payload: bytes
    at: float  # unix seconds


class Outcome(Exception):
    """A stored failure, raised from ``work`` to have it recorded; ``payload`` is replayed."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class IdempotencyStore:
    def __init__(
        self,
        backend: RecordBackend,
        *,
        ttl_seconds: float,
        lock_seconds: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.ttl = ttl_seconds
        self.lock = lock_seconds
        self._sleep = sleep
        self._background: set[asyncio.Task[None]] = set()

    async def run(
        self,
        key: str,
        fingerprint: str,
        work: Callable[[], Awaitable[bytes]],
        deadline: Deadline,
    ) -> Record:
        """The record of the one execution of ``work`` for ``key``; ``done`` and ``ok`` tell how
        it ended. Raises the live error of this call when its own execution failed transiently."""
        record = await self.claim(key, fingerprint, deadline)
        if record.done:
            return record
        return await self.execute(key, record, work)

    async def claim(self, key: str, fingerprint: str, deadline: Deadline) -> Record:
        """The stored outcome for ``key`` (``done``), or this call's own pending record once it
        has claimed the id: then it must ``execute`` it. Sends nothing, so a replay needs no
        task of its own (CPU per replay)."""
        mine = Record(fingerprint=fingerprint, owner=os.urandom(16).hex())
        while (existing := await self._claim(key, mine)) is not None:
            if existing.fingerprint != fingerprint:
                obs.child(obs.IDEMPOTENCY, "conflict").inc()
                raise InvalidRequest(
                    [
                        (
                            "request_id",
                            "was already used with different request fields; "
                            "a new chat needs a new request_id",
                        )
                    ]
                )
            if existing.done:
                obs.child(obs.IDEMPOTENCY, "replayed").inc()
                obs.current_rpc().idempotency = "replayed"
                return existing
            if deadline.remaining() <= POLL_SECONDS:
                raise DeadlineExceeded(
                    "an earlier call with this request_id is still in progress; retry later"
                )
            await self._sleep(POLL_SECONDS)
        obs.child(obs.IDEMPOTENCY, "executed").inc()
        obs.current_rpc().idempotency = "executed"
        return mine

    async def execute(
        self, key: str, mine: Record, work: Callable[[], Awaitable[bytes | Produced]]
    ) -> Record:
        """Runs ``work`` for the id ``claim`` gave this call, and stores its outcome; on a
        transient failure or cancellation the id is freed for a retry."""
        heartbeat = asyncio.create_task(self._heartbeat(key, mine.owner))
        try:
            produced = await work()
            if isinstance(produced, bytes):
                produced = Produced(produced, time.time())
            final = replace(
                mine, done=True, ok=True, payload=produced.payload, completed_at=produced.at
            )
        except Outcome as outcome:
            final = replace(
                mine, done=True, ok=False, payload=outcome.payload, completed_at=time.time()
            )
        except BaseException:
            # Transient failure or cancellation: free the id for a retry.
            heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._release(key, mine.owner))
            raise
        try:
            stored = await self.backend.complete(key, final, self.ttl)
        except FacadeError as exc:
            # The caller gets its answer now; the record follows as soon as it can be stored,
            # and until then the heartbeat keeps other calls with this id waiting for it.
            log.error(
                "could not store the outcome of a request_id yet; retrying in the background",
                extra={"fields": {"error": str(exc)}},
            )
            self._track(self._store_until_stored(key, final, heartbeat))
            return final
        heartbeat.cancel()
        if not stored:
            _taken_over()
        return final

    async def _claim(self, key: str, mine: Record) -> Record | None:
        try:
            return await self.backend.claim(key, mine, self.lock)
        except BaseException:
            # The claim may have been applied (a stalled Redis carries out the command after
            # the caller left or the socket timed out): free it, or the id stays locked by no
            # one until the lock lapses. A release acts only for its owner, so it is safe.
            self._track(self._release_until_released(key, mine.owner))
            raise

    async def _release(self, key: str, owner: str) -> None:
        """Frees the id now if the records answer, else keeps trying in the background."""
        try:
            await self.backend.release(key, owner)
        except FacadeError:
            self._track(self._release_until_released(key, owner))

    async def _release_until_released(self, key: str, owner: str) -> None:
        give_up = time.monotonic() + self.lock  # by then the lock has lapsed by itself
        delay = 0.2
        while True:
            try:
                await self.backend.release(key, owner)
                return
            except FacadeError:
                if time.monotonic() + delay >= give_up:
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        """Background record work, which the drain waits for."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_until_stored(
        self, key: str, final: Record, heartbeat: asyncio.Task[None]
    ) -> None:
        delay = 0.2
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    stored = await self.backend.complete(key, final, self.ttl)
                except FacadeError:
                    delay = min(delay * 2, 5.0)
                    continue
                if stored:
                    log.info("stored the outcome of a request_id after a delay")
                else:
                    _taken_over()
                return
        finally:
            heartbeat.cancel()

    async def drain(self, within: float) -> None:
        """Waits for outcomes still being stored and ids still being freed, at most ``within``
        seconds."""
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=within)
            if pending:
                log.error(
                    "stopped with request_id outcomes unstored or ids not yet freed; retries "
                    "may run them again, or wait for their locks to lapse",
                    extra={"fields": {"count": len(pending)}},
                )

    async def _heartbeat(self, key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(self.lock / 3)
            with contextlib.suppress(FacadeError):
                await self.backend.refresh(key, owner, self.lock)


def _taken_over() -> None:
    obs.IDEMPOTENCY.labels(outcome="lost").inc()
    log.error(
        "the outcome of a request_id could not be stored: its lock lapsed (shared state stalled "
        "longer than IDEMPOTENCY_LOCK_SECONDS) and another call took the id over"
    )


def is_stored_failure(exc: FacadeError) -> bool:
    """Failures that must stick: the request itself was rejected (the same request would fail
    the same way again), or Twilio answered 2xx unusably (the conversation may exist)."""
    if isinstance(exc, UpstreamBadResponse):
        return True
    return isinstance(exc, UpstreamError) and exc.http_status in STORED_HTTP_FAILURES


class LocalRecords:
    """Records in this process's memory; expired ones are dropped as new ones arrive.

    At most ``max_records`` are kept (up to about 1.6 KB each): past that, the oldest completed
    records are dropped before their TTL, and counted, rather than letting memory grow without
    bound (5 calls/s for 24 h would be 432,000 records).
    """

    def __init__(
        self, max_records: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._records: dict[str, tuple[Record, float]] = {}  # in claim order, oldest first
        # ids that may have reached Twilio (when, for how long), with no outcome yet
        self._sent: dict[str, tuple[float, float]] = {}
        self._max = max_records
        self._clock = clock
        self._next_sweep = 0.0

    def _live(self, key: str) -> Record | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._records[key]
            return None
        return entry[0]

    async def claim(self, key: str, record: Record, lock_seconds: float) -> Record | None:
        existing = self._live(key)
        if existing is None:
            self._evict_expired()
            if len(self._records) >= self._max:
                self._evict_oldest()
            self._records[key] = (record, self._clock() + lock_seconds)
        return existing

    async def refresh(self, key: str, owner: str, lock_seconds: float) -> None:
        existing = self._live(key)
        if existing is not None and existing.owner == owner and not existing.done:
            self._records[key] = (existing, self._clock() + lock_seconds)

    async def complete(self, key: str, record: Record, ttl_seconds: float) -> bool:
        existing = self._live(key)
        if existing is not None and existing.owner != record.owner:
            return False
        self._records[key] = (record, self._clock() + ttl_seconds)
        self._sent.pop(key, None)
        return True

    async def mark_sent(self, key: str, ttl_seconds: float, settle_seconds: float) -> None:
        if len(self._sent) >= self._max:  # ids whose outcome is unstored: as many as records
            del self._sent[next(iter(self._sent))]
        self._sent.pop(key, None)
        self._sent[key] = (self._clock(), settle_seconds)

    async def sent_ago(self, key: str) -> SentMark | None:
        sent = self._sent.get(key)
        if sent is None:
            return None
        return SentMark(max(self._clock() - sent[0], 0.0), sent[1])

    async def release(self, key: str, owner: str) -> None:
        existing = self._live(key)
        if existing is not None and existing.owner == owner and not existing.done:
            del self._records[key]

    async def close(self) -> None:
        return None

    def _evict_expired(self) -> None:
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60.0  # a full scan at most once a minute
        for key in [k for k, (_, expires) in self._records.items() if expires <= now]:
            del self._records[key]

    def _evict_oldest(self) -> None:
        """Drops the oldest tenth of the completed records (never a pending one)."""
        self._next_sweep = 0.0
        self._evict_expired()
        excess = len(self._records) - self._max * 9 // 10
        if excess <= 0:
            return
        oldest = [k for k, (record, _) in self._records.items() if record.done][:excess]
        for key in oldest:
            del self._records[key]
        obs.IDEMPOTENCY.labels(outcome="evicted").inc(len(oldest))
        log.warning(
            "in-process idempotency records are full: dropped the oldest before their TTL; "
            "raise IDEMPOTENCY_MAX_LOCAL_RECORDS or use REDIS_URL",
            extra={"fields": {"dropped": len(oldest), "kept": len(self._records)}},
        )
