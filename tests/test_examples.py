"""The Python, Node.js, Go and Java callers in examples/ against the facade and emulator, as a user
runs them: each from a directory of its own, the whole guest flow (create with request_id, a guest
token and a first message, then RefreshGuestToken) on one channel with the shipped service config.

`make test` builds them first (`make examples`): the Node one with its own package-lock.json, the
Go and Java ones from examples/buf.gen.yaml's output and Debian's packages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import ADDRESS_SID, ROOT, EmulatorProcess, FacadeProcess, needs

from emulator.app import API_SECRET
from emulator.harness import guest_env

BUILD = ROOT / ".build"
CALLERS = {
    "python": [sys.executable, str(ROOT / "examples/python/create_webchat.py")],
    "node": ["node", str(ROOT / "examples/node/create-webchat.js")],
    "go": [str(BUILD / "go/create-webchat")],
    "java": ["java", "-cp", "@classpath", "CreateWebChat"],
}
BUILT_WITH = {"go": "go", "java": "javac"}  # `make examples` builds these from Debian's packages


def run_caller(
    name: str, target: str, address_sid: str, *options: str, cwd: Path
) -> tuple[int, dict[str, Any]]:
    if name in BUILT_WITH:
        needs(BUILT_WITH[name])
    command = CALLERS[name]
    built = BUILD / "java/classpath" if name == "java" else Path(command[-1])
    if not built.exists():
        pytest.fail(f"{built} is missing: `make examples` builds it")
    if name == "java":
        command = [built.read_text().strip() if part == "@classpath" else part for part in command]
    # grpc-go before 1.40 (Debian's is 1.33) retries only with GRPC_GO_RETRY=on; later ones always.
    env = {**os.environ, "GRPC_GO_RETRY": "on"}
    result = subprocess.run(
        [*command, target, address_sid, *options],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stderr == "", result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def guest_facade(make_facade: Any, upstream: EmulatorProcess) -> FacadeProcess:
    """Guest tokens and first messages on; a short attempt timeout, so that a retry after an
    ambiguous failure need not wait long for the earlier attempt to settle."""
    env = guest_env(upstream.url)
    return make_facade(upstream.url, **env, FLEX_ATTEMPT_TIMEOUT_SECONDS="1")  # type: ignore[no-any-return]


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_example_runs_the_guest_flow(
    caller: str, guest_facade: FacadeProcess, upstream: EmulatorProcess, tmp_path: Path
) -> None:
    code, replies = run_caller(caller, guest_facade.target, ADDRESS_SID, cwd=tmp_path)

    assert code == 0, replies
    created, refreshed = replies["created"], replies["refreshed"]
    assert str(created["conversation_sid"]).startswith("CH")
    assert str(created["initial_message_sid"]).startswith("IM")
    assert created["access_token"] and created["access_token_expires_at"]
    assert refreshed["identity"] == created["identity"]
    assert refreshed["access_token"] and refreshed["access_token_expires_at"]
    # Besides these two, the facade may look the guest up (a GET, no form) before creating.
    [create] = [r for r in upstream.requests() if "AddressSid" in r["form"]]
    [message] = [r for r in upstream.requests() if "Body" in r["form"]]
    assert create["form"]["AddressSid"] == ADDRESS_SID
    assert message["form"]["Body"] == "Hello, I need help"
    assert message["form"]["Author"] == created["identity"]
    rpcs = guest_facade.rpc_lines(count=2)
    assert [r["method"] for r in rpcs] == ["CreateWebChat", "RefreshGuestToken"]
    assert rpcs[0]["request_id"], "the example sends a fresh request_id"


def expired(token: str) -> str:
    """``token`` as the facade issued it one lifetime and a second ago (its session moved back
    too), re-signed with the emulator's API secret, which is the facade's signing key."""
    claims = jwt.decode(token, API_SECRET, algorithms=["HS256"])
    ago = claims["exp"] - claims["nbf"] + 1
    claims["nbf"] -= ago
    claims["exp"] -= ago
    claims["fwc_session"]["start"] -= ago
    return jwt.encode(
        claims, API_SECRET, algorithm="HS256", headers=jwt.get_unverified_header(token)
    )


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_example_resumes_an_expired_token_until_the_agent_ends_the_chat(
    caller: str, make_facade: Any, upstream: EmulatorProcess, tmp_path: Path
) -> None:
    facade: FacadeProcess = make_facade(upstream.url, **guest_env(upstream.url))
    created = facade.create(issue_token=True, request_id=str(uuid.uuid4()))
    old_token = expired(created.access_token)

    code, back = run_caller(caller, facade.target, "--resume", old_token, cwd=tmp_path)

    assert code == 0, back
    assert back["resumed"]["identity"] == created.identity
    fresh = jwt.decode(back["resumed"]["access_token"], API_SECRET, algorithms=["HS256"])
    assert fresh["exp"] > time.time()

    upstream.set_state(created.conversation_sid, "closed")  # the agent ends the chat
    code, ended = run_caller(caller, facade.target, "--resume", old_token, cwd=tmp_path)

    assert (code, ended) == (0, {"chat_ended": True})


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_example_shows_the_address_sid_violation(
    caller: str, guest_facade: FacadeProcess, upstream: EmulatorProcess, tmp_path: Path
) -> None:
    bad_sid = "IS" + "0123456789abcdef" * 2
    code, error = run_caller(caller, guest_facade.target, bad_sid, cwd=tmp_path)

    assert code == 1
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["retryable"] is False
    violations = error["BadRequest"]["fieldViolations"]
    assert [v["field"] for v in violations] == ["address_sid"]
    assert "Conversations service (IS" in violations[0]["description"]
    assert upstream.requests() == []


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_example_decodes_error_info_and_retry_info(
    caller: str, make_facade: Any, upstream: EmulatorProcess, tmp_path: Path
) -> None:
    env = guest_env(upstream.url)
    facade: FacadeProcess = make_facade(upstream.url, **env, FLEX_MAX_ATTEMPTS="1")
    # The caller retries UNAVAILABLE through the service config (3 attempts): fail every request.
    upstream.fault(*[{"status": 503, "retry_after": "1"}] * 20)

    code, error = run_caller(caller, facade.target, ADDRESS_SID, cwd=tmp_path)

    assert code == 1
    assert error["code"] == "UNAVAILABLE"
    assert error["retryable"] is True
    assert error["ErrorInfo"]["domain"] == "flex-api.twilio.com"
    # protojson (Go, Java) writes a Duration as "1s"; protobufjs (Node) as its fields.
    assert error["RetryInfo"]["retryDelay"] in ("1s", {"seconds": "1"})
    assert len(facade.rpc_lines(count=3)) == 3, "three attempts, as the service config says"


@pytest.mark.needs("javac")
def test_the_java_example_still_retries_an_unavailable_after_many_bad_requests(
    make_facade: Any, upstream: EmulatorProcess, tmp_path: Path
) -> None:
    env = {**guest_env(upstream.url), "FLEX_ATTEMPT_TIMEOUT_SECONDS": "1"}
    facade: FacadeProcess = make_facade(upstream.url, **env, FLEX_MAX_ATTEMPTS="1")
    # grpc-java counts a failure against retryThrottling when its code is retryable or its
    # pushback is negative (gRPC's A6): bad requests must carry none to leave retries on.
    upstream.fault({"status": 503, "retry_after": "0", "path": "/v2/WebChats"})

    options = ("--bad-requests", "25")
    code, report = run_caller("java", facade.target, ADDRESS_SID, *options, cwd=tmp_path)

    assert code == 0, report
    assert report["bad_requests"] == {"INVALID_ARGUMENT": 25}
    assert str(report["created"]["conversation_sid"]).startswith("CH")
    creates = [r for r in upstream.requests() if r["path"] == "/v2/WebChats"]
    assert [r["status"] for r in creates] == [503, 201]
    rpcs = facade.rpc_lines(count=28)
    calls = [r for r in rpcs if r["method"] == "CreateWebChat" and r.get("request_id")]
    assert [r["code"] for r in calls] == ["UNAVAILABLE", "OK"], "retried by the channel"
    assert calls[0]["request_id"] == calls[1]["request_id"]


@pytest.mark.needs("javac")
def test_the_java_example_bursts_300_calls_on_one_channel_without_a_refused_stream(
    guest_facade: FacadeProcess, tmp_path: Path
) -> None:
    # grpc-java keeps to SETTINGS_MAX_CONCURRENT_STREAMS and queues the rest on the channel; a
    # stream refused even so (RST_STREAM REFUSED_STREAM) it retries once, transparently, and the
    # example counts those too. Refusals depend on timing: before the server counted a stream
    # only while open, about one run in three saw some.
    code, report = run_caller(
        "java", guest_facade.target, ADDRESS_SID, "--burst", "300", cwd=tmp_path
    )

    assert code == 0, report
    assert report["burst"] == {"OK": 300, "refused_streams": 0}


def test_the_go_example_is_a_module_whose_binary_runs_anywhere() -> None:
    go_mod = (ROOT / "examples/go/go.mod").read_text()
    main = (ROOT / "examples/go/main.go").read_text()

    assert go_mod.startswith("module example.com/flexwebchat/examples/go\n")
    assert "//go:embed service_config.json" in main
    assert "ReadFile" not in main, "no service config read from a path at run time"


@pytest.mark.needs("go")
def test_buf_gen_template_sets_go_and_java_packages_outside_the_proto() -> None:
    gen = BUILD / "gen/gen"
    go_stub = (gen / "go/flexwebchat/v1/webchat_grpc.pb.go").read_text()
    java_stub = (gen / "java/com/example/flexwebchat/v1/WebChatServiceGrpc.java").read_text()

    assert "package flexwebchatv1" in go_stub
    assert "package com.example.flexwebchat.v1;" in java_stub
    proto = (ROOT / "proto/flexwebchat/v1/webchat.proto").read_text()
    assert "go_package" not in proto and "java_package" not in proto


TESTED_SNIPPET = re.compile(r"<!-- tested: (\S+) -->\n```\w+\n(.*?)```", re.DOTALL)


def test_docs_snippets_are_the_code_these_tests_run() -> None:
    snippets = TESTED_SNIPPET.findall((ROOT / "docs/clients.md").read_text())

    assert {path for path, _ in snippets} == {
        "examples/python/create_webchat.py",
        "examples/node/create-webchat.js",
        "examples/go/main.go",
        "examples/java/CreateWebChat.java",
    }
    for path, code in snippets:
        assert code in (ROOT / path).read_text(), f"docs/clients.md: a snippet is not in {path}"
