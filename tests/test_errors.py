"""The status table of interface.md, as built by service.errors.to_status."""

from __future__ import annotations

import pytest
from google.rpc import code_pb2, error_details_pb2

from service.errors import (
    DeadlineExceeded,
    RateLimitExceeded,
    SharedStateUnavailable,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamUnreachable,
    to_status,
)


def detail_types(status) -> set[str]:
    return {d.type_url.rsplit(".", 1)[-1] for d in status.details}


@pytest.mark.parametrize(
    ("http_status", "code", "retry_info"),
    [
        (400, code_pb2.INVALID_ARGUMENT, False),
        (422, code_pb2.INVALID_ARGUMENT, False),
        (401, code_pb2.INTERNAL, False),
        (403, code_pb2.PERMISSION_DENIED, False),
        (404, code_pb2.NOT_FOUND, False),
        (429, code_pb2.RESOURCE_EXHAUSTED, True),
        (500, code_pb2.UNAVAILABLE, True),
        (503, code_pb2.UNAVAILABLE, True),
    ],
)
def test_upstream_errors(http_status: int, code: int, retry_info: bool) -> None:
    error = UpstreamError(
        http_status, "msg", twilio_code=20000 + http_status, more_info="https://x", retry_after=3
    )
    status = to_status(error)
    assert status.code == code
    assert status.message == "Twilio: msg"
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.domain == "flex-api.twilio.com"
    assert dict(info.metadata) == {
        "twilio_code": str(20000 + http_status),
        "http_status": str(http_status),
        "more_info": "https://x",
    }
    assert ("RetryInfo" in detail_types(status)) == retry_info
    if retry_info:
        delay = error_details_pb2.RetryInfo()
        status.details[1].Unpack(delay)
        assert delay.retry_delay.seconds == 3


@pytest.mark.parametrize(
    ("error", "code", "details"),
    [
        (
            UpstreamUnreachable("ConnectError", maybe_processed=False),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo", "RetryInfo"},
        ),
        (UpstreamBadResponse(201, "not JSON"), code_pb2.INTERNAL, {"ErrorInfo"}),
        (RateLimitExceeded(2.5), code_pb2.RESOURCE_EXHAUSTED, {"ErrorInfo", "RetryInfo"}),
        (DeadlineExceeded("late"), code_pb2.DEADLINE_EXCEEDED, set()),
        (SharedStateUnavailable("down"), code_pb2.UNAVAILABLE, {"ErrorInfo", "RetryInfo"}),
        (ValueError("bug"), code_pb2.INTERNAL, set()),
    ],
)
def test_facade_errors(error: Exception, code: int, details: set[str]) -> None:
    status = to_status(error)
    assert status.code == code
    assert detail_types(status) == details


def test_unexpected_errors_do_not_leak_their_text() -> None:
    assert to_status(ValueError("token=abc")).message == "internal error"


@pytest.mark.parametrize(
    ("seconds", "expected"), [(float("inf"), 3600.0), (float("nan"), 1.0), (-5.0, 0.0)]
)
def test_a_retry_delay_from_untrusted_state_is_bounded(seconds: float, expected: float) -> None:
    # An unbounded delay (e.g. read from Redis) once raised OverflowError: UNKNOWN, no log line.
    status = to_status(RateLimitExceeded(retry_after=seconds))
    [info] = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    retry = error_details_pb2.RetryInfo()
    info.Unpack(retry)
    assert retry.retry_delay.ToTimedelta().total_seconds() == expected
