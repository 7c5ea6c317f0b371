"""Every failure the facade reports, and the one table that turns it into a gRPC status.

Exception tree::

    FacadeError                      anything a caller is told about
    ├── InvalidRequest               bad input, never sent upstream (INVALID_ARGUMENT + BadRequest)
    ├── UpstreamError                Twilio answered with an HTTP error (status by the table below)
    ├── UpstreamUnreachable          no usable answer: connect failure, timeout, reset (UNAVAILABLE)
    ├── UpstreamBadResponse          2xx with an unusable body (INTERNAL)
    ├── RateLimitExceeded            the account-wide budget cannot fit the deadline
    ├── DeadlineExceeded             the caller's deadline (or the server maximum) ran out
    ├── MaybeProcessed               ambiguous failure of a call without request_id (no RetryInfo)
    ├── Draining                     this replica is shutting down; another one will serve
    ├── SharedStateUnavailable       Redis (shared limits, idempotency) cannot be reached
    ├── Unauthenticated              caller auth is on and the call has no valid token
    ├── IdentityNotAllowed           ``identity`` outside the caller's namespace (PERMISSION_DENIED)
    ├── TokensNotConfigured          issue_token/RefreshGuestToken without token settings
    ├── TokenRejected                a presented guest token is forged, foreign or expired
    ├── ServerLimit                  a limit the facade enforces on itself (RESOURCE_EXHAUSTED)
    │   ├── CallerQuotaExceeded      one caller already has too many calls queued or in flight
    │   └── CallerConcurrencyExceeded  one caller already has its share of the replica's calls
    └── ReplayedError                a stored outcome of an earlier call with the same request_id

Servicer code raises these; :func:`to_status` is the only place that builds statuses.

``str(exc)`` is what the RPC log line says: it never carries Twilio's message text, which can
hold a caller's personal data; the status message (for the caller) does, capped.
"""

from __future__ import annotations

from typing import ClassVar

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

UPSTREAM_DOMAIN = "flex-api.twilio.com"
FACADE_DOMAIN = "flexwebchat.v1"


class FacadeError(Exception):
    """Base of every error reported to callers."""


