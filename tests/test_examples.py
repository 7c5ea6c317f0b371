"""The Node.js and Go callers in examples/ against the facade and emulator, as a user runs them.

`make test` builds both first (`make examples`): the Node one with its own package-lock.json, the
Go one from examples/buf.gen.yaml's output and Debian's Go packages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ADDRESS_SID, ROOT, EmulatorProcess, FacadeProcess

GO_BUILD = ROOT / ".build/go"
CALLERS = {
    "node": (["node", str(ROOT / "examples/node/create-webchat.js")], ROOT / "examples/node"),
    "go": ([str(GO_BUILD / "create-webchat")], ROOT / "examples/go"),
}


def run_caller(name: str, target: str, address_sid: str) -> tuple[int, dict[str, object]]:
    command, cwd = CALLERS[name]
    if not Path(command[-1]).exists():
        pytest.fail(f"{command[-1]} is missing: `make examples` builds it")
    # grpc-go before 1.40 (Debian's is 1.33) retries only with GRPC_GO_RETRY=on; later ones always.
    env = {**os.environ, "GRPC_GO_RETRY": "on"}
    result = subprocess.run(
        [*command, target, address_sid],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stderr == "", result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_example_creates_a_chat_with_a_request_id(
    caller: str, facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    code, reply = run_caller(caller, facade.target, ADDRESS_SID)

    assert code == 0
    assert str(reply["conversation_sid"]).startswith("CH")
    assert reply["identity"]
    [seen] = upstream.requests()
    assert seen["form"] == {"AddressSid": ADDRESS_SID}
    [rpc] = facade.rpc_lines()
    assert rpc["request_id"], "the example sends a fresh request_id"


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_example_shows_the_address_sid_violation(
    caller: str, facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    code, error = run_caller(caller, facade.target, "IS" + "0123456789abcdef" * 2)

    assert code == 1
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["retryable"] is False
    violations = error["BadRequest"]["fieldViolations"]  # type: ignore[index]
    assert [v["field"] for v in violations] == ["address_sid"]
    assert "Conversations service (IS" in violations[0]["description"]
    assert upstream.requests() == []


def test_example_decodes_error_info_and_retry_info(make_facade, upstream: EmulatorProcess) -> None:
    facade: FacadeProcess = make_facade(upstream.url, FLEX_MAX_ATTEMPTS="1")
    # Each caller retries UNAVAILABLE through the service config (3 attempts): fail them all.
    upstream.fault(*[{"status": 503, "retry_after": "1"}] * 6)
    for caller in sorted(CALLERS):
        code, error = run_caller(caller, facade.target, ADDRESS_SID)
        assert code == 1, caller
        assert error["code"] == "UNAVAILABLE", caller
        assert error["retryable"] is True, caller
        assert error["ErrorInfo"]["domain"] == "flex-api.twilio.com", caller  # type: ignore[index]
        # protojson (Go) writes a Duration as "1s"; protobufjs (Node) as its fields.
        delay = error["RetryInfo"]["retryDelay"]  # type: ignore[index]
        assert delay in ("1s", {"seconds": "1"}), caller
    assert [r["status"] for r in upstream.requests()] == [503] * 6


def test_buf_gen_template_sets_go_and_java_packages_outside_the_proto() -> None:
    gen = GO_BUILD / "src/example.com/flexwebchat/examples/go/gen"
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
    }
    for path, code in snippets:
        assert code in (ROOT / path).read_text(), f"docs/clients.md: a snippet is not in {path}"
