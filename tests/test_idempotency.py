"""IdempotencyStore over in-process records: replay, conflict, coalescing, release, lock expiry."""

from __future__ import annotations

import asyncio

import pytest

from service.deadline import Deadline
from service.errors import DeadlineExceeded, InvalidRequest, UpstreamUnreachable
from service.idempotency import IdempotencyStore, LocalRecords, Outcome, Record


class Work:
    def __init__(self, result: bytes = b"chat-1", delay: float = 0.0) -> None:
        self.calls = 0
        self.result = result
        self.delay = delay

    async def __call__(self) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.result + str(self.calls).encode()


def store(lock: float = 5.0) -> IdempotencyStore:
    return IdempotencyStore(LocalRecords(), ttl_seconds=60, lock_seconds=lock)


async def test_a_retry_returns_the_first_outcome_without_running_again() -> None:
    ids, work = store(), Work()
    first = await ids.run("id", "fp", work, Deadline.after(5))
    second = await ids.run("id", "fp", work, Deadline.after(5))
    assert first.payload == second.payload == b"chat-11"
    assert work.calls == 1


async def test_the_same_id_with_other_fields_is_invalid_argument() -> None:
    ids = store()
    await ids.run("id", "fp", Work(), Deadline.after(5))
    with pytest.raises(InvalidRequest) as caught:
        await ids.run("id", "other", Work(), Deadline.after(5))
    assert caught.value.violations[0][0] == "request_id"


async def test_concurrent_duplicates_wait_for_the_one_in_flight() -> None:
    ids, work = store(), Work(delay=0.2)
    results = await asyncio.gather(
        *[ids.run("id", "fp", work, Deadline.after(5)) for _ in range(10)]
    )
    assert work.calls == 1
    assert {r.payload for r in results} == {b"chat-11"}


async def test_request_caused_failures_are_stored_and_replayed() -> None:
    ids = store()

    async def rejected() -> bytes:
        raise Outcome(b"status-bytes")

    first = await ids.run("id", "fp", rejected, Deadline.after(5))
    again = await ids.run("id", "fp", Work(), Deadline.after(5))
    assert (first.ok, again.ok, again.payload) == (False, False, b"status-bytes")


async def test_transient_failures_free_the_id_for_a_retry() -> None:
    ids, work = store(), Work()

    async def unreachable() -> bytes:
        raise UpstreamUnreachable("ConnectError", maybe_processed=False)

    with pytest.raises(UpstreamUnreachable):
        await ids.run("id", "fp", unreachable, Deadline.after(5))
    assert (await ids.run("id", "fp", work, Deadline.after(5))).payload == b"chat-11"


async def test_a_cancelled_owner_frees_the_id() -> None:
    ids, work = store(), Work()
    task = asyncio.create_task(ids.run("id", "fp", Work(delay=10), Deadline.after(30)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await ids.run("id", "fp", work, Deadline.after(5))).payload == b"chat-11"


async def test_a_waiter_gives_up_at_its_deadline() -> None:
    ids = store()
    owner = asyncio.create_task(ids.run("id", "fp", Work(delay=1), Deadline.after(5)))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceeded, match="still in progress"):
        await ids.run("id", "fp", Work(), Deadline.after(0.2))
    await owner


async def test_a_dead_owners_lock_expires() -> None:
    records = LocalRecords()
    ids = IdempotencyStore(records, ttl_seconds=60, lock_seconds=0.3)
    # A pending record whose owner died: nobody renews it.
    await records.claim("id", Record(fingerprint="fp", owner="dead-replica"), 0.3)
    work = Work()
    result = await ids.run("id", "fp", work, Deadline.after(5))
    assert (result.payload, work.calls) == (b"chat-11", 1)


async def test_a_live_owners_heartbeat_keeps_its_lock() -> None:
    ids, work = store(lock=0.6), Work()
    slow = Work(delay=1.5)  # longer than the lock: only the heartbeat keeps it
    owner = asyncio.create_task(ids.run("id", "fp", slow, Deadline.after(5)))
    await asyncio.sleep(1.0)
    waiter = await ids.run("id", "fp", work, Deadline.after(5))
    assert work.calls == 0 and slow.calls == 1
    assert waiter.payload == (await owner).payload


async def test_a_created_chat_is_returned_even_if_its_record_cannot_be_stored() -> None:
    from service.errors import SharedStateUnavailable

    class FailingComplete(LocalRecords):
        async def complete(self, key: str, record: Record, ttl_seconds: float) -> None:
            raise SharedStateUnavailable("ConnectionError")

    ids = IdempotencyStore(FailingComplete(), ttl_seconds=60, lock_seconds=5)
    result = await ids.run("id", "fp", Work(), Deadline.after(5))
    assert (result.ok, result.payload) == (True, b"chat-11")


