"""flexwebchat-client (generated/) installs alone, on protobuf 6 or 7, and serves a caller.

Each case builds a fresh venv from a copy of generated/ (nothing from the checkout on the path),
installs the package with one protobuf release, and runs examples/python/create_webchat.py, the
Python caller of docs/clients.md, against the facade.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ADDRESS_SID, ROOT, EmulatorProcess, FacadeProcess

from emulator.harness import guest_env

# The client's dependencies (typing-extensions is grpcio's), nothing of the server's (httpx, redis,
# tenacity, ...).
EXPECTED = {
    "flexwebchat-client",
    "grpcio",
    "grpcio-status",
    "protobuf",
    "googleapis-common-protos",
    "typing-extensions",
}
TOOLING = {"pip", "setuptools", "wheel"}


@pytest.fixture(scope="module", params=["6.33.5", "7.36.2"], ids=["protobuf6", "protobuf7"])
def client_venv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp(f"client-{request.param}")
    source = base / "src"
    shutil.copytree(ROOT / "generated", source, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", base / "venv"], check=True)
    python = base / "venv/bin/python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", str(source), f"protobuf=={request.param}"],
        check=True,
        cwd=base,
    )
    return python


def installed(python: Path) -> dict[str, str]:
    listing = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True
    )
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listing.stdout)}


def test_installs_only_the_client_and_what_it_needs(
    client_venv: Path, request: pytest.FixtureRequest
) -> None:
    packages = installed(client_venv)
    assert set(packages) - TOOLING == EXPECTED
    assert packages["protobuf"] == request.node.callspec.params["client_venv"]
    probe = (
        "import importlib.util as u, pathlib, flexwebchat.v1 as v1;"
        "d = pathlib.Path(v1.__file__).parent;"
        "print(u.find_spec('service'), u.find_spec('emulator'),"
        " sorted(p.name for p in d.iterdir() if p.suffix in ('.pyi', '.typed', '.json')))"
    )
    out = subprocess.run(
        [client_venv, "-c", probe], check=True, capture_output=True, text=True, cwd="/"
    ).stdout.split(" ", 2)
    assert out[:2] == ["None", "None"], "no generic top-level packages"
    assert json.loads(out[2].replace("'", '"')) == [
        "py.typed",
        "service_config.json",
        "webchat_pb2.pyi",
        "webchat_pb2_grpc.pyi",
    ]


def test_the_python_example_calls_the_facade_with_it(
    client_venv: Path, make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade: FacadeProcess = make_facade(upstream.url, **guest_env(upstream.url))
    example = ROOT / "examples/python/create_webchat.py"

    ok = subprocess.run(
        [client_venv, example, facade.target, ADDRESS_SID], capture_output=True, text=True, cwd="/"
    )
    assert ok.returncode == 0, ok.stderr
    replies = json.loads(ok.stdout)
    assert replies["created"]["conversation_sid"].startswith("CH")
    assert replies["refreshed"]["identity"] == replies["created"]["identity"]
    sent = len(upstream.requests())

    bad = subprocess.run(
        [client_venv, example, facade.target, "AD" + "0" * 32],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert bad.returncode == 1, bad.stderr
    error = json.loads(bad.stdout)
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["retryable"] is False
    assert [v["field"] for v in error["BadRequest"]["fieldViolations"]] == ["address_sid"]
    assert len(upstream.requests()) == sent, "the bad call never reaches Twilio"