class InvalidRequest(FacadeError):
    """The request is invalid; it never reaches Twilio. ``violations`` is (field, description)."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{field}: {text}" for field, text in violations))


class UpstreamError(FacadeError):
    """Twilio answered a non-2xx status."""

    def __init__(
        self,
        http_status: int,
        message: str,
        *,
        twilio_code: int | None = None,
        more_info: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.http_status = http_status
        self.message = message
        self.twilio_code = twilio_code
        self.more_info = more_info
        self.retry_after = retry_after
        code = f" (Twilio code {twilio_code})" if twilio_code is not None else ""
        super().__init__(f"Twilio answered {http_status}{code}")


class UpstreamUnreachable(FacadeError):
    """No HTTP answer. ``maybe_processed`` is true when the request may have reached Twilio."""

    def __init__(self, reason: str, *, maybe_processed: bool) -> None:
        self.reason = reason
        self.maybe_processed = maybe_processed
        self.retry_after: float | None = None
        super().__init__(f"Twilio could not be reached: {reason}")


class UpstreamBadResponse(FacadeError):
    """Twilio answered 2xx, but not with a usable conversation."""

    def __init__(self, http_status: int, reason: str) -> None:
        self.http_status = http_status
        super().__init__(f"Twilio answered {http_status} with an unusable body: {reason}")


class UnusableRead(FacadeError):
    """A read from Twilio answered with a body that does not say what was asked (a 2xx without
    it, a 404 that is not Twilio's). Nothing was changed by it, so a retry is safe (unlike a
    create's unusable answer)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Twilio answered with an unusable body: {reason}; retry")


class RateLimitExceeded(FacadeError):
    """The account-wide rate limit cannot admit the request before its deadline."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"the account-wide Flex rate limit cannot fit this request before its deadline; "
            f"retry in {retry_after:.1f}s or with a longer deadline"
        )


class DeadlineExceeded(FacadeError):
    """The deadline ran out before Twilio answered."""


class MaybeProcessed(FacadeError):
    """A call without request_id failed after its request may have been processed: a retry could
    create a second conversation, so the status must not invite one."""

    def __init__(self, cause: FacadeError) -> None:
        self.cause = cause
        super().__init__(
            f"{cause}; the conversation may have been created anyway, and a retry may create a "
            "second one (send a request_id to make retries safe)"
        )


class Draining(FacadeError):
    """The replica is shutting down: queued and new calls go elsewhere."""

    def __init__(self) -> None:
        super().__init__("this replica is shutting down; nothing was sent; retry")


class SharedStateUnavailable(FacadeError):
    """Redis, which holds the shared rate limit and idempotency records, is unreachable."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"shared state (Redis) unavailable: {reason}")


class Unauthenticated(FacadeError):
    """Caller authentication is on and the call did not prove who it is."""


class IdentityNotAllowed(FacadeError):
    """The caller chose an ``identity`` outside its CALLER_IDENTITY_PREFIXES namespace. The
    message never repeats the identity: it may be an agent's."""


class TokensNotConfigured(FacadeError):
    """Guest tokens were asked for, but the server lacks the settings to sign them."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            "guest access tokens are not configured on this server: set "
            + ", ".join(missing)
            + "; nothing was created"
        )


class TokenRejected(FacadeError):
    """A presented token is not one to refresh. ``reason`` is TOKEN_INVALID or TOKEN_EXPIRED;
    the message says which and nothing more, so it cannot guide a forgery."""

    MESSAGES: ClassVar[dict[str, str]] = {
        "TOKEN_EXPIRED": "the guest session has ended; start a new chat",
        "TOKEN_INVALID": "the access token was not issued by this service",
    }

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(self.MESSAGES[reason])


class TokenWrongCaller(FacadeError):
    """A genuine token of a session another caller created."""

    def __init__(self) -> None:
        super().__init__("the access token belongs to a session another caller created")


class SessionEnded(FacadeError):
    """A token was asked for (a replay with issue_token) after the guest session ended."""

    def __init__(self) -> None:
        super().__init__(
            "the guest session of this request_id has ended (GUEST_SESSION_MAX_SECONDS): "
            "no token can be issued for it; start a new chat with a new request_id"
        )


class ConversationClosed(FacadeError):
    """A resume of a guest whose conversation an agent has closed."""

    def __init__(self) -> None:
        super().__init__("the guest's conversation has been closed; start a new chat")


class ServerLimit(FacadeError):
    """A limit the facade enforces on itself: concurrent calls, message size, a caller's share."""

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(message)


class CallerQuotaExceeded(ServerLimit):
    """One caller may not hold more than its share of the queue and the upstream."""

    def __init__(self, caller: str, limit: int) -> None:
        super().__init__(
            "CALLER_QUOTA",
            f"caller {caller!r} already has {limit} calls queued or in flight "
            "(FLEX_MAX_PENDING_PER_CALLER); retry when some have finished",
            retry_after=1.0,
        )


class CallerConcurrencyExceeded(ServerLimit):
    """One caller may not hold more than its share of the replica's concurrent calls."""

    def __init__(self, caller: str, limit: int) -> None:
        super().__init__(
            "CALLER_CONCURRENCY_LIMIT",
            f"caller {caller!r} already has {limit} calls in progress on this replica "
            "(GRPC_MAX_CONCURRENT_RPCS_PER_CALLER); retry when some have finished",
            retry_after=1.0,
        )


class ReplayedError(FacadeError):
    """The stored failure of the first call with this request_id, returned again as it was."""

    def __init__(self, status: status_pb2.Status) -> None:
        self.status = status
        # Not the stored message: it may quote Twilio's text, which stays out of the logs.
        super().__init__("the stored outcome of the first call with this request_id")


# Twilio HTTP status -> gRPC code, for answers the retry policy did not (or could no longer) retry.
_HTTP_TO_CODE: dict[int, int] = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.INTERNAL,  # the facade's own credentials are wrong: not the caller's fault
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    422: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
}
_DEFAULT_RETRY_DELAY = 1.0
_MAX_RETRY_DELAY = 3600.0  # no delay from any source (Twilio, Redis) may overflow a Duration
# Upstream text is capped so that a status always fits gRPC's 8 KiB metadata limit (as
# grpc-status-details-bin, base64) with room to spare; past it the caller would get
# RESOURCE_EXHAUSTED "Stream removed" instead of the real outcome.
MAX_MESSAGE_CHARS = 1024
MAX_DETAIL_CHARS = 512
MAX_STATUS_BYTES = 4096


