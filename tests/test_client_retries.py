"""gRPC's own retries with the shipped service config: safe because the request_id is the same.

The channel is the one examples/python/create_webchat.py (docs/clients.md) builds.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from typing import Any

import grpc
import pytest
from conftest import ADDRESS_SID, ROOT, EmulatorProcess, FacadeProcess, rich_status
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service import interceptors
from service.errors import RETRIED_CODES

sys.path.insert(0, str(ROOT / "examples/python"))
import create_webchat as example


def create(channel: grpc.Channel, request_id: str) -> webchat_pb2.CreateWebChatResponse:
    """A chat without a guest token, on the example's channel (its service config)."""
    stub = webchat_pb2_grpc.WebChatServiceStub(channel)
    request = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID, request_id=request_id)
    return stub.CreateWebChat(request, timeout=10)


def test_client_retries_past_the_facades_own_attempts_create_one_conversation(
    make_facade, upstream: EmulatorProcess
) -> None:
    facade: FacadeProcess = make_facade(upstream.url, FLEX_MAX_ATTEMPTS="2")
    # Three 503s: the facade's two attempts fail (UNAVAILABLE + RetryInfo), then gRPC itself
    # re-sends the call, whose second attempt upstream succeeds.
    upstream.fault(*[{"status": 503}] * 3)
    request_id = str(uuid.uuid4())

    with example.connect(facade.target) as channel:
        reply = create(channel, request_id)

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
        first = create(channel, request_id)
        again = create(channel, request_id)

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


def test_codes_grpc_does_not_retry_carry_no_pushback(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(address_sid="IS" + "0" * 32)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    trailers = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert "grpc-retry-pushback-ms" not in trailers
    assert "grpc-status-details-bin" in trailers
    assert upstream.requests() == []


PUSHBACK_ROW = re.compile(r"^\| (\w+|any other) \| (yes|no|any) \| (.+) \|$", re.MULTILINE)


def pushback_table() -> dict[tuple[str, str], str]:
    """docs/clients.md's pushback table: (code, RetryInfo) -> the trailer's value."""
    text = (ROOT / "docs/clients.md").read_text()
    table = text[text.index("<!-- pushback table") :].split("\n\n", 1)[0]
    return {(code, info): value for code, info, value in PUSHBACK_ROW.findall(table)}


def documented_pushback(code: str, retry_delay_ms: int | None) -> str | None:
    table = pushback_table()
    info = "no" if retry_delay_ms is None else "yes"
    value = table.get((code, info), table[("any other", "any")])
    if value == "none":
        return None
    if value == "`-1`":
        return "-1"
    assert value == "the RetryInfo delay, in milliseconds", value
    return str(retry_delay_ms)


def test_the_pushback_table_names_exactly_the_codes_the_service_config_retries() -> None:
    config = json.loads(example.SERVICE_CONFIG)
    [method] = config["methodConfig"]
    retried = set(method["retryPolicy"]["retryableStatusCodes"])

    with_pushback = {code for code, _ in pushback_table() if code != "any other"}
    assert with_pushback == retried
    assert {code_pb2.Code.Name(code) for code in RETRIED_CODES} == retried


@pytest.mark.parametrize("code", [c for c in code_pb2.Code.values() if c != code_pb2.OK])
@pytest.mark.parametrize("retry_delay_ms", [None, 0, 2500])
def test_every_status_codes_trailers_follow_the_pushback_table(
    code: int, retry_delay_ms: int | None
) -> None:
    status = status_pb2.Status(code=code, message="m")
    if retry_delay_ms is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(retry_delay_ms)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))

    trailers = dict(interceptors._grpc_status(status).trailing_metadata)

    expected = documented_pushback(code_pb2.Code.Name(code), retry_delay_ms)
    assert trailers.get("grpc-retry-pushback-ms") == expected
    assert "grpc-status-details-bin" in trailers


class A6RetryThrottle:
    """retryThrottling as gRPC's retry design (A6) and grpc-java count it: a failure counts when
    its code is retryable or its pushback is negative; retries stop at half the tokens."""

    def __init__(self, config: dict[str, Any]) -> None:
        throttling = config["retryThrottling"]
        [method] = config["methodConfig"]
        self.retryable = set(method["retryPolicy"]["retryableStatusCodes"])
        self.max_tokens = float(throttling["maxTokens"])
        self.ratio = float(throttling["tokenRatio"])
        self.tokens = self.max_tokens

    def failed(self, error: grpc.RpcError) -> bool:
        """Counts ``error``; whether the channel would retry it."""
        code = error.code().name  # type: ignore[attr-defined]
        pushback = dict(error.trailing_metadata()).get("grpc-retry-pushback-ms")  # type: ignore[attr-defined]
        if code in self.retryable or (pushback is not None and int(pushback) < 0):
            self.tokens = max(self.tokens - 1, 0.0)
        return code in self.retryable and self.tokens > self.max_tokens / 2 and pushback != "-1"

    def succeeded(self) -> None:
        self.tokens = min(self.tokens + self.ratio, self.max_tokens)


def test_a_channel_after_many_bad_requests_still_retries_an_unavailable(
    make_facade, upstream: EmulatorProcess
) -> None:
    facade: FacadeProcess = make_facade(upstream.url, FLEX_MAX_ATTEMPTS="1")
    throttle = A6RetryThrottle(json.loads(example.SERVICE_CONFIG))
    stub = webchat_pb2_grpc.WebChatServiceStub(grpc.insecure_channel(facade.target))
    bad = webchat_pb2.CreateWebChatRequest(address_sid="IS" + "0" * 32)
    for _ in range(20):  # a caller's typo in a loop
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateWebChat(bad, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        throttle.failed(caught.value)

    upstream.fault({"status": 503, "retry_after": "0"})
    request = webchat_pb2.CreateWebChatRequest(
        address_sid=ADDRESS_SID, request_id=str(uuid.uuid4())
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateWebChat(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

    assert throttle.failed(caught.value), "an A6 client would not retry the UNAVAILABLE"
    reply = stub.CreateWebChat(request, timeout=10)
    assert reply.conversation_sid.startswith("CH")


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
    trailers = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert trailers["grpc-retry-pushback-ms"] == "-1"
    assert [r["status"] for r in upstream.requests()] == [502]
