"""`make run` without credentials: the emulator, loudly, and the README's grpcurl lines work."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ADDRESS_SID, ROOT, free_port
from test_grpcurl import grpcurl

from emulator.harness import wait_until_serving


def test_make_run_falls_back_to_the_emulator_loudly_and_serves(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FLEX_", "REDIS"))}
    port = free_port()
    env.update(GRPC_PORT=str(port), METRICS_PORT=str(free_port()))
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        # What `make run` runs (see the Makefile).
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.devrun"], env=env, cwd=ROOT, stderr=err
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

        # The README's guest flow: a chat with a token and a first message, then a refresh.
        body = json.dumps(
            {
                "address_sid": ADDRESS_SID,
                "customer_friendly_name": "Ada",
                "issue_token": True,
                "initial_message": "Hello, I need help with my bill",
            }
        )
        result = grpcurl(
            "-d", body, f"localhost:{port}", "flexwebchat.v1.WebChatService/CreateWebChat"
        )
        assert result.returncode == 0, result.stderr
        chat = json.loads(result.stdout)
        assert chat["conversation_sid"].startswith("CH")
        assert chat["initial_message_sid"].startswith("IM")
        assert chat["access_token"].count(".") == 2 and chat["access_token_expires_at"]
        refresh = json.dumps({"access_token": chat["access_token"]})
        result = grpcurl(
            "-d", refresh, f"localhost:{port}", "flexwebchat.v1.WebChatService/RefreshGuestToken"
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["identity"] == chat["identity"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert len(children) == 2
        for pid in children:  # the emulator and the facade are gone too
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing outlives a failed test
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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
