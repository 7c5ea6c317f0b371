"""CALLER_IDENTITY_PREFIXES through the real server: two authenticated callers, each choosing
guest identities only in its own namespace, never in another's, an agent's or the facade's."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import EmulatorProcess, RedisProcess, rich_status
from flexwebchat.v1 import webchat_pb2
from test_config_and_secrets import refusal

from emulator.harness import ADDRESS_SID, facade_env, guest_env
from service.config import ConfigError, Settings
from service.identities import FACADE_IDENTITY_PREFIX

TOKENS = {"billing": "tok-billing-0123456789abcdef", "support": "tok-support-0123456789abcdef"}
PREFIXES = "billing=billing-,support=support-"


def start(make_facade: Any, tmp_path: Path, url: str, **env: str) -> Any:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "".join(f"{name}:{token}\n" for name, token in TOKENS.items())
        + "ops:tok-ops-0123456789abcdef\n"  # a caller without a namespace
    )
    return make_facade(url, AUTH_TOKENS_FILE=str(tokens), **guest_env(url), **env)


def create(facade: Any, caller: str, **fields: Any) -> webchat_pb2.CreateWebChatResponse:
    token = TOKENS.get(caller, f"tok-{caller}-0123456789abcdef")
    fields.setdefault("address_sid", ADDRESS_SID)
    request = webchat_pb2.CreateWebChatRequest(**fields)
    metadata = [("authorization", f"Bearer {token}")]
    return facade.stub.CreateWebChat(request, metadata=metadata, timeout=10)  # type: ignore[no-any-return]


def refused(facade: Any, caller: str, **fields: Any) -> dict[str, Any]:
    with pytest.raises(grpc.RpcError) as caught:
        create(facade, caller, **fields)
    return rich_status(caught.value)


def assert_not_allowed(details: dict[str, Any]) -> None:
    assert details["code"] == grpc.StatusCode.PERMISSION_DENIED, details["message"]
    assert details["ErrorInfo"].reason == "IDENTITY_NOT_ALLOWED"


@pytest.fixture
def namespaced(make_facade, tmp_path: Path, upstream: EmulatorProcess) -> Any:
    return start(make_facade, tmp_path, upstream.url, CALLER_IDENTITY_PREFIXES=PREFIXES)


def test_a_caller_chooses_identities_only_in_its_own_namespace(namespaced, upstream) -> None:
    billing = create(namespaced, "billing", identity="billing-ada", issue_token=True)
    support = create(namespaced, "support", identity="support-bob", issue_token=True)
    assert (billing.identity, support.identity) == ("billing-ada", "support-bob")
    assert billing.access_token and support.access_token

    for caller, identity in [
        ("billing", "support-bob"),  # another caller's guest
        ("support", "billing-ada"),
        ("billing", "agent.alice@example.com"),  # a Flex agent
        ("billing", "Billing-ada"),  # prefixes are case-sensitive
        ("billing", FACADE_IDENTITY_PREFIX + str(uuid.uuid4())),  # the facade's own
    ]:
        for issue_token in (True, False):
            details = refused(namespaced, caller, identity=identity, issue_token=issue_token)
            assert_not_allowed(details)
            assert identity not in details["message"]  # an agent's identity stays out of errors
    assert [r["form"]["Identity"] for r in upstream.requests()] == ["billing-ada", "support-bob"]


def test_a_caller_without_a_namespace_may_not_choose_at_all(namespaced, upstream) -> None:
    assert_not_allowed(refused(namespaced, "ops", identity="ops-guest", issue_token=True))
    assert upstream.requests() == []
    chosen = create(namespaced, "ops", request_id=str(uuid.uuid4()), issue_token=True)
    assert chosen.identity.startswith(FACADE_IDENTITY_PREFIX)
    assert chosen.access_token


def test_the_namespace_is_checked_before_the_other_fields(namespaced, upstream) -> None:
    details = refused(
        namespaced, "billing", identity="support-bob", address_sid="nope", request_id="x"
    )
    assert_not_allowed(details)
    assert "BadRequest" not in details
    assert upstream.requests() == []


def test_a_stored_request_id_is_not_replayed_outside_the_namespace(
    make_facade, tmp_path: Path, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    """A record outlives a change of the caller's namespace (in Redis, across a restart): a replay
    with issue_token would otherwise mint a token for the stored identity."""
    request_id = str(uuid.uuid4())
    fields = {"identity": "billing-ada", "request_id": request_id, "issue_token": True}
    before = start(
        make_facade,
        tmp_path,
        upstream.url,
        REDIS_URL=redis_server.url,
        CALLER_IDENTITY_PREFIXES=PREFIXES,
    )
    first = create(before, "billing", **fields)
    assert create(before, "billing", **fields).conversation_sid == first.conversation_sid
    before.stop()

    after = start(
        make_facade,
        tmp_path,
        upstream.url,
        REDIS_URL=redis_server.url,
        CALLER_IDENTITY_PREFIXES="billing=team-billing-,support=support-",
    )
    assert_not_allowed(refused(after, "billing", **fields))
    assert len(upstream.requests()) == 1


def test_with_caller_auth_off_the_caller_is_anonymous(make_facade, upstream) -> None:
    facade = make_facade(upstream.url, CALLER_IDENTITY_PREFIXES="anonymous=guest-")
    assert facade.create(identity="guest-42").identity == "guest-42"
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(identity="agent-7")
    assert_not_allowed(rich_status(caught.value))
    default = make_facade(upstream.url)  # no entry: no caller may choose
    with pytest.raises(grpc.RpcError) as caught:
        default.create(identity="guest-42")
    assert_not_allowed(rich_status(caught.value))
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            "billing=bill,support=billing-",
            "'bill' (caller 'billing') and 'billing-' (caller 'support')",
        ),
        ("billing=a,support=a", "overlap"),
        ("billing=flexwebchat-", "the facade's own identities"),
        (f"billing={FACADE_IDENTITY_PREFIX}billing-", "the facade's own identities"),
        ("billing=x,billing=y", "lists the caller 'billing' twice"),
        ("billing", "caller=prefix pairs"),
        ("billing=", "caller=prefix pairs"),
        ("=x", "caller=prefix pairs"),
    ],
)
def test_malformed_or_overlapping_prefixes_are_refused(raw: str, reason: str) -> None:
    env = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t"}
    with pytest.raises(ConfigError, match="CALLER_IDENTITY_PREFIXES") as caught:
        Settings.from_env({**env, "CALLER_IDENTITY_PREFIXES": raw})
    assert reason in str(caught.value)


def test_overlapping_prefixes_refuse_to_start() -> None:
    env = facade_env("http://127.0.0.1:1", CALLER_IDENTITY_PREFIXES="billing=g,support=guest")
    line = refusal(env)
    assert "CALLER_IDENTITY_PREFIXES" in line and "overlap" in line


def test_prefixes_are_parsed() -> None:
    env = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t"}
    settings = Settings.from_env({**env, "CALLER_IDENTITY_PREFIXES": " billing = b- , support=s:,"})
    assert settings.caller_identity_prefixes == {"billing": "b-", "support": "s:"}
    assert Settings.from_env(env).caller_identity_prefixes == {}
