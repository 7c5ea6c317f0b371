"""The only module that knows Twilio's wire format: form, headers, auth, error bodies, retries.

The request matches what twilio-python's ``client.flex_api.v2.web_channels.create(...)`` sends,
field for field and header for header, except for the honest ``User-Agent`` and the absence of
``X-Twilio-Client`` (which names Twilio's own SDK).

Retry policy (POST /v2/WebChats has no idempotency key, so a re-sent request can create a second
conversation):

* safe: the request never left (connect error, connect/pool timeout) or Twilio refused it
  unprocessed (429, 503) -> retried with full-jitter exponential backoff, honouring Retry-After;
* ambiguous: it may have been processed (500, 502, 504, read/write timeout, reset after sending)
  -> retried only when the caller allows it (a request_id, or FLEX_RETRY_AMBIGUOUS), and logged;
* final: any other answer -> never retried.

No attempt starts, and no backoff sleeps, past the deadline; the attempt in flight when the
deadline passes is cancelled.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import platform
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from service import observability as obs
from service import tracing
from service.config import Settings
from service.deadline import Deadline
from service.errors import (
    DeadlineExceeded,
    RateLimitExceeded,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamUnreachable,
)
from service.ratelimit import RateLimiter

log = logging.getLogger("flexwebchat.flex")

WEBCHATS_PATH = "/v2/WebChats"
CONVERSATION_SID = re.compile(r"CH[0-9a-fA-F]{32}")
SAFE_STATUSES = frozenset({429, 503})  # refused unprocessed
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})  # may have been processed
MAX_RETRY_AFTER = 60.0


def _version() -> str:
    try:
        return metadata.version("flexwebchat")
    except metadata.PackageNotFoundError:
        return "0+unknown"


USER_AGENT = (
    f"flexwebchat/{_version()} ({platform.system()} {platform.machine()}) "
    f"httpx/{httpx.__version__} Python/{platform.python_version()}"
)


@dataclass(frozen=True)
class WebChatParams:
    """A validated CreateWebChat request, as Twilio takes it."""

    address_sid: str
    chat_friendly_name: str = ""
    customer_friendly_name: str = ""
    pre_engagement_data: str = ""
    identity: str = ""
    ui_version: str = ""

    def form(self) -> dict[str, str]:
        """The form body, in twilio-python's field order, without empty fields."""
        fields = {
            "AddressSid": self.address_sid,
            "ChatFriendlyName": self.chat_friendly_name,
            "CustomerFriendlyName": self.customer_friendly_name,
            "PreEngagementData": self.pre_engagement_data,
            "Identity": self.identity,
        }
        return {name: value for name, value in fields.items() if value}


@dataclass(frozen=True)
class WebChat:
    conversation_sid: str
    identity: str


def new_http_client(settings: Settings) -> httpx.AsyncClient:
    """The one long-lived HTTP client; create it inside the running event loop."""
    return httpx.AsyncClient(
        base_url=settings.base_url,
        auth=httpx.BasicAuth(settings.username, settings.password.reveal()),
        headers={"User-Agent": USER_AGENT},
        timeout=httpx.Timeout(settings.attempt_timeout, connect=min(settings.attempt_timeout, 5)),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=False,
        trust_env=False,
    )


class FlexClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: Settings,
        limiter: RateLimiter,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._http = http
        self._settings = settings
        self._limiter = limiter
        self._sleep = sleep

    async def create_web_chat(
        self, params: WebChatParams, deadline: Deadline, *, retry_ambiguous: bool
    ) -> WebChat:
        """POST /v2/WebChats under the retry policy; raises a FacadeError on failure."""
        retry_ambiguous = retry_ambiguous or self._settings.retry_ambiguous
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._settings.max_attempts) | stop_before_deadline(deadline),
            wait=wait_retry_after(wait_random_exponential(multiplier=0.2, max=5.0)),
            retry=retry_if_exception(lambda exc: is_retryable(exc, retry_ambiguous)),
            before_sleep=_log_retry,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async with asyncio.timeout(deadline.remaining()):
                async for attempt in retrying:
                    with attempt:
                        return await self._attempt(params, deadline)
        except TimeoutError:
            raise DeadlineExceeded(
                "the deadline passed before Twilio answered; the attempt in flight was cancelled"
            ) from None
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _attempt(self, params: WebChatParams, deadline: Deadline) -> WebChat:
        try:
            waited = await self._limiter.acquire(deadline)
        except RateLimitExceeded:
            obs.RATE_LIMIT_REFUSED.inc()
            raise
        obs.RATE_LIMIT_WAIT.observe(waited)
        record = obs.current_rpc()
        record.upstream_attempts += 1
        headers = {"Accept": "application/json", "Accept-Charset": "utf-8"}
        ui_version = params.ui_version or self._settings.ui_version
        if ui_version:
            headers["Ui-Version"] = ui_version
        with tracing.attempt_span(record.upstream_attempts) as span:
            started = time.monotonic()
            try:
                response = await self._http.post(WEBCHATS_PATH, data=params.form(), headers=headers)
            except httpx.TransportError as exc:
                obs.UPSTREAM_REQUESTS.labels(status=type(exc).__name__).inc()
                failure = _transport_failure(exc)
                tracing.finish(span, {}, error=failure.reason)
                raise failure from None
            finally:
                obs.UPSTREAM_LATENCY.observe(time.monotonic() - started)
            obs.UPSTREAM_REQUESTS.labels(status=str(response.status_code)).inc()
            tracing.finish(
                span,
                {"http.response.status_code": response.status_code},
                error="" if response.is_success else f"HTTP {response.status_code}",
            )
        if response.is_success:
            return _web_chat(response)
        error = upstream_error(response)
        obs.current_rpc().twilio_code = error.twilio_code
        if response.status_code == 429:
            # Everybody slows down, not only this request.
            await self._limiter.penalize(error.retry_after or 1.0)
        raise error


