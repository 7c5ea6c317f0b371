"""/metrics through real sockets: it listens where it is told, and clients that trickle bytes
cannot keep a scrape from being answered."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import EmulatorProcess


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_metrics_listen_on_grpc_host_unless_metrics_host_says_otherwise(
    make_facade, upstream: EmulatorProcess
) -> None:
    """127.0.0.2 is another loopback address: a listener on every interface answers there."""
    loopback_only = make_facade(upstream.url)  # GRPC_HOST=127.0.0.1
    assert reachable("127.0.0.1", loopback_only.metrics_port)
    assert not reachable("127.0.0.2", loopback_only.metrics_port)

    elsewhere = make_facade(upstream.url, METRICS_HOST="127.0.0.2")
    assert httpx.get(f"http://127.0.0.2:{elsewhere.metrics_port}/metrics").status_code == 200
    assert not reachable("127.0.0.1", elsewhere.metrics_port)

    everywhere = make_facade(upstream.url, METRICS_HOST="::")
    assert reachable("127.0.0.2", everywhere.metrics_port)


def trickle(sockets: list[socket.socket], stop: threading.Event, every: float) -> None:
    """A request head sent one byte per ``every`` seconds on each socket, never finished."""
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    for byte in head:
        for sock in sockets:
            try:
                sock.send(bytes([byte]))
            except OSError:
                pass  # closed by the server: what it should do
        if stop.wait(every):
            return


def test_slow_clients_cannot_block_a_scrape(make_facade, upstream: EmulatorProcess) -> None:
    facade = make_facade(upstream.url)
    slow = [socket.create_connection(("127.0.0.1", facade.metrics_port)) for _ in range(12)]
    stop = threading.Event()
    sender = threading.Thread(target=trickle, args=(slow, stop, 3.0), daemon=True)
    sender.start()
    try:
        time.sleep(0.5)  # every slow connection accepted and sending
        for _ in range(3):
            scrape = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics", timeout=10)
            assert scrape.status_code == 200
            assert "flexwebchat_rpcs_in_flight" in scrape.text
        for sock in slow:  # each is closed at its deadline, however often it sends
            sock.settimeout(20)
            assert closed(sock)
    finally:
        stop.set()
        sender.join()
        for sock in slow:
            sock.close()


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK"),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 405"),
    ],
)
def test_one_request_per_connection(make_facade, upstream: Any, request_head, status) -> None:
    facade = make_facade(upstream.url)
    with socket.create_connection(("127.0.0.1", facade.metrics_port), timeout=5) as sock:
        sock.sendall(request_head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(status)
    assert b"Connection: close" in answer


def test_metrics_port_taken_on_metrics_host_is_refused() -> None:
    from test_config_and_secrets import refusal

    from emulator.harness import facade_env

    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = facade_env("http://127.0.0.1:1", METRICS_HOST="127.0.0.2", METRICS_PORT=str(port))
        assert "METRICS_HOST=127.0.0.2" in refusal(env)
