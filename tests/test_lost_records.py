"""One request_id, one conversation, even when what the facade relies on goes wrong: Redis
flushed, restarted empty, evicting under maxmemory; Twilio's lookup answering unusably. Two
replicas share one real redis-server, with the lookup on (conversations service set, identity
left to the facade); each test counts what Twilio (the emulator) holds: conversations, and first
messages posted into them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from conftest import (
    EmulatorProcess,
    FacadeProcess,
    RedisProcess,
    rich_status,
    start_redis,
    stop_process,
)
from flexwebchat.v1 import webchat_pb2

from emulator.app import ACCOUNT_SID
from emulator.harness import guest_env

FAST = {"FLEX_ATTEMPT_TIMEOUT_SECONDS": "0.5", "IDEMPOTENCY_LOCK_SECONDS": "1"}
RECOVERED = 'flexwebchat_idempotency_total{outcome="recovered_by_lookup"}'
CREATE, LOOKUP = "/v2/WebChats", "/v1/Services/"  # faults for one endpoint only


def two_replicas(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess, **overrides: str
) -> list[FacadeProcess]:
    env = {**guest_env(upstream.url), **FAST, "REDIS_URL": redis_server.url, **overrides}
    return [make_facade(upstream.url, **env), make_facade(upstream.url, **env)]


@pytest.fixture
def replicas(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> list[FacadeProcess]:
    return two_replicas(make_facade, upstream, redis_server)


def record_key(request_id: str, kind: str = "idempotency") -> str:
    return f"flexwebchat:{ACCOUNT_SID.lower()}:{kind}:{request_id}"


def first_messages(upstream: EmulatorProcess, conversation_sid: str) -> int:
    path = f"/v1/Conversations/{conversation_sid}/Messages"
    return sum(r["path"] == path and r["status"] == 201 for r in upstream.requests())


def retry_until_answered(
    replica: FacadeProcess, request_id: str
) -> webchat_pb2.CreateWebChatResponse:
    """The retry a caller makes: again on UNAVAILABLE (a replica's connection to a restarted
    Redis fails once before it reconnects)."""
    for _ in range(20):
        try:
            return replica.create(request_id=request_id, initial_message="hello", timeout=5)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.2)
    raise AssertionError("never answered")


def flush(server: RedisProcess, request_id: str) -> None:
    redis.Redis(port=server.port).flushall()


def restart_empty(server: RedisProcess, request_id: str) -> None:
    """Redis restarted without persistence, on the same address (the fixture stops the new one)."""
    stop_process(server.proc)
    server.proc = start_redis(server.port).proc


def evict(server: RedisProcess, request_id: str) -> None:
    """Memory pressure under a managed Redis's usual policy, until the record is evicted."""
    client = redis.Redis(port=server.port)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "volatile-lru")
    client.config_set("maxmemory", used + 512 * 1024)
    filler = b"x" * 16 * 1024
    for batch in range(200):
        for i in range(32):
            client.set(f"filler:{batch}:{i}", filler, ex=60)
        if not client.exists(record_key(request_id)):
            break
    assert not client.exists(record_key(request_id)), "the record was never evicted"
    client.config_set("maxmemory", 0)


@pytest.mark.parametrize("lose", [flush, restart_empty, evict], ids=lambda f: f.__name__)
def test_a_lost_record_is_recovered_by_looking_not_by_creating_again(
    replicas: list[FacadeProcess],
    upstream: EmulatorProcess,
    redis_server: RedisProcess,
    lose: Callable[[RedisProcess, str], None],
) -> None:
    request_id = str(uuid.uuid4())
    first = replicas[0].create(request_id=request_id, initial_message="hello", timeout=5)
    assert first.initial_message_sid.startswith("IM")
    assert f"{RECOVERED} 0.0" in replicas[1].metrics()  # exported before the first, for alerts
    lose(redis_server, request_id)
    for replica in reversed(replicas):  # the other replica first, then the one that created
        again = retry_until_answered(replica, request_id)
        assert again.conversation_sid == first.conversation_sid
    assert upstream.conversations() == {first.conversation_sid: first.identity}
    assert first_messages(upstream, first.conversation_sid) == 1
    assert replicas[1].metric(RECOVERED) == 1  # the first retry found it; the second replays it
    assert replicas[0].metric(RECOVERED) == 0