def is_retryable(exc: BaseException, retry_ambiguous: bool) -> bool:
    if isinstance(exc, UpstreamError):
        if exc.http_status in SAFE_STATUSES:
            return True
        return exc.http_status in AMBIGUOUS_STATUSES and retry_ambiguous
    if isinstance(exc, UpstreamUnreachable):
        return retry_ambiguous or not exc.maybe_processed
    return False


class stop_before_deadline(stop_base):
    """Stop when the coming backoff (plus a moment for the attempt) would not fit the deadline."""

    MIN_ATTEMPT_SECONDS = 0.05

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        needed = retry_state.upcoming_sleep + self.MIN_ATTEMPT_SECONDS
        return needed >= self.deadline.remaining()


class wait_retry_after(wait_base):
    """Twilio's Retry-After when it sent one, else the fallback backoff."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        hint = getattr(outcome.exception(), "retry_after", None) if outcome else None
        return float(hint) if hint is not None else self.fallback(retry_state)


def _log_retry(retry_state: RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    ambiguous = isinstance(exc, UpstreamUnreachable) and exc.maybe_processed
    ambiguous |= isinstance(exc, UpstreamError) and exc.http_status in AMBIGUOUS_STATUSES
    cause = str(exc.http_status) if isinstance(exc, UpstreamError) else type(exc).__name__
    obs.UPSTREAM_RETRIES.labels(cause=cause).inc()
    fields: dict[str, Any] = {
        "attempt": retry_state.attempt_number,
        "cause": str(exc),
        "sleep_s": round(retry_state.upcoming_sleep, 3),
    }
    if ambiguous:
        obs.POSSIBLE_DUPLICATES.inc()
        log.warning(
            "retrying after an ambiguous failure: Twilio may have created a conversation "
            "that nobody will use",
            extra={"fields": fields},
        )
    else:
        log.info("retrying upstream request", extra={"fields": fields})


def _transport_failure(exc: httpx.TransportError) -> UpstreamUnreachable:
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return UpstreamUnreachable(reason, maybe_processed=not never_sent)


def _web_chat(response: httpx.Response) -> WebChat:
    try:
        body = response.json()
    except ValueError:
        raise UpstreamBadResponse(response.status_code, "body is not JSON") from None
    if not isinstance(body, dict):
        raise UpstreamBadResponse(response.status_code, "body is not a JSON object")
    sid, identity = body.get("conversation_sid"), body.get("identity")
    if not isinstance(sid, str) or not CONVERSATION_SID.fullmatch(sid):
        raise UpstreamBadResponse(response.status_code, "conversation_sid is not CH + 32 hex")
    if not isinstance(identity, str) or not identity:
        raise UpstreamBadResponse(response.status_code, "identity is missing")
    obs.current_rpc().conversation_sid = sid
    return WebChat(conversation_sid=sid, identity=identity)


def upstream_error(response: httpx.Response) -> UpstreamError:
    """An UpstreamError from any error response; Twilio's JSON body is used when it has one."""
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        pass
    if not isinstance(body, dict):
        body = {}
    code = body.get("code")
    message = body.get("message")
    more_info = body.get("more_info")
    if not isinstance(message, str) or not message:
        message = response.reason_phrase or f"HTTP {response.status_code}"
    return UpstreamError(
        response.status_code,
        message[:1000],
        twilio_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        more_info=more_info if isinstance(more_info, str) else "",
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
