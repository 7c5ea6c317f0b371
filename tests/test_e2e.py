"""CreateWebChat through real sockets: gRPC client -> facade process -> emulator process."""

from __future__ import annotations

import re
import time
from typing import Any

import grpc
import pytest
from conftest import ADDRESS_SID, EmulatorProcess, FacadeProcess, rich_status

CONVERSATION_SID = re.compile(r"CH[0-9a-f]{32}")


@pytest.fixture
def guests(make_facade, upstream: EmulatorProcess) -> FacadeProcess:
    """A facade where callers (anonymous: caller auth is off) may choose identities guest-*."""
    return make_facade(upstream.url, CALLER_IDENTITY_PREFIXES="anonymous=guest-")  # type: ignore[no-any-return]


def test_create_returns_the_new_conversation(
    guests: FacadeProcess, upstream: EmulatorProcess
) -> None:
    reply = guests.create(customer_friendly_name="Ada", identity="guest-42")

    assert CONVERSATION_SID.fullmatch(reply.conversation_sid)
    assert reply.identity == "guest-42"
    [seen] = upstream.requests()
    assert seen["status"] == 201
    assert seen["form"] == {
        "AddressSid": ADDRESS_SID,
        "CustomerFriendlyName": "Ada",
        "Identity": "guest-42",
    }


def test_full_request_maps_every_field(guests: FacadeProcess, upstream: EmulatorProcess) -> None:
    guests.create(
        chat_friendly_name="Billing question",
        customer_friendly_name="Ada Lovelace",
        pre_engagement_data='{"topic": "billing", "email": "ada@example.com"}',
        ui_version="2.1.0",
        identity="guest-ada",
    )
    [seen] = upstream.requests()
    assert seen["form"] == {
        "AddressSid": ADDRESS_SID,
        "ChatFriendlyName": "Billing question",
        "CustomerFriendlyName": "Ada Lovelace",
        "PreEngagementData": '{"topic": "billing", "email": "ada@example.com"}',
        "Identity": "guest-ada",
    }
    assert seen["headers"]["Ui-Version"] == "2.1.0"


def test_server_default_ui_version(make_facade, upstream: EmulatorProcess) -> None:
    facade = make_facade(upstream.url, FLEX_UI_VERSION="1.0.0")
    facade.create()
    facade.create(ui_version="3.0.0")
    first, second = upstream.requests()
    assert first["headers"]["Ui-Version"] == "1.0.0"
    assert second["headers"]["Ui-Version"] == "3.0.0"


def test_minimal_request_sends_no_empty_fields(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    facade.create()
    [seen] = upstream.requests()
    assert seen["form"] == {"AddressSid": ADDRESS_SID}
    assert "Ui-Version" not in seen["headers"]


def test_validation_error_names_each_field_and_never_calls_twilio(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(
            address_sid="IS0123456789abcdef0123456789abcdef",
            pre_engagement_data="[1]",
            request_id="nope",
        )

    status = rich_status(caught.value)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT
    violations = {v.field: v.description for v in status["BadRequest"].field_violations}
    assert set(violations) == {"address_sid", "pre_engagement_data", "request_id"}
    assert "Conversations service (IS" in violations["address_sid"]
    assert "JSON object" in violations["pre_engagement_data"]
    assert upstream.requests() == []


# Twilio answer -> the status the caller gets (the status table of interface.md).
TWILIO_ANSWERS = [
    (
        {"status": 400, "code": 20001, "message": "Invalid AddressSid"},
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        {"status": 422, "code": 45745, "message": "Invalid parameters"},
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ({"status": 401, "code": 20003, "message": "Authenticate"}, grpc.StatusCode.INTERNAL),
    (
        {"status": 403, "code": 45741, "message": "Account not authorized"},
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    (
        {"status": 404, "code": 20404, "message": "The requested resource was not found"},
        grpc.StatusCode.NOT_FOUND,
    ),
]


@pytest.mark.parametrize(
    ("answer", "expected"), TWILIO_ANSWERS, ids=lambda v: str(getattr(v, "name", v))
)
def test_twilio_errors_map_to_the_status_table_without_retry(
    facade: FacadeProcess, upstream: EmulatorProcess, answer: dict, expected: grpc.StatusCode
) -> None:
    upstream.fault(answer)
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()

    status = rich_status(caught.value)
    assert status["code"] == expected
    assert answer["message"] in status["message"]
    info = status["ErrorInfo"]
    assert info.domain == "flex-api.twilio.com"
    assert info.metadata["twilio_code"] == str(answer["code"])
    assert info.metadata["http_status"] == str(answer["status"])
    assert info.metadata["more_info"] == f"https://www.twilio.com/docs/errors/{answer['code']}"
    assert "RetryInfo" not in status
    assert len(upstream.requests()) == 1  # never retried


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, grpc.StatusCode.RESOURCE_EXHAUSTED), (503, grpc.StatusCode.UNAVAILABLE)],
)
def test_refused_requests_are_retried_then_reported_with_retry_info(
    make_facade, upstream: EmulatorProcess, status: int, expected: grpc.StatusCode
) -> None:
    facade = make_facade(upstream.url, FLEX_MAX_ATTEMPTS="3")
    upstream.fault(*[{"status": status, "retry_after": "0.1"}] * 3)
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()

    details = rich_status(caught.value)
    assert details["code"] == expected
    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() == pytest.approx(0.1)
    assert [r["status"] for r in upstream.requests()] == [status] * 3


def test_a_refused_request_succeeds_on_retry(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 503}, {"status": 429, "retry_after": "0"})
    reply = facade.create()
    assert CONVERSATION_SID.fullmatch(reply.conversation_sid)
    assert [r["status"] for r in upstream.requests()] == [503, 429, 201]