def test_an_answer_lost_to_the_callers_deadline_then_flushed_is_found(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    # The create lands after its caller left, well within the attempt's own timeout.
    replicas = two_replicas(make_facade, upstream, redis_server, FLEX_ATTEMPT_TIMEOUT_SECONDS="3")
    upstream.fault({"path": CREATE, "latency": 0.8})
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as gave_up:
        replicas[0].create(request_id=request_id, initial_message="hello", timeout=0.4)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client = redis.Redis(port=redis_server.port)
    for _ in range(200):  # the create lands, its message is posted, its outcome stored
        if b'"done": true' in (client.get(record_key(request_id)) or b""):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the outcome was never stored")
    client.flushall()
    again = retry_until_answered(replicas[1], request_id)
    assert upstream.conversations() == {again.conversation_sid: again.identity}
    assert first_messages(upstream, again.conversation_sid) == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, "not json"),
        (200, "{}"),
        (200, '{"conversations": "none"}'),
        (200, '{"conversations": [{"chat_service_sid": "IS00000000000000000000000000000000"}]}'),
        (404, "<html><body><h1>404 gateway: not found</h1></body></html>"),
        (404, '{"message": "no route"}'),
    ],
    ids=[
        "not json",
        "no conversations",
        "not a list",
        "no conversation_sid",
        "a proxy's html 404",
        "a 404 without twilio's code",
    ],
)
def test_an_unusable_lookup_answer_is_unknown_never_not_found(
    replicas: list[FacadeProcess],
    upstream: EmulatorProcess,
    redis_server: RedisProcess,
    status: int,
    body: str,
) -> None:
    unusable = {"path": LOOKUP, "status": status, "body": body}
    # The create lands but its answer is lost; the lookups that follow answer unusably.
    upstream.fault(
        {"path": CREATE, "status": 502, "after": True}, {"path": LOOKUP}, unusable, unusable
    )
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as unknown:
        replicas[0].create(request_id=request_id, initial_message="hello", timeout=5)
    status = rich_status(unknown.value)
    assert status["code"] == grpc.StatusCode.UNAVAILABLE and "RetryInfo" in status
    assert len(upstream.conversations()) == 1  # nothing created after the unusable answer
    client = redis.Redis(port=redis_server.port)
    assert client.exists(record_key(request_id, "sent"))  # kept: the next call looks first
    assert not client.exists(record_key(request_id))  # the failure is not the id's outcome
    again = retry_until_answered(replicas[1], request_id)  # until Twilio answers usably
    assert upstream.conversations() == {again.conversation_sid: again.identity}
    assert first_messages(upstream, again.conversation_sid) == 0  # may have been posted: none


def test_an_empty_list_of_conversations_is_not_found(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    empty = {"path": LOOKUP, "status": 200, "body": '{"conversations": []}'}
    # Refused before creating anything; every lookup says the guest is in no conversation.
    upstream.fault({"path": CREATE, "status": 502}, empty, empty, empty)
    reply = replicas[0].create(request_id=str(uuid.uuid4()), timeout=5)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}
    assert [r["path"] for r in upstream.requests()].count(CREATE) == 2  # settled, then re-sent


SKEWED_CLOCK = str(Path(__file__).parent / "skewed_clock")  # its sitecustomize offsets time.time


@pytest.mark.parametrize(
    ("writer_skew", "reader_skew"),
    [(0, 15), (-15, 0)],
    ids=["the retrying replica 15 s ahead", "the sending replica 15 s behind"],
)
def test_skewed_clocks_do_not_shorten_the_settle_window(
    make_facade: Any,
    upstream: EmulatorProcess,
    redis_server: RedisProcess,
    writer_skew: int,
    reader_skew: int,
) -> None:
    # Twilio settles a create within 2 attempt timeouts (3 s here); this one lands after 2.2 s,
    # when its sender's attempt has timed out and its caller has left.
    env = {
        **guest_env(upstream.url),
        "FLEX_ATTEMPT_TIMEOUT_SECONDS": "1.5",
        "IDEMPOTENCY_LOCK_SECONDS": "1",
        "REDIS_URL": redis_server.url,
        "PYTHONPATH": SKEWED_CLOCK,
        # gRPC takes a call's time left as its own (C, unskewed) clock's deadline minus the
        # skewed time.time(): the retry carries no deadline and gets this one instead.
        "FLEX_DEFAULT_DEADLINE_SECONDS": "8",
    }
    writer = make_facade(upstream.url, **env, SKEWED_CLOCK_SECONDS=str(writer_skew))
    reader = make_facade(upstream.url, **env, SKEWED_CLOCK_SECONDS=str(reader_skew))
    upstream.fault({"path": CREATE, "latency": 2.2})
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError):
        writer.create(request_id=request_id, timeout=0.3)
    # Waits for the writer to give the id up (its attempt timed out, 1.5 s after sending), then
    # finds nothing yet: the create is still in flight, so it must wait for it to settle.
    reply = reader.create(request_id=request_id, timeout=None)
    for _ in range(100):  # until the first create has landed too
        if all(r["status"] for r in upstream.requests()):
            break
        time.sleep(0.05)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "noeviction", "refused"])
