"""Arbitrary input through the real server: OK, INVALID_ARGUMENT, or PERMISSION_DENIED for an
identity outside the caller's namespace, never anything else; refused input never reaches the
upstream."""

from __future__ import annotations

import json

import grpc
import pytest
from conftest import EmulatorProcess, FacadeProcess
from flexwebchat.v1 import webchat_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PREFIX = "guest-"  # the namespace of the anonymous caller
json_objects = st.dictionaries(
    st.text(max_size=10),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
    max_size=5,
).map(json.dumps)
requests = st.builds(
    webchat_pb2.CreateWebChatRequest,
    address_sid=st.one_of(st.text(), st.from_regex(r"IG[0-9a-fA-F]{32}", fullmatch=True)),
    chat_friendly_name=st.text(),
    customer_friendly_name=st.one_of(st.text(), st.text(min_size=250, max_size=300)),
    pre_engagement_data=st.one_of(st.text(), json_objects),
    ui_version=st.one_of(st.text(), st.from_regex(r"[0-9]\.[0-9]\.[0-9]", fullmatch=True)),
    identity=st.one_of(st.text(), st.text().map(PREFIX.__add__)),
    request_id=st.one_of(st.text(), st.uuids().map(str)),
)


@pytest.fixture(scope="module")
def open_facade(fast_emulator: EmulatorProcess, tmp_path_factory) -> FacadeProcess:
    from conftest import facade_env, start_facade

    env = facade_env(
        fast_emulator.url, FLEX_RATE_LIMIT_RPS="0", CALLER_IDENTITY_PREFIXES=f"anonymous={PREFIX}"
    )
    facade = start_facade(env, tmp_path_factory.mktemp("props") / "facade.log")
    yield facade
    facade.stop()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests)
def test_any_input_is_answered_ok_or_refused(
    open_facade: FacadeProcess,
    fast_emulator: EmulatorProcess,
    request: webchat_pb2.CreateWebChatRequest,
) -> None:
    before = len(fast_emulator.requests())
    try:
        reply = open_facade.stub.CreateWebChat(request, timeout=10)
    except grpc.RpcError as error:
        foreign = bool(request.identity) and not request.identity.startswith(PREFIX)
        expected = (
            grpc.StatusCode.PERMISSION_DENIED if foreign else grpc.StatusCode.INVALID_ARGUMENT
        )
        assert error.code() == expected, error.details()
        assert len(fast_emulator.requests()) == before, "refused input reached Twilio"
        return
    assert not request.identity or request.identity.startswith(PREFIX)
    assert reply.conversation_sid.startswith("CH")
    arrived = fast_emulator.requests()[before:]
    if len(arrived) == 1:
        assert arrived[0]["status"] == 201
        assert arrived[0]["form"]["AddressSid"] == request.address_sid
    else:  # a replayed request_id: answered from the idempotency record
        assert arrived == [] and request.request_id


def test_the_server_survived(open_facade: FacadeProcess) -> None:
    assert open_facade.proc.poll() is None
    assert "unexpected error" not in open_facade.logs()