@pytest.mark.parametrize(
    "fault", [{"status": 500}, {"status": 502}, {"status": 504}, {"drop": True}]
)
def test_ambiguous_failures_without_request_id_are_neither_retried_nor_invite_a_retry(
    facade: FacadeProcess, upstream: EmulatorProcess, fault: dict
) -> None:
    upstream.fault(fault)
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()
    details = rich_status(caught.value)
    assert details["code"] == grpc.StatusCode.UNAVAILABLE
    # Every gRPC guide reads RetryInfo as "retry me"; here a retry may create a second chat.
    assert "RetryInfo" not in details
    assert details["ErrorInfo"].metadata["maybe_processed"] == "true"
    assert "may have been created" in details["message"]
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 429}])
def test_failures_twilio_never_processed_still_carry_retry_info(
    make_facade: Any, upstream: EmulatorProcess, fault: dict
) -> None:
    facade = make_facade(upstream.url, FLEX_MAX_ATTEMPTS="1")
    upstream.fault(fault)
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()
    details = rich_status(caught.value)
    assert "RetryInfo" in details
    assert "maybe_processed" not in details["ErrorInfo"].metadata


def test_ambiguous_failures_are_retried_with_a_request_id(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 502}, {"drop": True})
    reply = facade.create(request_id="0b6f2f4e-5d5a-4c1e-9d55-3f5e6b7a8c9d")
    assert CONVERSATION_SID.fullmatch(reply.conversation_sid)
    assert [r["status"] for r in upstream.requests()] == [502, "dropped", 201]
    warning = [line for line in facade.log_lines() if "ambiguous" in line["msg"]]
    assert len(warning) == 2  # a possible duplicate is logged each time


def test_server_setting_allows_ambiguous_retries(make_facade, upstream: EmulatorProcess) -> None:
    facade = make_facade(upstream.url, FLEX_RETRY_AMBIGUOUS="true")
    upstream.fault({"status": 500})
    facade.create()
    assert [r["status"] for r in upstream.requests()] == [500, 201]


def test_unusable_success_body_is_internal_not_ok(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 201, "body": '{"conversation_sid": "CH123", "identity": "x"}'})
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()
    details = rich_status(caught.value)
    assert details["code"] == grpc.StatusCode.INTERNAL
    assert "conversation_sid" in details["message"]


def test_non_json_error_body_is_still_mapped(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 404, "body": "<html>Not Found</html>"})
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()
    details = rich_status(caught.value)
    assert details["code"] == grpc.StatusCode.NOT_FOUND
    assert details["ErrorInfo"].metadata["http_status"] == "404"
    assert "twilio_code" not in details["ErrorInfo"].metadata


def test_deadline_is_honoured_and_stops_further_attempts(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault(latency=3.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(timeout=0.5)
    elapsed = time.monotonic() - started

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5
    time.sleep(3.2)  # long enough for a retry to have reached the emulator
    assert len(upstream.requests()) == 1


def test_unreachable_upstream_is_unavailable(make_facade) -> None:
    from conftest import free_port

    facade = make_facade(f"http://127.0.0.1:{free_port()}", FLEX_MAX_ATTEMPTS="2")
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()
    details = rich_status(caught.value)
    assert details["code"] == grpc.StatusCode.UNAVAILABLE
    assert details["ErrorInfo"].reason == "UPSTREAM_UNREACHABLE"
    assert "ConnectError" in details["message"]
