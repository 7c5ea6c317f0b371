"""Real processes on loopback for tests and benchmarks: the Flex emulator, the facade
(``python -m service``) and Redis, each on a port picked free at run time.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import redis
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET, AUTH_TOKEN, SERVICE_SID

ROOT = Path(__file__).resolve().parent.parent  # the checkout
ADDRESS_SID = "IG" + "0123456789abcdef" * 2
SERVICE = "flexwebchat.v1.WebChatService"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port from bind(0) lies in that
    range, where any outgoing connection on the machine may take it before the server binds it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        port = random.randrange(max(low - 12000, 1024), low)  # noqa: S311 (a port, not a secret)
        if port in _HANDED_OUT:  # free now, but maybe about to be bound by the one who asked
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
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

    def checks(self) -> list[dict[str, Any]]:
        """The facades' credential checks, apart from ``requests``."""
        return list(self.control.get("/__emulator/checks").json())

    def conversations(self) -> dict[str, str]:
        """Every conversation the emulator created (what Twilio would hold): SID -> identity."""
        return dict(self.control.get("/__emulator/conversations").json())

    def set_state(self, conversation_sid: str, state: str) -> None:
        """Sets a conversation's state, as Flex does when an agent ends the chat (``closed``)."""
        answer = self.control.post(
            f"/__emulator/conversations/{conversation_sid}", json={"state": state}
        )
        answer.raise_for_status()

    def busiest_second(self) -> int:
        """The most requests that arrived within any 1 s window, refused ones included."""
        times = sorted(r["time"] for r in self.requests())
        return max(
            (sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times)),
            default=0,
        )

    def fault(self, *faults: dict[str, Any], latency: float | None = None) -> None:
        spec: dict[str, Any] = {"faults": list(faults)}
        if latency is not None:
            spec["latency"] = latency
        self.control.post("/__emulator/faults", json=spec).raise_for_status()

    def accept_credentials(self, credentials: dict[str, str]) -> None:
        """From now on the emulator accepts these (user -> secret) only, as Twilio after a
        rotation or revocation; ``reset`` restores the defaults."""
        self.control.post("/__emulator/credentials", json=credentials).raise_for_status()

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

    def refresh(self, access_token: str, timeout: float = 10) -> Any:
        request = webchat_pb2.RefreshGuestTokenRequest(access_token=access_token)
        return self.stub.RefreshGuestToken(request, timeout=timeout)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text

    def metric(self, sample: str) -> float:
        """The value of one exported sample (name with its labels), 0 when not exported yet."""
        match = re.search(rf"^{re.escape(sample)} (\S+)$", self.metrics(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def logs(self) -> str:
        return self.log_path.read_text()

    def log_lines(self) -> list[dict[str, Any]]:
        # Only whole lines: a read can overlap the facade writing one (a write that crosses a
        # page boundary is visible half done), and that half is no JSON.
        whole = self.logs().rpartition("\n")[0]
        return [json.loads(line) for line in whole.splitlines() if line.startswith("{")]

    def rpc_lines(self, count: int = 1, timeout: float = 3) -> list[dict[str, Any]]:
        """The one log line per RPC; waits for at least ``count`` (a status can reach the caller
        a moment before its log line is written)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log_lines() if line["msg"] == "rpc"]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

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
        # The emulator answers in milliseconds; the production default (1 s, until enough
        # attempts are observed) would refuse the tests' short deadlines before any call.
        FLEX_LATENCY_ESTIMATE_SECONDS="0.1",
    )
    env.update(overrides)
    return env


def guest_env(emulator_url: str) -> dict[str, str]:
    """facade_env overrides turning guest tokens and first messages on (emulator API key)."""
    return {
        "TWILIO_API_KEY": API_KEY,
        "TWILIO_API_SECRET": API_SECRET,
        "TWILIO_CONVERSATIONS_SERVICE_SID": SERVICE_SID,
        "CONVERSATIONS_API_BASE_URL": emulator_url,
    }


def facade_command(checkout: Path | None = None) -> list[str]:
    """How the facade of this checkout, or of ``checkout`` (another one, with its own ``.venv``:
    how the benchmark measures an older commit), is started. With ``FLEXWEBCHAT_FACADE_PYTHON``
    set (``make bench`` does), this checkout's facade runs on that interpreter as the image runs
    it: ``python -m flexwebchat_server`` with the runtime dependencies only, none of the test
    tools."""
    if checkout is not None:
        return [str(checkout / ".venv" / "bin" / "python"), "-m", "service"]
    if os.environ.get("FLEXWEBCHAT_FACADE_PYTHON"):
        return [os.environ["FLEXWEBCHAT_FACADE_PYTHON"], "-m", "flexwebchat_server"]
    return [sys.executable, "-m", "service"]


def start_facade(
    env: dict[str, str], log_path: Path, checkout: Path | None = None
) -> FacadeProcess:
    """The facade started as ``facade_command(checkout)`` says, once it is SERVING."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            facade_command(checkout),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=checkout or ROOT,
        )
    facade = FacadeProcess(proc, int(env["GRPC_PORT"]), int(env.get("METRICS_PORT", "0")), log_path)
    # Under TLS the plaintext HEALTH_PORT is what a kubelet (and this wait) probes.
    probe_port = env.get("HEALTH_PORT") or env["GRPC_PORT"]
    if wait_until_serving(f"127.0.0.1:{probe_port}", proc, timeout=20):
        return facade
    facade.stop()
    raise RuntimeError(f"facade did not become healthy:\n{log_path.read_text()}")


# A probe refused before the server listens must try again at its next poll: gRPC's default
# reconnect backoff (1 s, with jitter) made every start look about half a second slower.
_PROBE_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def wait_until_serving(target: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Polls ``target``'s health every 50 ms until the service's own name is SERVING (ready, not
    just alive: with Redis, Redis has answered); False if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=_PROBE_OPTIONS) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the typed stub lacks Check
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    return False


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(port: int | None = None) -> RedisProcess:
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
