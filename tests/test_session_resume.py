"""Guest sessions end to end: a token belongs to the caller that created its session, no token
outlives the session, and a guest coming back with an expired token resumes its chat unless the
agent has closed it. The real server, the emulator over HTTP, two authenticated callers.

An expired token is made without waiting: the facade's own token, its whole timeline (nbf, exp
and the session's start) moved back in time and re-signed with the emulator's API secret, which
is the facade's signing key: the token the facade issued that long ago."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from conftest import EmulatorProcess, FacadeProcess, rich_status
from flexwebchat.v1 import webchat_pb2
from redis import Redis

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET
from emulator.harness import guest_env

FRONTEND = [("authorization", "Bearer frontend-caller-token-0123456789")]
BILLING = [("authorization", "Bearer billing-caller-token-0123456789")]
TTL = 180  # Twilio's minimum token lifetime


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    path = tmp_path / "callers"
    path.write_text(
        "web-frontend:frontend-caller-token-0123456789\nbilling:billing-caller-token-0123456789\n"
    )
    return path


def start(make_facade: Any, upstream: EmulatorProcess, callers: Path | None, **env: str) -> Any:
    auth = {"AUTH_TOKENS_FILE": str(callers)} if callers else {}
    settings = {**guest_env(upstream.url), "GUEST_TOKEN_TTL_SECONDS": str(TTL), **auth, **env}
    return make_facade(upstream.url, **settings)


def create(facade: FacadeProcess, caller: Any = None, **fields: Any) -> Any:
    request = webchat_pb2.CreateWebChatRequest(
        address_sid="IG" + "0" * 32, issue_token=True, **fields
    )
    return facade.stub.CreateWebChat(request, metadata=caller, timeout=10)


def refresh(facade: FacadeProcess, token: str, caller: Any = None) -> Any:
    request = webchat_pb2.RefreshGuestTokenRequest(access_token=token)
    return facade.stub.RefreshGuestToken(request, metadata=caller, timeout=10)


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, API_SECRET, algorithms=["HS256"], issuer=API_KEY, leeway=10**9))


def issued_ago(token: str, seconds: int) -> str:
    """``token`` as the facade would have issued it ``seconds`` earlier (session and all)."""
    moved = claims(token)
    moved["nbf"] -= seconds
    moved["exp"] -= seconds
    moved["fwc_session"]["start"] -= seconds
    header = jwt.get_unverified_header(token)
    return jwt.encode(moved, API_SECRET, algorithm="HS256", headers=header)


def expired(token: str) -> str:
    """``token`` one second past its expiry: issued TTL + 1 seconds ago."""
    return issued_ago(token, TTL + 1)


def state_reads(upstream: EmulatorProcess) -> list[dict[str, Any]]:
    return [r for r in upstream.requests() if r["path"].endswith("/Conversations")]


def refused(call: Any) -> dict[str, Any]:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return rich_status(failure.value)


def test_the_creator_resumes_an_expired_token_with_the_same_identity_and_session_end(
    make_facade: Any, upstream: EmulatorProcess, callers_file: Path
) -> None:
    facade = start(make_facade, upstream, callers_file)
    chat = create(facade, FRONTEND, request_id=str(uuid.uuid4()))
    assert chat.access_token_expires_at.seconds - time.time() <= TTL
    looked_up = len(state_reads(upstream))  # the create's own lookup of a new request_id
    came_back = expired(chat.access_token)

    resumed = refresh(facade, came_back, FRONTEND)

    assert resumed.identity == chat.identity
    new = claims(resumed.access_token)
    assert new["grants"]["identity"] == chat.identity
    assert new["exp"] == resumed.access_token_expires_at.seconds > time.time()  # works again
    # The session is where it was: same end (the session began TTL + 1 s "earlier").
    assert resumed.session_expires_at.seconds == chat.session_expires_at.seconds - TTL - 1
    assert new["fwc_session"]["conversation_sid"] == chat.conversation_sid
    # The resume read the conversation's state once; the new token refreshes locally.
    assert len(state_reads(upstream)) == looked_up + 1
    again = refresh(facade, resumed.access_token, FRONTEND)
    assert again.session_expires_at == resumed.session_expires_at
    assert len(state_reads(upstream)) == looked_up + 1
    assert facade.metric('flexwebchat_guest_tokens_issued_total{via="resume"}') == 1
    assert facade.metric('flexwebchat_guest_tokens_issued_total{via="refresh"}') == 1


def test_another_caller_can_neither_refresh_nor_resume(
    make_facade: Any, upstream: EmulatorProcess, callers_file: Path
) -> None:
    facade = start(make_facade, upstream, callers_file)
    chat = create(facade, FRONTEND)
    for token in (chat.access_token, expired(chat.access_token)):
        status = refused(lambda token=token: refresh(facade, token, BILLING))
        assert status["code"] == grpc.StatusCode.PERMISSION_DENIED
        assert status["ErrorInfo"].reason == "TOKEN_WRONG_CALLER"
    assert state_reads(upstream) == []  # nothing about the guest was looked up for it
    assert refresh(facade, chat.access_token, FRONTEND).identity == chat.identity
    assert (
        facade.metric('flexwebchat_token_refresh_refused_total{reason="TOKEN_WRONG_CALLER"}') == 2
    )


def test_no_token_outlives_the_session_and_none_is_refreshed_after_it(
    make_facade: Any, upstream: EmulatorProcess, callers_file: Path
) -> None:
    facade = start(make_facade, upstream, callers_file, GUEST_SESSION_MAX_SECONDS="60")
    chat = create(facade, FRONTEND)
    # The session's 60 s bound the 180 s token.
    assert chat.access_token_expires_at == chat.session_expires_at
    assert claims(chat.access_token)["exp"] == chat.session_expires_at.seconds
    assert chat.session_expires_at.seconds - time.time() <= 60
    within = refresh(facade, issued_ago(chat.access_token, 30), FRONTEND)
    assert within.access_token_expires_at.seconds == within.session_expires_at.seconds
    assert within.session_expires_at.seconds == chat.session_expires_at.seconds - 30

    for token in (issued_ago(chat.access_token, 60), issued_ago(chat.access_token, 3600)):
        status = refused(lambda token=token: refresh(facade, token, FRONTEND))
        assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT
        assert status["ErrorInfo"].reason == "TOKEN_EXPIRED"
        assert [v.field for v in status["BadRequest"].field_violations] == ["access_token"]
    assert state_reads(upstream) == []


def test_a_closed_conversation_is_named_and_gets_no_token(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = start(make_facade, upstream, None)  # caller auth off: anyone may resume
    chat = create(facade)
    upstream.set_state(chat.conversation_sid, "inactive")
    assert refresh(facade, expired(chat.access_token)).identity == chat.identity

    upstream.set_state(chat.conversation_sid, "closed")
    status = refused(lambda: refresh(facade, expired(chat.access_token)))
    assert status["code"] == grpc.StatusCode.FAILED_PRECONDITION
    assert status["ErrorInfo"].reason == "CONVERSATION_CLOSED"
    assert "access_token" not in str(status)
    # An unexpired token is refreshed locally, without asking Twilio.
    before = len(state_reads(upstream))
    assert refresh(facade, chat.access_token).identity == chat.identity
    assert len(state_reads(upstream)) == before == 2
    assert (
        facade.metric('flexwebchat_token_refresh_refused_total{reason="CONVERSATION_CLOSED"}') == 1
    )


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 503},
        {"drop": True},
        {"status": 200, "body": "<html>gateway</html>"},
        {"status": 200, "body": '{"conversations": [{"conversation_sid": "x"}]}'},
        {"status": 200, "body": '{"meta": {}}'},
    ],
)
def test_a_failed_or_unusable_state_read_is_unavailable_with_retry_info(
    make_facade: Any, upstream: EmulatorProcess, fault: dict[str, Any]
) -> None:
    facade = start(make_facade, upstream, None, FLEX_MAX_ATTEMPTS="1")
    chat = create(facade)
    # A dropped connection that was reused is re-sent once, on a new one: drop that as well.
    upstream.fault(*[fault] * (2 if fault.get("drop") else 1))
    status = refused(lambda: refresh(facade, expired(chat.access_token)))
    assert status["code"] == grpc.StatusCode.UNAVAILABLE
    assert "RetryInfo" in status
    # The read answers again: the same token resumes.
    assert refresh(facade, expired(chat.access_token)).identity == chat.identity


def test_a_replay_keeps_the_sessions_start(
    make_facade: Any, upstream: EmulatorProcess, callers_file: Path, redis_server: Any
) -> None:
    facade = start(make_facade, upstream, callers_file, REDIS_URL=redis_server.url)
    request_id = str(uuid.uuid4())
    request = webchat_pb2.CreateWebChatRequest(address_sid="IG" + "0" * 32, request_id=request_id)
    first = facade.stub.CreateWebChat(request, metadata=FRONTEND, timeout=10)
    created_by = int(time.time())
    assert not first.HasField("session_expires_at")  # no token asked for, no session told
    time.sleep(1.1)  # so that a session starting at the replay would end later

    replay = create(facade, FRONTEND, request_id=request_id)
    assert replay.conversation_sid == first.conversation_sid
    assert replay.session_expires_at.seconds <= created_by + 86400
    assert claims(replay.access_token)["fwc_session"]["start"] <= created_by
    assert create(facade, FRONTEND, request_id=request_id).session_expires_at == (
        replay.session_expires_at
    )


def test_a_stored_session_start_cannot_be_moved_later_in_redis(
    make_facade: Any, upstream: EmulatorProcess, redis_server: Any
) -> None:
    """Whoever can write to Redis cannot extend a session: the start is signed with the record,
    and a record without one (written by an older replica, or stripped) ends every session."""
    facade = start(make_facade, upstream, None, REDIS_URL=redis_server.url)
    request_id = str(uuid.uuid4())
    create(facade, request_id=request_id)
    redis = Redis(host="127.0.0.1", port=redis_server.port)
    key = f"flexwebchat:{ACCOUNT_SID.lower()}:idempotency:{request_id}"
    stored = json.loads(redis.get(key))

    redis.set(key, json.dumps(stored | {"completed_at": time.time() + 86400}), keepttl=True)
    status = refused(lambda: create(facade, request_id=request_id))
    assert status["code"] == grpc.StatusCode.UNAVAILABLE

    unknown = {k: v for k, v in stored.items() if k not in ("completed_at", "completed_mac")}
    redis.set(key, json.dumps(unknown), keepttl=True)
    status = refused(lambda: create(facade, request_id=request_id))
    assert status["code"] == grpc.StatusCode.FAILED_PRECONDITION
    assert status["ErrorInfo"].reason == "TOKEN_EXPIRED"
    assert len([r for r in upstream.requests() if r["path"] == "/v2/WebChats"]) == 1


def test_a_replay_after_the_record_was_lost_keeps_the_conversations_creation_as_start(
    make_facade: Any, upstream: EmulatorProcess, redis_server: Any
) -> None:
    """Losing the record (Redis flushed) must not restart the session: the replay finds the
    conversation at Twilio, and the session starts at its creation as Twilio reports it."""
    facade = start(make_facade, upstream, None, REDIS_URL=redis_server.url)
    request_id = str(uuid.uuid4())
    request = webchat_pb2.CreateWebChatRequest(address_sid="IG" + "0" * 32, request_id=request_id)
    first = facade.stub.CreateWebChat(request, timeout=10)
    created_by = int(time.time())
    time.sleep(1.1)  # so that a session starting at the replay would end later
    Redis(host="127.0.0.1", port=redis_server.port).flushall()

    replay = create(facade, request_id=request_id)
    assert replay.conversation_sid == first.conversation_sid
    assert claims(replay.access_token)["fwc_session"]["start"] <= created_by
    assert replay.session_expires_at.seconds <= created_by + 86400
