"""The image, built from the Dockerfile and run the way the Deployment runs it.

podman builds it (``--isolation chroot``) on a Debian bookworm base made by debootstrap and passed
as ``PYTHON_IMAGE``: the official python:3.11-slim-bookworm cannot be pulled here. So this vouches
for the Dockerfile and the image's behaviour on a Debian base, not for the official base or a
cluster. The base is cached under ~/.cache/flexwebchat/ (see tests/image/debian-base.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, EmulatorProcess, free_port
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET
from emulator.harness import ADDRESS_SID, wait_until_serving

BASE = "localhost/flexwebchat-base:bookworm"
IMAGE = "localhost/flexwebchat:test"
SECRETS = "/var/run/secrets/flexwebchat"  # where the Deployment mounts the Secret

missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.needs("podman"),
    pytest.mark.skipif(
        bool(missing),
        reason=f"{', '.join(missing)} not installed (`make system-deps` installs them, as root)",
    ),
    # On a new machine the base is made first (debootstrap: minutes on a busy one), then built.
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # Setting rlimits is refused in this sandbox; podman's default ulimits would set some.
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> str:
    subprocess.run(
        ["bash", str(ROOT / "tests/image/debian-base.sh"), BASE], check=True, env=podman_env
    )
    # The default OCI isolation fails here ("cgroups in hybrid mode not supported").
    command = ["podman", "build", "--isolation", "chroot", "--build-arg", f"PYTHON_IMAGE={BASE}"]
    build = subprocess.run(
        [*command, "-t", IMAGE, str(ROOT)],
        capture_output=True,
        text=True,
        env=podman_env,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """The Secret as the kubelet mounts it: files readable by the pod's group (mode 0440)."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    values = {"account-sid": ACCOUNT_SID, "api-key": API_KEY, "api-secret": API_SECRET}
    for name, value in values.items():
        path = folder / name
        path.write_text(value)
        if os.geteuid() == 0:
            os.chown(path, 0, 10001)
            path.chmod(0o440)
        else:  # rootless podman maps users differently; readable by all is the closest
            path.chmod(0o444)
    folder.chmod(0o755)
    return folder


@pytest.fixture
def container(
    image: str, podman_env: dict[str, str], secrets: Path, fast_emulator: EmulatorProcess
) -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, int]]]:
    fast_emulator.reset()
    name = f"flexwebchat-test-{uuid.uuid4().hex[:8]}"
    ports = {"GRPC_PORT": free_port(), "METRICS_PORT": free_port(), "HEALTH_PORT": free_port()}
    settings = {
        "TWILIO_ACCOUNT_SID_FILE": f"{SECRETS}/account-sid",
        "TWILIO_API_KEY_FILE": f"{SECRETS}/api-key",
        "TWILIO_API_SECRET_FILE": f"{SECRETS}/api-secret",
        "FLEX_API_BASE_URL": fast_emulator.url,
        "FLEX_RATE_LIMIT_RPS": "0",
        "GRPC_HOST": "127.0.0.1",
        "SHUTDOWN_DELAY_SECONDS": "1",
        "SHUTDOWN_GRACE_SECONDS": "10",
        **{key: str(port) for key, port in ports.items()},
    }
    # The Deployment's securityContext: UID/GID 10001, read-only root, no capabilities, no new
    # privileges; the Secret as read-only files. Host network reaches the emulator on loopback.
    command = ["podman", "--runtime", "runc", "run", "--rm=false", "--name", name]
    command += ["--network=host", "--user", "10001:10001", "--read-only", "--cap-drop=ALL"]
    command += ["--security-opt", "no-new-privileges", "-v", f"{secrets}:{SECRETS}:ro"]
    for key, value in settings.items():
        command += ["-e", f"{key}={value}"]
    log = secrets.parent / "container.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, image], stdout=out, stderr=subprocess.STDOUT, env=podman_env
        )
    try:
        yield name, proc, ports
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, env=podman_env)
        fast_emulator.reset()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_image_serves_and_drains_like_the_deployment_runs_it(
    container: tuple[str, subprocess.Popen[bytes], dict[str, int]],
    podman_env: dict[str, str],
    fast_emulator: EmulatorProcess,
    secrets: Path,
) -> None:
    name, proc, ports = container
    assert wait_until_serving(f"127.0.0.1:{ports['HEALTH_PORT']}", proc, timeout=60)

    channel = grpc.insecure_channel(f"127.0.0.1:{ports['GRPC_PORT']}")
    stub = webchat_pb2_grpc.WebChatServiceStub(channel)
    request = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID)
    reply = stub.CreateWebChat(request, timeout=10)
    assert reply.conversation_sid.startswith("CH")
    [sent] = fast_emulator.requests()
    assert sent["status"] == 201 and sent["headers"]["Authorization"].startswith("Basic ")

    # SIGTERM (podman stop) with a call in flight: the call finishes, the process exits 0.
    fast_emulator.fault(latency=2.0)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stub.CreateWebChat, request, timeout=15)
        time.sleep(0.5)
        stop = subprocess.run(
            ["podman", "stop", "-t", "20", name], capture_output=True, text=True, env=podman_env
        )
        assert stop.returncode == 0, stop.stderr
        assert in_flight.result().conversation_sid.startswith("CH")
    channel.close()
    exit_code = subprocess.run(
        ["podman", "inspect", "--format", "{{.State.ExitCode}}", name],
        capture_output=True,
        text=True,
        env=podman_env,
    ).stdout.strip()
    assert exit_code == "0"
    assert proc.wait(10) == 0
    log = [
        json.loads(x)
        for x in (secrets.parent / "container.log").read_text().splitlines()
        if x.startswith("{")
    ]
    assert [x["msg"] for x in log if x["msg"] in ("serving", "draining", "stopped")] == [
        "serving",
        "draining",
        "stopped",
    ]