def test_a_redis_that_may_evict_records_is_named_at_start(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess, policy: str
) -> None:
    client = redis.Redis(port=redis_server.port)
    url = redis_server.url
    if policy == "refused":  # CONFIG not allowed, as on many managed services
        client.acl_setuser(
            "facade",
            enabled=True,
            passwords=["+pw"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-config"],
        )
        url = f"redis://facade:pw@127.0.0.1:{redis_server.port}/0"
    else:
        client.config_set("maxmemory-policy", policy)
    facade = make_facade(upstream.url, REDIS_URL=url)  # serving: Redis has answered
    said = [line for line in facade.log_lines() if "maxmemory-policy" in line["msg"]]
    if policy == "noeviction":
        assert said == []
    elif policy == "refused":
        assert [line["level"] for line in said] == ["info"]
        assert facade.create().conversation_sid  # the check never stands in the way
    else:
        assert [line["level"] for line in said] == ["warning"]
        assert said[0]["maxmemory_policy"] == policy and "noeviction" in said[0]["msg"]


def test_a_retry_waits_the_senders_settle_window_not_its_own(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    # A rolling config change: the sender gives Twilio 1.5 s an attempt, the retrying replica
    # 0.5 s. The create lands after 2.2 s, after its sender's attempt has timed out but within
    # the sender's settle window; the retry's own window (1 s) has passed by then.
    env = {**guest_env(upstream.url), **FAST, "REDIS_URL": redis_server.url}
    sender = make_facade(upstream.url, **{**env, "FLEX_ATTEMPT_TIMEOUT_SECONDS": "1.5"})
    retrier = make_facade(upstream.url, **env)
    upstream.fault({"path": CREATE, "latency": 2.2})
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as gave_up:
        sender.create(request_id=request_id, timeout=0.4)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Waits for the sender to give the id up, finds nothing yet, and must wait for it to settle.
    reply = retrier.create(request_id=request_id, timeout=10)
    for _ in range(100):  # until the first create has landed too
        if all(r["status"] for r in upstream.requests()):
            break
        time.sleep(0.05)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}


def test_the_settle_window_covers_the_wait_for_a_connection(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    # One connection to Twilio per replica, 1 s attempts. The create is marked sent, then waits
    # 0.8 s for the connection another call holds; Twilio creates it 1.9 s after it was written
    # (within two attempt timeouts of that), 2.7 s after the mark.
    sender, retrier = two_replicas(make_facade, upstream, redis_server, **SLOW_POOL)
    upstream.fault(
        {"path": LOOKUP, "latency": 0.3},  # the sender's look before its create holds the slot
        {"path": CREATE, "latency": 0.8},  # the other call's create, which queued first
        {"path": CREATE, "latency": 1.9},
    )
    request_id = str(uuid.uuid4())
    with ThreadPoolExecutor(2) as pool:
        gave_up = pool.submit(sender.create, request_id=request_id, timeout=0.6)
        time.sleep(0.1)
        other = pool.submit(sender.create, timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            gave_up.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Waits for the sender to give the id up, finds nothing yet, waits for it to settle.
        reply = retrier.create(request_id=request_id, timeout=10)
        other_sid = other.result().conversation_sid
    for _ in range(100):  # until the first create has landed too
        if all(r["status"] for r in upstream.requests()):
            break
        time.sleep(0.05)
    assert upstream.conversations().keys() - {other_sid} == {reply.conversation_sid}


SLOW_POOL = {"FLEX_MAX_CONNECTIONS": "1", "FLEX_ATTEMPT_TIMEOUT_SECONDS": "1"}


def test_a_mark_without_a_window_is_read_with_the_readers_own(
    replicas: list[FacadeProcess], upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    # An older facade's mark: Redis's time alone, here 30 s ago, longer than any window here.
    client = redis.Redis(port=redis_server.port)
    seconds, micros = client.time()
    request_id = str(uuid.uuid4())
    client.set(record_key(request_id, "sent"), f"{seconds - 30}.{micros:06d}", ex=60)
    reply = replicas[0].create(request_id=request_id, timeout=5)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}
    paths = [r["path"] for r in upstream.requests()]
    # Settled long ago: looked once and created, without waiting to look again.
    assert paths.count(CREATE) == 1 and sum("/Users/" in p for p in paths) == 1
