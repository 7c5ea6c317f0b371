"""Guest sessions end to end: the real server, the emulator over HTTP, and grpcurl."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import jwt
import pytest
from conftest import ADDRESS_SID, EmulatorProcess, FacadeProcess, rich_status
from flexwebchat.v1 import webchat_pb2
from test_grpcurl import grpcurl

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET, SERVICE_SID
from emulator.harness import guest_env

MESSAGE = "Hello,\n\tI was charged twice for my order"


@pytest.fixture
def guest_facade(make_facade: Any, upstream: EmulatorProcess) -> FacadeProcess:
    return make_facade(upstream.url, **guest_env(upstream.url))  # type: ignore[no-any-return]


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, API_SECRET, algorithms=["HS256"], issuer=API_KEY))


def messages(upstream: EmulatorProcess) -> list[dict[str, Any]]:
    return [r for r in upstream.requests() if r["path"].endswith("/Messages")]


def creates(upstream: EmulatorProcess) -> list[dict[str, Any]]:
    return [r for r in upstream.requests() if r["path"] == "/v2/WebChats"]


def test_create_issues_a_token_and_posts_the_first_message_as_the_guest(
    guest_facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    reply = guest_facade.create(issue_token=True, initial_message=MESSAGE)

    token = claims(reply.access_token)
    assert token["sub"] == ACCOUNT_SID
    assert token["grants"] == {"identity": reply.identity, "chat": {"service_sid": SERVICE_SID}}
    assert reply.access_token_expires_at.seconds == token["exp"]
    assert 3590 <= token["exp"] - time.time() <= 3600  # GUEST_TOKEN_TTL_SECONDS default
    assert re.fullmatch(r"IM[0-9a-f]{32}", reply.initial_message_sid)

    (posted,) = messages(upstream)
    assert posted["path"] == f"/v1/Conversations/{reply.conversation_sid}/Messages"
    assert posted["form"] == {"Author": reply.identity, "Body": MESSAGE}
    assert posted["headers"]["X-Twilio-Webhook-Enabled"] == "true"
    assert posted["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert posted["status"] == 201
    assert guest_facade.metric('flexwebchat_guest_tokens_issued_total{via="create"}') == 1
    assert guest_facade.metric('flexwebchat_initial_messages_total{outcome="posted"}') == 1


def test_without_issue_token_or_message_nothing_extra_happens(
    guest_facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    reply = guest_facade.create()
    assert reply.access_token == "" and not reply.HasField("access_token_expires_at")
    assert reply.initial_message_sid == ""
    assert messages(upstream) == []


def test_refresh_answers_a_new_token_for_the_same_guest(guest_facade: FacadeProcess) -> None:
    first = guest_facade.create(issue_token=True)
    refreshed = guest_facade.refresh(first.access_token)
    assert refreshed.identity == first.identity
    assert claims(refreshed.access_token)["grants"]["identity"] == first.identity
    assert refreshed.access_token_expires_at.seconds >= first.access_token_expires_at.seconds
    # The refreshed token refreshes in turn.
    assert guest_facade.refresh(refreshed.access_token).identity == first.identity
    assert guest_facade.metric('flexwebchat_guest_tokens_issued_total{via="refresh"}') == 2


def forged(secret: str = API_SECRET, **claims: Any) -> str:
    base = {
        "jti": f"{API_KEY}-1",
        "iss": API_KEY,
        "sub": ACCOUNT_SID,
        "exp": int(time.time()) + 600,
        "grants": {"identity": "guest", "chat": {"service_sid": SERVICE_SID}},
    }
    return jwt.encode(base | claims, secret, algorithm="HS256")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        # Made when the test runs: a token made at collection could expire before its turn.
        (lambda: forged(secret="an-attackers-guess-of-the-secret-0123"), "TOKEN_INVALID"),
        (lambda: forged(sub="AC" + "9" * 32), "TOKEN_INVALID"),
        (lambda: forged(exp=int(time.time()) - 1), "TOKEN_EXPIRED"),
        (lambda: "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "TOKEN_INVALID"),
        (lambda: "x" * 9000, "TOKEN_INVALID"),
        (lambda: "tökén.with.accents", "TOKEN_INVALID"),
    ],
)
def test_refresh_refuses_forged_foreign_and_expired_tokens(
    guest_facade: FacadeProcess, token: Callable[[], str], reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        guest_facade.refresh(token())
    status = rich_status(refused.value)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in status["BadRequest"].field_violations] == ["access_token"]
    assert status["ErrorInfo"].reason == reason
    assert guest_facade.metric(f'flexwebchat_token_refresh_refused_total{{reason="{reason}"}}') == 1


def test_refresh_of_an_empty_token_is_a_field_violation(guest_facade: FacadeProcess) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        guest_facade.refresh("")
    status = rich_status(refused.value)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT
    assert status["BadRequest"].field_violations[0].field == "access_token"


def test_tokens_without_settings_are_failed_precondition_before_anything_is_created(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        facade.create(issue_token=True, initial_message=MESSAGE)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "TWILIO_CONVERSATIONS_SERVICE_SID" in refused.value.details()
    assert "TWILIO_API_KEY" in refused.value.details()  # the facade runs on an auth token here
    assert upstream.requests() == []
    with pytest.raises(grpc.RpcError) as refused:
        facade.refresh(forged())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Without issue_token, CreateWebChat works as before (and still posts the message).
    assert facade.create().conversation_sid.startswith("CH")


@pytest.mark.parametrize(
    ("faults", "sent", "posted"),
    [
        ([{"status": 503}], 2, True),  # refused unprocessed: retried
        ([{"status": 429, "retry_after": "0"}], 2, True),
        ([{"status": 500}], 1, False),  # may have been processed: a duplicate would reach the agent
        ([{"drop": True}], 1, False),
        ([{"status": 404, "code": 20404}], 1, False),
    ],
)
def test_first_message_retries_only_what_twilio_never_processed(
    guest_facade: FacadeProcess,
    upstream: EmulatorProcess,
    faults: list[dict[str, Any]],
    sent: int,
    posted: bool,
) -> None:
    upstream.fault(*({**fault, "path": "/v1/Conversations/"} for fault in faults))
    reply = guest_facade.create(initial_message=MESSAGE, request_id=str(uuid.uuid4()))
    assert len(messages(upstream)) == sent
    assert bool(reply.initial_message_sid) == posted
    assert reply.conversation_sid  # the chat reaches its caller whatever happened to the message
    if not posted:
        warning = [line for line in guest_facade.log_lines() if "first message" in line["msg"]]
        assert warning and warning[0]["level"] == "warning"
        assert guest_facade.metric('flexwebchat_initial_messages_total{outcome="failed"}') == 1


def test_first_message_to_an_unknown_conversation_is_404_from_the_emulator(
    upstream: EmulatorProcess,
) -> None:
    answer = upstream.control.post(
        f"/v1/Conversations/CH{'0' * 32}/Messages",
        data={"Author": "x", "Body": "hi"},
        auth=(API_KEY, API_SECRET),
    )
    assert answer.status_code == 404 and answer.json()["code"] == 20404


def test_first_message_does_not_draw_on_the_webchats_rate_budget(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url, **guest_env(upstream.url))
    for _ in range(3):
        assert facade.create(initial_message=MESSAGE).initial_message_sid
    assert len(messages(upstream)) == 3
    # One limiter admission per create; none for the messages.
    assert facade.metric("flexwebchat_rate_limit_wait_seconds_count") == 3


def test_a_replay_mints_a_fresh_token_and_repeats_no_twilio_call(
    guest_facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    request_id = str(uuid.uuid4())
    first = guest_facade.create(request_id=request_id, initial_message=MESSAGE)
    assert first.access_token == ""  # not asked for
    # Asking for a token on the retry is fine: issue_token is not part of the fingerprint.
    replay = guest_facade.create(request_id=request_id, initial_message=MESSAGE, issue_token=True)
    assert (replay.conversation_sid, replay.identity) == (first.conversation_sid, first.identity)
    assert replay.initial_message_sid == first.initial_message_sid
    assert claims(replay.access_token)["grants"]["identity"] == first.identity
    assert len(creates(upstream)) == 1 and len(messages(upstream)) == 1

    with pytest.raises(grpc.RpcError) as conflict:
        guest_facade.create(request_id=request_id, initial_message="another question")
    assert conflict.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_status(conflict.value)["BadRequest"].field_violations[0].field == "request_id"


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ("x" * 32769, "at most 32768 bytes"),
        ("é" * 16385, "at most 32768 bytes"),
        ("hi\x00there", "control characters"),
        ("\x1b[31mred", "control characters"),
        (" \n\t ", "only whitespace"),
    ],
)
def test_bad_first_messages_never_leave(
    guest_facade: FacadeProcess, upstream: EmulatorProcess, message: str, problem: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        guest_facade.create(initial_message=message, issue_token=True)
    violation = rich_status(refused.value)["BadRequest"].field_violations[0]
    assert violation.field == "initial_message" and problem in violation.description
    assert upstream.requests() == []


def test_guest_flow_with_grpcurl(guest_facade: FacadeProcess) -> None:
    body = json.dumps({"address_sid": ADDRESS_SID, "issue_token": True, "initial_message": MESSAGE})
    created = grpcurl(
        "-d", body, guest_facade.target, "flexwebchat.v1.WebChatService/CreateWebChat"
    )
    assert created.returncode == 0, created.stderr
    chat = json.loads(created.stdout)
    assert chat["initial_message_sid"].startswith("IM")
    assert chat["access_token_expires_at"].endswith("Z")  # RFC 3339 in grpcurl's JSON
    refreshed = grpcurl(
        "-d",
        json.dumps({"access_token": chat["access_token"]}),
        guest_facade.target,
        "flexwebchat.v1.WebChatService/RefreshGuestToken",
    )
    assert refreshed.returncode == 0, refreshed.stderr
    assert json.loads(refreshed.stdout)["identity"] == chat["identity"]
    refused = grpcurl(
        "-d",
        json.dumps({"access_token": forged(exp=1)}),
        guest_facade.target,
        "flexwebchat.v1.WebChatService/RefreshGuestToken",
    )
    assert refused.returncode != 0
    assert "InvalidArgument" in refused.stderr and "TOKEN_EXPIRED" in refused.stderr


def test_tokens_and_the_api_secret_never_appear_in_logs_metrics_or_errors(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url, **guest_env(upstream.url), LOG_LEVEL="DEBUG")
    request_id = str(uuid.uuid4())
    said: list[str] = []
    first = facade.create(request_id=request_id, issue_token=True, initial_message=MESSAGE)
    replay = facade.create(request_id=request_id, issue_token=True, initial_message=MESSAGE)
    refreshed = facade.refresh(first.access_token)
    for token in (forged(exp=1), first.access_token[:-4] + "AAAA"):
        with pytest.raises(grpc.RpcError) as refused:
            facade.refresh(token)
        said.append(str(refused.value.details()) + str(refused.value.trailing_metadata()))
    facade.rpc_lines(5)
    everything = facade.logs() + facade.metrics() + "".join(said)
    for secret in (API_SECRET, first.access_token, replay.access_token, refreshed.access_token):
        assert secret not in everything
    # Nor any piece of a token: its signature alone would do.
    for token in (first.access_token, refreshed.access_token):
        assert token.rsplit(".", 1)[-1] not in everything
    assert MESSAGE not in everything  # the guest's words are personal data


def test_refresh_requires_caller_authentication_when_it_is_on(
    make_facade: Any, upstream: EmulatorProcess, tmp_path: Any
) -> None:
    tokens_file = tmp_path / "callers"
    tokens_file.write_text("web-frontend:a-long-enough-caller-token\n")
    facade = make_facade(upstream.url, **guest_env(upstream.url), AUTH_TOKENS_FILE=str(tokens_file))
    with pytest.raises(grpc.RpcError) as refused:
        facade.refresh(forged())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    metadata = (("authorization", "Bearer a-long-enough-caller-token"),)
    request = webchat_pb2.RefreshGuestTokenRequest(access_token=forged())
    reply = facade.stub.RefreshGuestToken(request, metadata=metadata, timeout=10)
    assert reply.identity == "guest"
