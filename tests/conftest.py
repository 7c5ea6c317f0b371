"""Real processes on loopback: the Flex emulator, the facade (``python -m service``) and Redis.

Every port is picked free at run time; every process started here is stopped at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emulator.app import ACCOUNT_SID, AUTH_TOKEN

ROOT = Path(__file__).resolve().parent.parent
ADDRESS_SID = "IG" + "0123456789abcdef" * 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10
) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@dataclass
class EmulatorProcess:
    url: str
    proc: subprocess.Popen[str]
    control: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.control = httpx.Client(base_url=self.url, timeout=10)

    def requests(self) -> list[dict[str, Any]]:
        return list(self.control.get("/__emulator/requests").json())

    def fault(self, *faults: dict[str, Any], latency: float | None = None) -> None:
        spec: dict[str, Any] = {"faults": list(faults)}
        if latency is not None:
            spec["latency"] = latency
        self.control.post("/__emulator/faults", json=spec).raise_for_status()

    def reset(self) -> None:
        self.control.post("/__emulator/reset").raise_for_status()


def start_emulator(rate_limit: float = 5.0) -> EmulatorProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--rate-limit", str(rate_limit)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("emulator listening on "), line
    return EmulatorProcess(url=line.split()[-1], proc=proc)


@dataclass
class FacadeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    channel: grpc.Channel = field(init=False)
    stub: webchat_pb2_grpc.WebChatServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = webchat_pb2_grpc.WebChatServiceStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def create(self, timeout: float = 10, **fields: Any) -> webchat_pb2.CreateWebChatResponse:
        fields.setdefault("address_sid", ADDRESS_SID)
        return self.stub.CreateWebChat(webchat_pb2.CreateWebChatRequest(**fields), timeout=timeout)

    def logs(self) -> str:
        return self.log_path.read_text()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.channel.close()
        return stop_process(self.proc, sig)


def facade_env(emulator_url: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FLEX_", "REDIS"))}
    env.update(
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        FLEX_API_BASE_URL=emulator_url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT=str(free_port()),
        METRICS_PORT=str(free_port()),
        SHUTDOWN_DELAY_SECONDS="0",
        SHUTDOWN_GRACE_SECONDS="5",
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    )
    env.update(overrides)
    return env


def start_facade(env: dict[str, str], log_path: Path) -> FacadeProcess:
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    facade = FacadeProcess(proc, int(env["GRPC_PORT"]), int(env.get("METRICS_PORT", "0")), log_path)
    health = health_pb2_grpc.HealthStub(facade.channel)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"facade exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return facade
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            facade.stop()
            raise RuntimeError(f"facade did not become healthy:\n{log_path.read_text()}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorProcess]:
    """One emulator (5 requests/second, as Twilio) for the session; reset before each use."""
    process = start_emulator()
    yield process
    stop_process(process.proc)


@pytest.fixture(scope="session")
def fast_emulator() -> Iterator[EmulatorProcess]:
    """An emulator without a rate limit, for tests that make many calls."""
    process = start_emulator(rate_limit=0)
    yield process
    stop_process(process.proc)


@pytest.fixture
def upstream(emulator: EmulatorProcess) -> EmulatorProcess:
    emulator.reset()
    return emulator


@pytest.fixture
def make_facade(tmp_path: Path) -> Iterator[Any]:
    """Starts facades with the given environment overrides; stops them all at teardown."""
    started: list[FacadeProcess] = []

    def make(emulator_url: str, **overrides: str) -> FacadeProcess:
        log_path = tmp_path / f"facade-{len(started)}.log"
        facade = start_facade(facade_env(emulator_url, **overrides), log_path)
        started.append(facade)
        return facade

    yield make
    for facade in started:
        facade.stop()


@pytest.fixture
def facade(make_facade: Any, upstream: EmulatorProcess) -> FacadeProcess:
    """A facade with default settings in front of a freshly reset emulator."""
    return make_facade(upstream.url)  # type: ignore[no-any-return]


def rich_status(error: grpc.RpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call, unpacked by type name."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    details: dict[str, Any] = {"code": error.code(), "message": error.details()}  # type: ignore[attr-defined]
    if status is None:
        return details
    for packed in status.details:
        for kind in (
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
        ):
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                details[kind.__name__] = detail
    return details


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            return str(client.execute_command(*args))
        finally:
            client.close()


def start_redis(port: int | None = None) -> RedisProcess:
    import shutil

    import redis

    binary = shutil.which("redis-server")
    assert binary, "redis-server is installed by `make system-deps` (Debian package redis-server)"
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.2).ping()
            return RedisProcess(port, proc)
        except redis.RedisError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop_process(proc)
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    server = start_redis()
    yield server
    stop_process(server.proc)
