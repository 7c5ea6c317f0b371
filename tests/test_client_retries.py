"""gRPC's own retries with the shipped service config: safe because the request_id is the same.

The channel is the one examples/python/create_webchat.py (docs/clients.md) builds.
"""

from __future__ import annotations

import sys
import uuid

import grpc
import pytest
from conftest import ADDRESS_SID, ROOT, EmulatorProcess, FacadeProcess, rich_status
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc

sys.path.insert(0, str(ROOT / "examples/python"))
import create_webchat as example


def test_client_retries_past_the_facades_own_attempts_create_one_conversation(
    make_facade, upstream: EmulatorProcess
) -> None:
    facade: FacadeProcess = make_facade(upstream.url, FLEX_MAX_ATTEMPTS="2")
    # Three 503s: the facade's two attempts fail (UNAVAILABLE + RetryInfo), then gRPC itself
    # re-sends the call, whose second attempt upstream succeeds.
    upstream.fault(*[{"status": 503}] * 3)
    request_id = str(uuid.uuid4())

    with example.connect(facade.target) as channel:
        reply = example.create_webchat(channel, ADDRESS_SID, request_id)

    seen = upstream.requests()
    assert [r["status"] for r in seen] == [503, 503, 503, 201]
    assert reply.conversation_sid.startswith("CH")
    rpcs = facade.rpc_lines(count=2)
    assert [(r["code"], r["request_id"]) for r in rpcs] == [
        ("UNAVAILABLE", request_id),
        ("OK", request_id),
    ]


def test_a_retried_call_that_already_succeeded_returns_the_same_conversation(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    request_id = str(uuid.uuid4())
    with example.connect(facade.target) as channel:
        first = example.create_webchat(channel, ADDRESS_SID, request_id)
        again = example.create_webchat(channel, ADDRESS_SID, request_id)

    assert again.conversation_sid == first.conversation_sid
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ({"status": 503, "retry_after": "2"}, grpc.StatusCode.UNAVAILABLE),
        ({"status": 429, "retry_after": "2"}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_every_retry_info_is_also_a_pushback_trailer(
    make_facade, upstream: EmulatorProcess, fault: dict[str, object], code: grpc.StatusCode
) -> None:
    facade: FacadeProcess = make_facade(upstream.url, FLEX_MAX_ATTEMPTS="1")
    upstream.fault(fault)
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()  # a plain channel: no client retries

    status = rich_status(caught.value)
    assert status["code"] == code
    assert status["RetryInfo"].retry_delay.seconds == 2
    trailers = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert trailers["grpc-retry-pushback-ms"] == "2000"


def test_errors_without_retry_info_tell_grpc_not_to_retry(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(address_sid="IS" + "0" * 32)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    trailers = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert trailers["grpc-retry-pushback-ms"] == "-1"
    assert upstream.requests() == []


def test_an_ambiguous_failure_without_request_id_is_not_retried_by_the_client(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    # A 502 may mean Twilio created the chat. Without a request_id nothing can tell a retry from
    # a new chat, so the facade answers UNAVAILABLE without RetryInfo, and pushback -1 keeps
    # gRPC's retry policy (which covers UNAVAILABLE) from re-sending it.
    upstream.fault({"status": 502}, {"status": 502}, {"status": 502})
    stub = webchat_pb2_grpc.WebChatServiceStub(example.connect(facade.target))
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateWebChat(webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID), timeout=10)

    status = rich_status(caught.value)
    assert status["code"] == grpc.StatusCode.UNAVAILABLE
    assert "RetryInfo" not in status
    assert [r["status"] for r in upstream.requests()] == [502]
