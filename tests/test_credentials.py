"""One holder of the Twilio credentials: identities keyed by the secret, and rotations (current +
previous) that lose no record, pending request or guest session."""

from __future__ import annotations

import hashlib
import hmac
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from conftest import EmulatorProcess, RedisProcess, rich_status

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET, AUTH_TOKEN
from emulator.harness import guest_env

NEW_KEY = "SK" + "1" * 32
NEW_SECRET = "the-rotated-api-secret-0123456789abcdef"
FAST = {"FLEX_ATTEMPT_TIMEOUT_SECONDS": "0.5", "IDEMPOTENCY_LOCK_SECONDS": "1"}


def rotated(upstream: EmulatorProcess, *, old_too: bool = True) -> dict[str, str]:
    """The emulator accepts the new API key (and the old one while ``old_too``); the facade
    overrides that send with the new key."""
    accepted = {ACCOUNT_SID: AUTH_TOKEN, NEW_KEY: NEW_SECRET}
    if old_too:
        accepted[API_KEY] = API_SECRET
    upstream.accept_credentials(accepted)
    return {**guest_env(upstream.url), "TWILIO_API_KEY": NEW_KEY, "TWILIO_API_SECRET": NEW_SECRET}


PREVIOUS = {"TWILIO_PREVIOUS_API_KEY": API_KEY, "TWILIO_PREVIOUS_API_SECRET": API_SECRET}


def test_the_chosen_identity_is_keyed_by_the_secret_never_the_public_account_sid(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    request_id = str(uuid.uuid4())
    old = make_facade(upstream.url, **guest_env(upstream.url))
    first = old.create(request_id=request_id).identity
    old.stop()
    # Anyone can compute an HMAC keyed with the account SID (a token's `sub`) of a request_id.
    public = hmac.new(ACCOUNT_SID.encode(), request_id.encode(), hashlib.sha256).digest()
    assert first != str(uuid.UUID(bytes=public[:16], version=4))

    other_secret = make_facade(upstream.url, **rotated(upstream))
    assert other_secret.create(request_id=request_id).identity != first
    other_secret.stop()
    same_secret = make_facade(upstream.url, **guest_env(upstream.url))
    assert same_secret.create(request_id=request_id).identity == first


def test_a_request_pending_across_a_rotation_finds_its_conversation(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    env = {**guest_env(upstream.url), **FAST, "REDIS_URL": redis_server.url}
    doomed = make_facade(upstream.url, **env)
    upstream.fault(latency=0.3)
    request_id = str(uuid.uuid4())
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(doomed.create, request_id=request_id, timeout=5)
        time.sleep(0.15)  # the create is at Twilio now, under the old secret's identity
        doomed.proc.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError):
            call.result()
    upstream.fault(latency=0.0)
    time.sleep(1.1)  # the dead replica's lock expires
    survivor = make_facade(upstream.url, **{**env, **rotated(upstream), **PREVIOUS})
    reply = survivor.create(request_id=request_id, timeout=5)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}


def test_records_and_guest_sessions_of_the_previous_key_survive_a_restart_rotation(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    env = {**guest_env(upstream.url), "REDIS_URL": redis_server.url}
    old = make_facade(upstream.url, **env)
    request_id = str(uuid.uuid4())
    chat = old.create(request_id=request_id, issue_token=True)
    old.stop()

    new = make_facade(upstream.url, **{**env, **rotated(upstream, old_too=False), **PREVIOUS})
    replay = new.create(request_id=request_id, issue_token=True)
    assert (replay.conversation_sid, replay.identity) == (chat.conversation_sid, chat.identity)
    assert new.refresh(chat.access_token).identity == chat.identity  # signed by the old key
    fresh = new.refresh(replay.access_token)
    assert fresh.identity == chat.identity
    assert len(upstream.conversations()) == 1
    new.stop()

    # Once the operator removes the previous key, its tokens are refused; the new ones are not.
    after = make_facade(upstream.url, **{**env, **rotated(upstream, old_too=False)})
    with pytest.raises(grpc.RpcError) as caught:
        after.refresh(chat.access_token)
    assert rich_status(caught.value)["ErrorInfo"].reason == "TOKEN_INVALID"
    assert after.refresh(fresh.access_token).identity == chat.identity


def start_refusal(upstream: EmulatorProcess, **overrides: str) -> str:
    """Runs the facade against the emulator, expects exit 2; returns its one line."""
    from test_config_and_secrets import refusal

    from emulator.harness import facade_env

    return refusal(facade_env(upstream.url, **overrides))


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"TWILIO_AUTH_TOKEN": "a-garbage-auth-token-7f3a"}, "check TWILIO_AUTH_TOKEN"),
        ({"TWILIO_API_KEY": API_KEY, "TWILIO_API_SECRET": "garbage-7f3a"}, "TWILIO_API_SECRET"),
    ],
)
def test_credentials_twilio_refuses_stop_the_start_naming_the_variable(
    upstream: EmulatorProcess, overrides: dict[str, str], names: str
) -> None:
    line = start_refusal(upstream, **overrides)
    assert "Twilio refused the credentials (HTTP 401" in line and names in line
    assert "7f3a" not in line  # the secret itself never
    assert upstream.requests() == []  # a read only: nothing was created
    assert [c["path"] for c in upstream.checks()] == ["/v1/Configuration"]


def test_an_unknown_conversations_service_stops_the_start_naming_it(
    upstream: EmulatorProcess,
) -> None:
    env = {**guest_env(upstream.url), "TWILIO_CONVERSATIONS_SERVICE_SID": "IS" + "9" * 32}
    line = start_refusal(upstream, **env)
    assert "TWILIO_CONVERSATIONS_SERVICE_SID=IS99" in line and "404" in line


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 500}, {"status": 429}])
def test_twilio_unavailable_at_start_serves_and_checks_again(
    make_facade: Any, upstream: EmulatorProcess, fault: dict[str, Any]
) -> None:
    upstream.fault({**fault, "path": "/v1/Configuration"})
    facade = make_facade(upstream.url)
    assert facade.create().conversation_sid.startswith("CH")
    [warning] = [line for line in facade.log_lines() if line["level"] == "warning"]
    assert warning["msg"].startswith("could not check the Twilio credentials at start")
    deadline = time.monotonic() + 10
    while "Twilio accepted the credentials" not in facade.logs():
        assert time.monotonic() < deadline, facade.logs()
        time.sleep(0.1)
    assert [c["status"] for c in upstream.checks()][-1] == 200
