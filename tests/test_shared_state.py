"""Two facade replicas, one Redis, one emulator: one rate budget, one conversation per request_id.

Also one replica without Redis, whose in-process limiter gives the same guarantees alone.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from conftest import (
    ADDRESS_SID,
    ROOT,
    EmulatorProcess,
    FacadeProcess,
    RedisProcess,
    facade_env,
    free_port,
    rich_status,
    start_redis,
    stop_process,
)
from flexwebchat.v1 import webchat_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET
from service.webchat import fingerprint

SERVICE = "flexwebchat.v1.WebChatService"

RATE, BURST = 5, 1

pytestmark = pytest.mark.needs("redis-server")


def burst(facades: list[FacadeProcess], count: int, timeout: float = 20) -> list:
    def call(i: int):
        try:
            return facades[i % len(facades)].create(timeout=timeout)
        except grpc.RpcError as error:
            return error

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


@pytest.fixture
def replicas(
    make_facade, upstream: EmulatorProcess, redis_server: RedisProcess
) -> list[FacadeProcess]:
    env = {
        "REDIS_URL": redis_server.url,
        "FLEX_RATE_LIMIT_RPS": str(RATE),
        "IDEMPOTENCY_LOCK_SECONDS": "1",
        "CALLER_IDENTITY_PREFIXES": "anonymous=guest-",
    }
    return [make_facade(upstream.url, **env), make_facade(upstream.url, **env)]


def test_replicas_share_one_rate_budget(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    results = burst(replicas, 30)

    failures = [r for r in results if isinstance(r, grpc.RpcError)]
    assert failures == []
    seen = upstream.requests()
    assert len(seen) == 30
    assert all(r["status"] == 201 for r in seen), "no 429 reached the emulator"
    assert upstream.busiest_second() <= RATE + BURST


def test_an_auth_token_replica_and_an_api_key_replica_share_the_account_budget(
    make_facade, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    # Twilio's limit is the account's: a replica on the auth token and one on an API key of the
    # same account (as during a key rotation) must draw from one budget, not one each.
    shared = {"REDIS_URL": redis_server.url, "FLEX_RATE_LIMIT_RPS": str(RATE)}
    on_token = make_facade(upstream.url, **shared)
    on_key = make_facade(
        upstream.url,
        TWILIO_AUTH_TOKEN="",
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_API_KEY=API_KEY,
        TWILIO_API_SECRET=API_SECRET,
        **shared,
    )
    results = burst([on_token, on_key], 12)
    assert [r for r in results if isinstance(r, grpc.RpcError)] == []
    seen = upstream.requests()
    assert len({r["headers"]["Authorization"] for r in seen}) == 2, "both credentials used"
    assert all(r["status"] == 201 for r in seen), "no 429 reached the emulator"
    assert upstream.busiest_second() <= RATE + BURST


def test_single_replica_without_redis_queues_instead_of_429(
    make_facade, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url)
    results = burst([facade], 30)
    assert [r for r in results if isinstance(r, grpc.RpcError)] == []
    seen = upstream.requests()
    assert [r["status"] for r in seen] == [201] * 30
    assert upstream.busiest_second() <= RATE + BURST


def test_short_deadlines_are_refused_fast_with_retry_info(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    with ThreadPoolExecutor(1) as pool:
        backlog = pool.submit(burst, replicas, 15)  # three seconds of queue
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            replicas[1].create(timeout=0.5)
        elapsed = time.monotonic() - started
        assert all(not isinstance(r, grpc.RpcError) for r in backlog.result())

    details = rich_status(caught.value)
    assert details["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0.5
    assert elapsed < 0.4, "refused at once, not after its 0.5 s deadline"
    metrics = httpx.get(f"http://127.0.0.1:{replicas[1].metrics_port}/metrics").text
    assert "flexwebchat_rate_limit_refused_total 1.0" in metrics


def test_a_request_id_retried_on_another_replica_returns_the_same_chat(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    request_id = str(uuid.uuid4())
    first = replicas[0].create(request_id=request_id, identity="guest-ada")
    again = replicas[1].create(request_id=request_id, identity="guest-ada")
    assert (again.conversation_sid, again.identity) == (first.conversation_sid, first.identity)
    assert len(upstream.requests()) == 1

    with pytest.raises(grpc.RpcError) as caught:
        replicas[1].create(request_id=request_id, identity="guest-someone-else")
    details = rich_status(caught.value)
    assert details["code"] == grpc.StatusCode.INVALID_ARGUMENT
    assert details["BadRequest"].field_violations[0].field == "request_id"


def test_concurrent_duplicates_coalesce_across_replicas(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    upstream.fault(latency=1.0)
    request_id = str(uuid.uuid4())

    def call(i: int):
        return replicas[i % 2].create(request_id=request_id, timeout=10)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(call, range(8)))
    assert len({r.conversation_sid for r in replies}) == 1
    assert len(upstream.requests()) == 1


def test_a_stored_rejection_is_replayed_not_resent(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 404, "code": 20404, "message": "Address not found"})
    request_id = str(uuid.uuid4())
    codes = []
    for facade in replicas:
        with pytest.raises(grpc.RpcError) as caught:
            facade.create(request_id=request_id)
        codes.append((caught.value.code(), caught.value.details()))
    assert codes[0] == codes[1] == (grpc.StatusCode.NOT_FOUND, "Twilio: Address not found")
    assert len(upstream.requests()) == 1


def test_a_replica_killed_mid_request_does_not_block_the_id(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    upstream.fault({"latency": 3.0, "drop": True})  # the doomed replica's request hangs, then dies
    request_id = str(uuid.uuid4())
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(replicas[0].create, request_id=request_id, timeout=10)
        time.sleep(0.5)
        replicas[0].proc.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError):
            doomed.result()
    # The lock (IDEMPOTENCY_LOCK_SECONDS=1) expires with nobody renewing it; then B runs the id.
    started = time.monotonic()
    reply = replicas[1].create(request_id=request_id, timeout=10)
    assert reply.conversation_sid.startswith("CH")
    assert time.monotonic() - started < 3
    assert [r["status"] for r in upstream.requests()][-1] == 201


def test_redis_down_fails_closed_fast_and_recovers(make_facade, upstream: EmulatorProcess) -> None:
    redis = start_redis()
    try:
        facade = make_facade(upstream.url, REDIS_URL=redis.url)
        facade.create(request_id=str(uuid.uuid4()))
        stop_process(redis.proc)

        for fields in ({}, {"request_id": str(uuid.uuid4())}):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                facade.create(timeout=10, **fields)
            assert time.monotonic() - started < 3, "no hang"
            details = rich_status(caught.value)
            assert details["code"] == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in details["message"] and "RetryInfo" in details
        assert facade.proc.poll() is None, "no crash"
        # A blip after Redis has answered once must not empty the Service of endpoints.
        assert readiness(facade.port) == health_pb2.HealthCheckResponse.SERVING
        assert len(upstream.requests()) == 1, "nothing reached Twilio without the shared limit"
        metrics = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics").text
        assert "flexwebchat_shared_state_errors_total" in metrics

        redis = start_redis(port=redis.port)
        assert facade.create().conversation_sid.startswith("CH")
    finally:
        stop_process(redis.proc)


def test_a_429_slows_every_replica_down(
    replicas: list[FacadeProcess], upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 429, "code": 20429, "retry_after": "1.5"})
    results = burst(replicas, 4)
    assert [r for r in results if isinstance(r, grpc.RpcError)] == []
    seen = upstream.requests()
    refused = [r["time"] for r in seen if r["status"] == 429]
    later = [r["time"] for r in seen if r["status"] == 201]
    assert len(refused) == 1 and len(later) == 4
    # After Twilio's 429 nobody, on either replica, sent anything for Retry-After seconds.
    assert min(later) - refused[0] >= 1.4


def readiness(port: int) -> int:
    # wait_for_ready: the process may still be starting (imports, the credential check).
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=15, wait_for_ready=True
        )
    return int(reply.status)


def test_not_ready_until_redis_has_answered_once(upstream: EmulatorProcess, tmp_path) -> None:
    # A REDIS_URL nobody answers at (a typo, a NetworkPolicy): readiness must hold the rollout
    # instead of reporting SERVING and failing every call.
    redis_port = free_port()
    env = facade_env(upstream.url, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    log_path = tmp_path / "facade.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, stdout=log_file, stderr=log_file, cwd=ROOT
        )
    facade = FacadeProcess(proc, int(env["GRPC_PORT"]), int(env["METRICS_PORT"]), log_path)
    redis = None
    try:
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert readiness(facade.port) == not_serving
        time.sleep(1.5)  # a few of its retries later, still not ready
        assert readiness(facade.port) == not_serving
        metrics = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics").text
        assert "flexwebchat_shared_state_errors_total 0.0" not in metrics

        redis = start_redis(port=redis_port)
        deadline = time.monotonic() + 10
        while readiness(facade.port) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, facade.logs()
            time.sleep(0.1)
        assert facade.create().conversation_sid.startswith("CH")
    finally:
        assert facade.stop() == 0
        if redis is not None:
            stop_process(redis.proc)


@pytest.fixture
def replica(make_facade, upstream: EmulatorProcess, redis_server: RedisProcess) -> FacadeProcess:
    return make_facade(  # type: ignore[no-any-return]
        upstream.url, REDIS_URL=redis_server.url, IDEMPOTENCY_LOCK_SECONDS="1"
    )


def _redis(server: RedisProcess) -> Redis:
    return Redis(host="127.0.0.1", port=server.port)


def _shared_state_errors(facade: FacadeProcess) -> float:
    return facade.metric("flexwebchat_shared_state_errors_total")


def test_a_forged_record_is_never_replayed(replica, upstream, redis_server) -> None:
    request_id = str(uuid.uuid4())
    request = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID, request_id=request_id)
    forged = webchat_pb2.CreateWebChatResponse(conversation_sid="CH" + "e" * 32, identity="x")
    record = {
        "fingerprint": fingerprint(request),
        "owner": "0" * 32,
        "done": True,
        "ok": True,
        "payload": base64.b64encode(forged.SerializeToString()).decode(),
        "mac": "0" * 64,
    }
    key = f"flexwebchat:{ACCOUNT_SID.lower()}:idempotency:{request_id}"
    _redis(redis_server).set(key, json.dumps(record))
    with pytest.raises(grpc.RpcError) as caught:
        replica.stub.CreateWebChat(request, timeout=5)
    status = rich_status(caught.value)
    assert status["code"] == grpc.StatusCode.UNAVAILABLE
    assert status["ErrorInfo"].reason == "SHARED_STATE_UNAVAILABLE"
    assert _shared_state_errors(replica) == 1
    assert 0 < _redis(redis_server).pttl(key) <= 1000  # it no longer blocks the id for ever
    assert upstream.requests() == []


@pytest.mark.parametrize("kind", ["garbage", "deeply nested JSON", "a list"])
def test_garbage_at_a_key_is_unavailable_then_expires(
    replica, upstream, redis_server, kind: str
) -> None:
    request_id = str(uuid.uuid4())
    key = f"flexwebchat:{ACCOUNT_SID.lower()}:idempotency:{request_id}"
    if kind == "garbage":
        _redis(redis_server).set(key, b"\xff not json")
    elif kind == "deeply nested JSON":  # Python's JSON reader gives up with RecursionError
        _redis(redis_server).set(key, b"[" * 100_000)
    else:  # a key of another type: WRONGTYPE for every command the facade sends it
        _redis(redis_server).rpush(key, b"x")
    with pytest.raises(grpc.RpcError) as caught:
        replica.create(request_id=request_id)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _shared_state_errors(replica) == 1
    assert "Traceback" not in replica.logs()
    time.sleep(1.1)  # the lock time given to the key
    assert replica.create(request_id=request_id).conversation_sid.startswith("CH")


@pytest.mark.parametrize("kind", ["an hour ahead", "a hash", "nan"])
def test_a_schedule_pushed_far_ahead_is_reset(replica, upstream, redis_server, kind: str) -> None:
    client = _redis(redis_server)
    key = f"flexwebchat:{{{ACCOUNT_SID.lower()}}}:ratelimit"
    if kind == "a hash":
        client.hset(key, "tat", 0)
    elif kind == "nan":  # Lua reads it as a number that no comparison rejects
        client.set(key, "nan")
    else:
        seconds, micros = client.time()
        client.set(key, (seconds + 3600) * 1_000_000 + micros)
    with pytest.raises(grpc.RpcError) as caught:
        replica.create()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _shared_state_errors(replica) == 1
    assert replica.create().conversation_sid.startswith("CH")


def test_every_key_the_facade_writes_expires(replica, upstream, redis_server) -> None:
    upstream.fault({"status": 429, "code": 20429, "retry_after": "0.2"})
    replica.create(request_id=str(uuid.uuid4()))
    replica.create()
    client = _redis(redis_server)
    keys = list(client.scan_iter("flexwebchat:*"))
    kinds = {k.decode().split(":")[2] for k in keys}  # flexwebchat:<account>:<kind>...
    assert kinds == {"idempotency", "ratelimit"}
    assert all(client.pttl(key) > 0 for key in keys), {k: client.pttl(k) for k in keys}


def test_a_redis_older_than_7_is_refused_at_start(tmp_path, upstream: EmulatorProcess) -> None:
    """A stand-in speaking the Redis protocol that reports 6.2 (no such real Redis is packaged
    here): the facade needs SET with both NX and GET."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            buffer = b""
            while chunk := conn.recv(65536):
                buffer += chunk
                while (command := _resp_command(buffer)) is not None:
                    words, buffer = command
                    if words[0].upper() == b"INFO":
                        info = b"# Server\r\nredis_version:6.2.14\r\n"
                        conn.sendall(b"$%d\r\n%s\r\n" % (len(info), info))
                    elif words[0].upper() == b"PING":
                        conn.sendall(b"+PONG\r\n")
                    else:
                        conn.sendall(b"+OK\r\n")

    threading.Thread(target=answer, daemon=True).start()
    env = facade_env(upstream.url, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    server.close()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "flexwebchat: refusing to start: REDIS_URL: Redis 6.2.14 is too old; "
        "the facade needs 7.0 or later (SET with NX and GET)"
    )


def _resp_command(buffer: bytes) -> tuple[list[bytes], bytes] | None:
    """One RESP array of bulk strings from the front of ``buffer``, and the rest."""
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None
    head, rest = buffer.split(b"\r\n", 1)
    words = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line[1:])
        if len(rest) < size + 2:
            return None
        words.append(rest[:size])
        rest = rest[size + 2 :]
    return words, rest