def upstream_code(http_status: int) -> int:
    if http_status in _HTTP_TO_CODE:
        return _HTTP_TO_CODE[http_status]
    if http_status >= 500:
        return int(code_pb2.UNAVAILABLE)
    return int(code_pb2.FAILED_PRECONDITION if http_status >= 400 else code_pb2.INTERNAL)


def to_status(exc: BaseException) -> status_pb2.Status:
    """The gRPC status (with google.rpc details) a caller receives for ``exc``."""
    match exc:
        case ReplayedError():
            return exc.status
        case InvalidRequest():
            return _invalid(exc.violations)
        case UpstreamError():
            code = upstream_code(exc.http_status)
            metadata = {"http_status": str(exc.http_status)}
            if exc.twilio_code is not None:
                metadata["twilio_code"] = str(exc.twilio_code)
            if exc.more_info:
                metadata["more_info"] = _cap(exc.more_info, MAX_DETAIL_CHARS)
            reason = f"TWILIO_{exc.twilio_code}" if exc.twilio_code else f"HTTP_{exc.http_status}"
            details = [_error_info(reason, UPSTREAM_DOMAIN, metadata)]
            if code in (code_pb2.UNAVAILABLE, code_pb2.RESOURCE_EXHAUSTED):
                details.append(_retry_info(exc.retry_after))
            message = f"Twilio: {_cap(exc.message, MAX_MESSAGE_CHARS)}"
            return _status(code, message, *details)
        case UpstreamUnreachable():
            metadata = {"reason": _cap(exc.reason, MAX_DETAIL_CHARS)}
            info = _error_info("UPSTREAM_UNREACHABLE", UPSTREAM_DOMAIN, metadata)
            return _status(code_pb2.UNAVAILABLE, str(exc), info, _retry_info(exc.retry_after))
        case UpstreamBadResponse():
            metadata = {"http_status": str(exc.http_status)}
            info = _error_info("UPSTREAM_BAD_RESPONSE", UPSTREAM_DOMAIN, metadata)
            return _status(code_pb2.INTERNAL, str(exc), info)
        case UnusableRead():
            info = _error_info("UPSTREAM_BAD_RESPONSE", UPSTREAM_DOMAIN, {})
            return _status(code_pb2.UNAVAILABLE, str(exc), info, _retry_info(None))
        case RateLimitExceeded():
            info = _error_info("RATE_LIMITED", FACADE_DOMAIN, {})
            return _status(
                code_pb2.RESOURCE_EXHAUSTED, str(exc), info, _retry_info(exc.retry_after)
            )
        case MaybeProcessed():
            status = to_status(exc.cause)
            kept = [d for d in status.details if not d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            for packed in kept:
                if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    packed.Unpack(info)
                    info.metadata["maybe_processed"] = "true"
                    packed.Pack(info)
            del status.details[:]
            status.details.extend(kept)
            status.message = str(exc)
            return status
        case Draining():
            info = _error_info("DRAINING", FACADE_DOMAIN, {})
            return _status(code_pb2.UNAVAILABLE, str(exc), info, _retry_info(0.0))
        case DeadlineExceeded():
            return _status(code_pb2.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded")
        case SharedStateUnavailable():
            info = _error_info("SHARED_STATE_UNAVAILABLE", FACADE_DOMAIN, {})
            return _status(code_pb2.UNAVAILABLE, str(exc), info, _retry_info(None))
        case Unauthenticated():
            return _status(code_pb2.UNAUTHENTICATED, str(exc))
        case IdentityNotAllowed():
            info = _error_info("IDENTITY_NOT_ALLOWED", FACADE_DOMAIN, {})
            return _status(code_pb2.PERMISSION_DENIED, str(exc), info)
        case TokensNotConfigured():
            failure = error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type="SETTING", subject=name, description="not set on the server"
                    )
                    for name in exc.missing
                ]
            )
            return _status(code_pb2.FAILED_PRECONDITION, str(exc), failure)
        case TokenRejected():
            status = _invalid([("access_token", str(exc))])
            status.details.add().Pack(_error_info(exc.reason, FACADE_DOMAIN, {}))
            return status
        case TokenWrongCaller():
            info = _error_info("TOKEN_WRONG_CALLER", FACADE_DOMAIN, {})
            return _status(code_pb2.PERMISSION_DENIED, str(exc), info)
        case SessionEnded():
            info = _error_info("TOKEN_EXPIRED", FACADE_DOMAIN, {})
            return _status(code_pb2.FAILED_PRECONDITION, str(exc), info)
        case ConversationClosed():
            info = _error_info("CONVERSATION_CLOSED", FACADE_DOMAIN, {})
            return _status(code_pb2.FAILED_PRECONDITION, str(exc), info)
        case ServerLimit():
            limit: list[object] = [_error_info(exc.reason, FACADE_DOMAIN, {})]
            if exc.retry_after is not None:
                limit.append(_retry_info(exc.retry_after))
            return _status(code_pb2.RESOURCE_EXHAUSTED, str(exc), *limit)
        case _:
            return _status(code_pb2.INTERNAL, "internal error")


