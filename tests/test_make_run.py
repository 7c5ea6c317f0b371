"""`make run` without credentials: the emulator, loudly, and the README's examples as written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADDRESS_SID, ROOT, free_port
from test_grpcurl import GRPCURL

from emulator.harness import wait_until_serving


def test_make_run_falls_back_to_the_emulator_loudly_and_serves(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FLEX_", "REDIS"))}
    port = free_port()
    env.update(GRPC_PORT=str(port), METRICS_PORT=str(free_port()))
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        # What `make run` runs (see the Makefile).
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.devrun"],
            env=env,
            cwd=ROOT,
            stderr=err,
            start_new_session=True,  # its own group: the cleanup below reaches every child
        )
    try:
        assert wait_until_serving(f"127.0.0.1:{port}", proc, timeout=20)
        children = [
            int(pid)
            for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        banner = stderr.read_text()
        assert "NO TWILIO CREDENTIALS" in banner and "EMULATOR" in banner
        assert "DEMO tokens" in banner

        # Every grpcurl line of the README, pasted as written (only the port differs), and the
        # README's Python caller.
        readme_walk_through(port)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert len(children) == 2
        for pid in children:  # the emulator and the facade are gone too
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        kill_family(proc)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_make_run_with_real_credentials_listens_on_loopback_only(tmp_path: Path, upstream) -> None:
    from emulator.app import ACCOUNT_SID, AUTH_TOKEN

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FLEX_", "REDIS"))}
    port = free_port()
    env.update(
        GRPC_PORT=str(port),
        METRICS_PORT="0",
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        FLEX_API_BASE_URL=upstream.url,
    )
    env.pop("GRPC_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.devrun"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    try:
        assert wait_until_serving(f"127.0.0.1:{port}", proc, timeout=20)
        addresses = listening_addresses(port)
        # 127.0.0.1, ::1, ::ffff:127.0.0.1
        loopback = {"0100007F", "0" * 24 + "01000000", "0" * 16 + "FFFF0000" + "0100007F"}
        assert addresses and addresses <= loopback, addresses
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def readme_examples() -> tuple[list[tuple[str, str]], str]:
    """The README's ``$ grpcurl`` commands, each with the output it shows, and its Python code."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        for command in re.split(r"^\$ ", block, flags=re.M)[1:]:
            lines = command.splitlines()
            n = next(i for i in range(1, len(lines) + 1) if _complete("\n".join(lines[:i])))
            commands.append(("\n".join(lines[:n]), "\n".join(lines[n:])))
    (python,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    return commands, python


def _complete(command: str) -> bool:
    """Whether a shell would run these lines as they are: no open quote, no trailing ``\\``."""
    try:
        return bool(shlex.split(command)) and not command.endswith("\\")
    except ValueError:
        return False


def readme_walk_through(port: int) -> None:
    commands, python = readme_examples()
    assert len(commands) >= 6, "the README walks through list, describe, create, errors, refresh"
    token = ""
    for command, shown in commands:
        command = command.replace("localhost:50051", f"localhost:{port}")
        command = command.replace("eyJhbGciOi...", token)  # the reader pastes the token
        result = subprocess.run(
            ["bash", "-c", command.replace("grpcurl", GRPCURL, 1)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if shown.startswith("ERROR:"):
            code = re.search(r"Code: (\w+)", shown)
            assert code and f"Code: {code.group(1)}" in result.stderr, (command, result.stderr)
            continue
        assert result.returncode == 0, (command, result.stderr)
        if shown.startswith("{"):  # the same fields as the README shows, none missing
            answer = json.loads(result.stdout)
            assert set(answer) >= set(re.findall(r'^  "(\w+)":', shown, re.M)), command
            token = answer.get("access_token", token)
        else:
            assert shown.splitlines()[0] in result.stdout, command
    assert token, "the README's walk-through gets a guest token"

    program = python.replace("localhost:50051", f"localhost:{port}")
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CH"), result.stdout


def devrun(tmp_path: Path, **overrides: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`make run`'s runner in a process group of its own, as a terminal's foreground job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FLEX_", "REDIS"))}
    port = free_port()
    env.update(GRPC_PORT=str(port), METRICS_PORT="0", **overrides)
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.devrun"],
            env=env,
            cwd=ROOT,
            stdout=(tmp_path / "stdout").open("w"),  # the facade's log lines
            stderr=err,
            start_new_session=True,
        )
    return proc, port, stderr


def kill_family(proc: subprocess.Popen[bytes]) -> None:
    """Nothing outlives a failed test: the runner and its children (in sessions of their own)."""
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"TWILIO_API_KEY": "SK" + "0" * 32}, "TWILIO_API_KEY is set without TWILIO_API_SECRET"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "0" * 32}, "TWILIO_ACCOUNT_SID is set without a secret"),
        ({"TWILIO_REGION": "ie1"}, "no Twilio credentials"),
    ],
)
def test_make_run_with_any_twilio_variable_never_runs_the_emulator(
    tmp_path: Path, variables: dict[str, str], named: str
) -> None:
    proc, _, stderr = devrun(tmp_path, **variables)
    try:
        assert proc.wait(30) == 2
    finally:
        kill_family(proc)
    said = stderr.read_text()
    assert named in said and "EMULATOR" not in said


@pytest.mark.parametrize("presses", [1, 2])
def test_make_run_one_ctrl_c_drains_and_a_second_stops_at_once(
    tmp_path: Path, presses: int
) -> None:
    import grpc
    from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc

    proc, port, stderr = devrun(tmp_path, SHUTDOWN_GRACE_SECONDS="30")
    try:
        assert wait_until_serving(f"127.0.0.1:{port}", proc, timeout=20)
        emulator = re.search(r"EMULATOR at (\S+)\.", stderr.read_text())
        assert emulator
        httpx.post(emulator[1] + "/__emulator/faults", json={"latency": 3}).raise_for_status()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = webchat_pb2_grpc.WebChatServiceStub(channel)
            request = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID)
            call = stub.CreateWebChat.future(request, timeout=20)
            time.sleep(1)  # the create is at the emulator now
            for _ in range(presses):
                os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
                time.sleep(0.3)
            if presses == 1:
                assert call.result().conversation_sid.startswith("CH")  # drained, not cut
            else:
                with pytest.raises(grpc.RpcError) as cut:
                    call.result()  # cut at once
                assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(20) in (0, -signal.SIGINT)
        assert proc.returncode == 0 or presses == 2
        if presses == 2:  # logged and counted as the caller saw it
            [line] = [
                x for x in (tmp_path / "stdout").read_text().splitlines() if "CreateWebChat" in x
            ]
            assert "UNAVAILABLE" in line and "CANCELLED" not in line, line
    finally:
        kill_family(proc)