async def test_in_process_records_are_capped_dropping_the_oldest_completed() -> None:
    records = LocalRecords(max_records=10)
    await records.claim("pending", Record(fingerprint="fp", owner="busy"), 60)
    for i in range(10):
        await records.claim(f"id-{i}", Record(fingerprint="fp", owner="o"), 60)
        await records.complete(f"id-{i}", Record(fingerprint="fp", owner="o", done=True), 60)
    # The eleventh claim found the table full: the oldest completed records went, not the pending.
    assert await records.claim("id-0", Record(fingerprint="fp", owner="new"), 60) is None
    assert await records.claim("pending", Record(fingerprint="fp", owner="new"), 60) is not None
    assert await records.claim("id-9", Record(fingerprint="fp", owner="new"), 60) is not None


async def test_the_readme_states_the_worst_case_memory_of_in_process_records() -> None:
    """Records with the longest identity Twilio echoes back (256 characters of 4 bytes each)."""
    import hashlib
    import re
    import tracemalloc
    import uuid
    from pathlib import Path

    from flexwebchat.v1 import webchat_pb2

    count = 2000
    records = LocalRecords(max_records=count + 10)
    payload = webchat_pb2.CreateWebChatResponse(
        conversation_sid="CH" + "0" * 32, identity="\U0001f600" * 256
    )
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            key, owner = str(uuid.uuid4()), uuid.uuid4().hex
            done = Record(
                hashlib.sha256(key.encode()).hexdigest(),
                owner,
                done=True,
                ok=True,
                payload=payload.SerializeToString(),
            )
            await records.claim(key, Record(done.fingerprint, owner), 10)
            await records.complete(key, done, 86400)
        measured = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    readme = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    row = re.search(r"\| `IDEMPOTENCY_MAX_LOCAL_RECORDS` .*?about ([\d.]+) (KB|bytes) each", readme)
    assert row, "the configuration table states the size of a record"
    stated = float(row.group(1)) * (1000 if row.group(2) == "KB" else 1)
    assert measured <= stated, f"a record takes {measured:.0f} bytes; the docs say {stated:.0f}"


async def test_an_id_claimed_with_no_time_left_is_freed_at_once() -> None:
    """The RPC claims the id, then runs the execution in a task; a deadline already past must
    still let the task free the id (not leave it locked until the lock expires)."""
    from service.execution import Executions

    ids, executions, work = store(lock=30), Executions(), Work()
    claimed = await ids.claim("id", "fp", Deadline.after(5))
    assert not claimed.done
    with pytest.raises(DeadlineExceeded):
        await executions.run(lambda: ids.execute("id", claimed, Work(delay=10)), Deadline.after(0))
    await asyncio.sleep(0.01)  # the cancelled execution gives the id back
    again = await ids.run("id", "fp", work, Deadline.after(0.5))
    assert again.payload == b"chat-11"


async def test_an_id_claimed_by_a_stalled_store_is_freed_when_it_answers() -> None:
    """A stalled Redis carries out a claim after the caller left (or its socket timed out): the
    id would stay locked by no one until the lock lapsed. It is freed as soon as the store
    answers again; a failed release after a transient failure is retried the same way."""
    from service.errors import SharedStateUnavailable

    class Stalled(LocalRecords):
        down = True

        async def claim(self, key: str, record: Record, lock_seconds: float) -> Record | None:
            existing = await super().claim(key, record, lock_seconds)  # applied...
            if self.down:
                raise SharedStateUnavailable("TimeoutError")  # ...but the answer is lost
            return existing

        async def release(self, key: str, owner: str) -> None:
            if self.down:
                raise SharedStateUnavailable("TimeoutError")
            await super().release(key, owner)

    records = Stalled()
    ids = IdempotencyStore(records, ttl_seconds=60, lock_seconds=30)
    with pytest.raises(SharedStateUnavailable):
        await ids.run("id", "fp", Work(), Deadline.after(5))
    records.down = False
    await asyncio.sleep(0.5)  # the background release's next try
    work = Work()
    assert (await ids.run("id", "fp", work, Deadline.after(1))).payload == b"chat-11"
    assert work.calls == 1  # the id was free at once, long before its 30 s lock lapsed

    async def transient() -> bytes:
        records.down = True
        raise UpstreamUnreachable("refused", maybe_processed=False)

    with pytest.raises(UpstreamUnreachable):
        await ids.run("id2", "fp", transient, Deadline.after(5))
    records.down = False
    await asyncio.sleep(0.5)
    assert (await ids.run("id2", "fp", Work(), Deadline.after(1))).ok
    await ids.drain(within=1)
