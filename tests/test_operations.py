"""What an operator relies on: graceful drain, one log line per RPC, metrics, resource limits."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import EmulatorProcess, FacadeProcess
from flexwebchat.v1 import webchat_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc


def health_status(facade: FacadeProcess) -> int:
    stub = health_pb2_grpc.HealthStub(facade.channel)
    return stub.Check(
        health_pb2.HealthCheckRequest(service="flexwebchat.v1.WebChatService"), timeout=2
    ).status


def test_sigterm_drains_in_flight_rpcs_and_exits_zero(
    make_facade, unlimited_upstream: EmulatorProcess
) -> None:
    unlimited_upstream.fault(latency=2.0)
    facade = make_facade(
        unlimited_upstream.url,
        FLEX_RATE_LIMIT_RPS="0",
        SHUTDOWN_DELAY_SECONDS="1",
        SHUTDOWN_GRACE_SECONDS="10",
    )
    with ThreadPoolExecutor(21) as pool:
        in_flight = [pool.submit(facade.create, timeout=15) for _ in range(20)]
        time.sleep(0.5)
        facade.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert health_status(facade) == health_pb2.HealthCheckResponse.NOT_SERVING
        late = pool.submit(facade.create, timeout=15)  # endpoints not updated yet: still served
        replies = [f.result() for f in in_flight] + [late.result()]
    assert all(r.conversation_sid.startswith("CH") for r in replies)
    assert facade.proc.wait(15) == 0
    assert len(unlimited_upstream.requests()) == 21
    assert facade.log_lines()[-1]["msg"] == "stopped"


def test_after_the_delay_new_rpcs_are_refused_while_in_flight_ones_finish(
    make_facade, unlimited_upstream: EmulatorProcess
) -> None:
    unlimited_upstream.fault(latency=1.5)
    facade = make_facade(
        unlimited_upstream.url, FLEX_RATE_LIMIT_RPS="0", SHUTDOWN_DELAY_SECONDS="0.2"
    )
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(facade.create, timeout=10)
        time.sleep(0.3)
        facade.proc.send_signal(signal.SIGTERM)
        time.sleep(0.6)
        with pytest.raises(grpc.RpcError) as caught:
            facade.create(timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert running.result().conversation_sid.startswith("CH")
    assert facade.proc.wait(10) == 0


def test_one_log_line_per_rpc_with_what_happened(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 503, "retry_after": "0"})
    request_id = "7d4f8a60-1c1e-4f0e-9a3a-6f2b9b1c2d3e"
    reply = facade.stub.CreateWebChat(
        webchat_pb2.CreateWebChatRequest(
            address_sid="IG" + "0" * 32,
            pre_engagement_data='{"email": "private-person@example.com"}',
            customer_friendly_name="Private Person",
            request_id=request_id,
        ),
        metadata=[("x-request-id", "trace-abc-123")],
        timeout=10,
    )
    upstream.fault({"status": 404, "code": 20404, "message": "Address not found"})
    with pytest.raises(grpc.RpcError):
        facade.create()

    ok, failed = facade.rpc_lines(count=2)
    assert ok["method"] == "CreateWebChat" and ok["code"] == "OK"
    assert ok["caller"] == "anonymous"
    assert ok["trace_id"] == "trace-abc-123"
    assert ok["request_id"] == request_id
    assert ok["conversation_sid"] == reply.conversation_sid
    assert ok["upstream_attempts"] == 2
    assert ok["duration_ms"] > 0
    assert failed["code"] == "NOT_FOUND" and failed["twilio_code"] == 20404
    # Twilio's text can quote the caller's personal data: the log keeps the code, not the text.
    assert failed["error"] == "Twilio answered 404 (Twilio code 20404)"
    assert "Address not found" not in facade.logs()
    logs = facade.logs()
    assert "private-person@example.com" not in logs and "Private Person" not in logs


def test_metrics_count_rpcs_upstream_requests_retries_and_waits(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 503, "retry_after": "0"})
    facade.create()
    with pytest.raises(grpc.RpcError):
        facade.create(address_sid="bad")
    text = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics").text

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert match, f"{sample} missing from /metrics"
        return float(match.group(1))

    assert value('flexwebchat_rpcs_total{caller="anonymous",code="OK",method="CreateWebChat"}') == 1
    assert (
        value(
            'flexwebchat_rpcs_total{caller="anonymous",code="INVALID_ARGUMENT",method="CreateWebChat"}'
        )
        == 1
    )
    assert value('flexwebchat_upstream_requests_total{status="503"}') == 1
    assert value('flexwebchat_upstream_requests_total{status="201"}') == 1
    assert value('flexwebchat_upstream_retries_total{cause="503"}') == 1
    assert value("flexwebchat_upstream_attempt_duration_seconds_count") == 2
    assert value("flexwebchat_rate_limit_wait_seconds_count") == 2
    assert value("flexwebchat_rpcs_in_flight") == 0
    assert value('flexwebchat_rpc_duration_seconds_count{method="CreateWebChat"}') == 2


def test_concurrency_limit_refuses_rather_than_hangs(
    make_facade, unlimited_upstream: EmulatorProcess
) -> None:
    unlimited_upstream.fault(latency=1.0)
    facade = make_facade(
        unlimited_upstream.url, FLEX_RATE_LIMIT_RPS="0", GRPC_MAX_CONCURRENT_RPCS="2"
    )
    results: list[object] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            outcome: object = facade.create(timeout=10)
        except grpc.RpcError as error:
            outcome = error.code()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
    assert sum(1 for r in results if not isinstance(r, grpc.StatusCode)) == 2


def test_oversized_messages_are_resource_exhausted(make_facade, upstream: EmulatorProcess) -> None:
    facade = make_facade(upstream.url, GRPC_MAX_MESSAGE_BYTES="4096")
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(pre_engagement_data='{"x": "' + "a" * 5000 + '"}')
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert upstream.requests() == []


def test_connection_ageing_never_cuts_a_call_short(
    make_facade, unlimited_upstream: EmulatorProcess
) -> None:
    # The connection is aged out mid-call, with a drain grace shorter than the call: the call
    # must still finish (the age grace covers the longest allowed call), not fail UNAVAILABLE
    # mid-attempt, which the caller could not tell from a lost conversation.
    unlimited_upstream.fault(latency=3.0)
    facade = make_facade(
        unlimited_upstream.url,
        FLEX_RATE_LIMIT_RPS="0",
        GRPC_MAX_CONNECTION_AGE_SECONDS="1",
        SHUTDOWN_GRACE_SECONDS="0.5",
        FLEX_MAX_DEADLINE_SECONDS="8",
        FLEX_DEFAULT_DEADLINE_SECONDS="8",  # at most the maximum, or the start is refused
    )
    reply = facade.create(timeout=8)
    assert reply.conversation_sid.startswith("CH")
    assert [r["status"] for r in unlimited_upstream.requests()] == [201]


def test_a_second_signal_stops_at_once(make_facade, unlimited_upstream: EmulatorProcess) -> None:
    facade = make_facade(
        unlimited_upstream.url, SHUTDOWN_DELAY_SECONDS="60", SHUTDOWN_GRACE_SECONDS="60"
    )
    # A call whose message never comes is cut by the stop: logged as the shutdown it was, not
    # as a message the caller failed to send.
    never = threading.Event()

    def no_message() -> Iterator[bytes]:
        never.wait(30)
        yield b""

    create = facade.channel.stream_unary("/flexwebchat.v1.WebChatService/CreateWebChat")
    waiting = create.future(no_message(), timeout=30)
    try:
        time.sleep(0.3)
        facade.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert facade.proc.poll() is None, "the first signal drains (for 60 s here)"
        facade.proc.send_signal(signal.SIGINT)
        assert facade.proc.wait(10) == 0
        assert "second signal: stopping at once" in facade.logs()
        assert waiting.exception(5).code() == grpc.StatusCode.UNAVAILABLE
        [line] = facade.rpc_lines()
        assert (line["method"], line["code"]) == ("CreateWebChat", "UNAVAILABLE"), line
        assert "shutting down" in line["error"]
    finally:
        never.set()


def test_the_metrics_port_serves_with_few_threads_and_times_out_idle_clients(
    facade: FacadeProcess,
) -> None:
    def threads() -> int:
        status = Path(f"/proc/{facade.proc.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]

    httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics")
    before = threads()
    idle = [socket.create_connection(("127.0.0.1", facade.metrics_port)) for _ in range(50)]
    try:
        time.sleep(0.5)
        assert threads() <= before + 4
        # The idle connections are closed by the server after its timeout...
        for sock in idle:
            sock.settimeout(15)
            assert sock.recv(1) == b""
        # ...and scrapes are answered again.
        reply = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics", timeout=10)
        assert "flexwebchat_rpcs_in_flight" in reply.text
    finally:
        for sock in idle:
            sock.close()