# The codes the shipped service config (generated/flexwebchat/v1/service_config.json) retries.
RETRIED_CODES = frozenset({code_pb2.UNAVAILABLE, code_pb2.RESOURCE_EXHAUSTED})


def retry_delay_ms(status: status_pb2.Status) -> int | None:
    """The RetryInfo delay of ``status`` in milliseconds, or None when it carries no RetryInfo."""
    for packed in status.details:
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            packed.Unpack(info)
            return int(info.retry_delay.ToMilliseconds())
    return None


def pushback_ms(status: status_pb2.Status) -> int | None:
    """The ``grpc-retry-pushback-ms`` trailer of ``status``, or None for none (gRPC's retry
    design, A6). Only a code the service config retries carries one: its RetryInfo delay, or -1
    when a retry is unsafe (no RetryInfo: the call may have created a conversation, or will fail
    the same way). Any other code carries none, because A6 clients count a failure with a
    negative pushback against ``retryThrottling``: a caller's bad requests would switch off
    its channel's retries."""
    if status.code not in RETRIED_CODES:
        return None
    delay = retry_delay_ms(status)
    return -1 if delay is None else delay


def _invalid(violations: list[tuple[str, str]]) -> status_pb2.Status:
    """INVALID_ARGUMENT with one BadRequest field violation per (field, description)."""
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )
    message = "; ".join(f"{field}: {description}" for field, description in violations)
    return _status(code_pb2.INVALID_ARGUMENT, f"invalid request: {message}", bad)


def _status(code: int, message: str, *details: object) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)  # type: ignore[arg-type]
        status.details.append(packed)
    excess = status.ByteSize() - MAX_STATUS_BYTES
    if excess > 0:  # the details are capped field by field; what is left to trim is the message
        status.message = _cap(status.message, max(len(status.message) - excess - 16, 64))
    return status


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_info(reason: str, domain: str, metadata: dict[str, str]) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)


def _retry_info(seconds: float | None) -> error_details_pb2.RetryInfo:
    delay = seconds if seconds is not None else _DEFAULT_RETRY_DELAY
    delay = min(max(delay, 0.0), _MAX_RETRY_DELAY) if delay == delay else _DEFAULT_RETRY_DELAY
    whole = int(delay)
    duration = duration_pb2.Duration(seconds=whole, nanos=int((delay - whole) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=duration)
