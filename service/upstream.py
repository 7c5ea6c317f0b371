"""The one HTTP client, retry policy and failure classification that every Twilio call uses.

Twilio's POSTs (``/v2/WebChats``, ``/v1/Conversations/{CH}/Messages``) have no idempotency key,
so a re-sent request can create a second conversation or message. Failures are classified:

* never processed: the request never left (connect error, connect/pool timeout) or Twilio refused
  it unprocessed (429, 503) -> retried with full-jitter exponential backoff, honouring Retry-After;
* ambiguous: it may have been processed (500, 502, 504, read/write timeout, reset after sending)
  -> retried only when the caller allows it (``retry_ambiguous``), and logged;
* final: any other answer -> never retried.

Admission from observed latency: an attempt, first or retry, starts only if its rate-limit slot
plus the time an attempt is expected to take (a high percentile of recent successful attempts,
plus a margin) fits the time left; otherwise the call is refused at once, having sent nothing. No
backoff sleeps past that point. Once a request may have left it is never cancelled: it runs to its
own timeout (``service.execution``). Only requests that go through a ``limiter`` draw on the
account's rate budget (the WebChats orchestrator's 5/s).
"""

from __future__ import annotations

import asyncio
import bisect
import email.utils
import logging
import platform
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
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

from . import execution, tracing
from . import observability as obs
from .config import Settings
from .credentials import Credentials
from .deadline import Deadline
from .errors import (
    DeadlineExceeded,
    RateLimitExceeded,
    UpstreamError,
    UpstreamUnreachable,
)
from .ratelimit import Limiter, require_time_for
from .transport import AiohttpTransport, CookielessClient

log = logging.getLogger("flexwebchat.upstream")

SAFE_STATUSES = frozenset({429, 503})  # refused unprocessed
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})  # may have been processed
MAX_RETRY_AFTER = 60.0
BASE_HEADERS = {"Accept": "application/json", "Accept-Charset": "utf-8"}


def _version() -> str:
    try:
        return metadata.version("flexwebchat")
    except metadata.PackageNotFoundError:
        return "0+unknown"


USER_AGENT = (
    f"flexwebchat/{_version()} ({platform.system()} {platform.machine()}) "
    f"httpx/{httpx.__version__} Python/{platform.python_version()}"
)


class CurrentCredential(httpx.Auth):
    """HTTP Basic with the credential the holder says is current, asked at each request."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._credentials.auth_header()
        yield request


def new_http_client(
    settings: Settings, credentials: Credentials | None = None
) -> httpx.AsyncClient:
    """The one long-lived HTTP client, for every Twilio host; create it inside the running loop.
    It sends with the holder's current credential (a holder of ``settings``' own by default)."""
    return CookielessClient(
        auth=CurrentCredential(credentials or Credentials(settings)),
        headers={"User-Agent": USER_AGENT},
        timeout=attempt_timeouts(settings),
        transport=AiohttpTransport(
            limits=httpx.Limits(max_connections=settings.upstream_max_connections)
        ),
        follow_redirects=False,
        trust_env=False,
    )


def attempt_timeouts(settings: Settings) -> httpx.Timeout:
    """An attempt's timeouts: waiting for a connection slot (pool), connecting, writing, reading."""
    return httpx.Timeout(settings.attempt_timeout, connect=min(settings.attempt_timeout, 5))


def longest_wait_before_writing(settings: Settings) -> float:
    """How long after ``before_send`` an attempt may still be waiting for a connection slot and
    connecting, before its request can be written at all."""
    timeouts = attempt_timeouts(settings)
    return (timeouts.pool or 0.0) + (timeouts.connect or 0.0)


@dataclass(frozen=True)
class UpstreamRequest:
    """One request; ``form`` (POST) is sent as application/x-www-form-urlencoded. ``endpoint``
    names it for the latency estimate and metrics; ``creates`` marks a request that creates a
    conversation, which never starts once its caller has left."""

    endpoint: str
    url: str | httpx.URL
    form: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    creates: bool = False
    route: str = ""  # the path with placeholders for its SIDs, naming the attempt's trace span


class LatencyEstimate:
    """How long an attempt is expected to take: the 95th percentile of recent successful
    attempts, or a configured starting value until there are enough of them."""

    WINDOW = 200
    MIN_SAMPLES = 20
    MARGIN = 0.05  # seconds, on top of 10%: what admission adds for scheduling and the answer

    def __init__(self, endpoint: str, initial: float) -> None:
        self._samples: deque[float] = deque(maxlen=self.WINDOW)
        self._sorted: list[float] = []
        self._value = initial
        self._gauge = obs.UPSTREAM_LATENCY_ESTIMATE.labels(endpoint=endpoint)
        self._gauge.set(initial)

    def observe(self, seconds: float) -> None:
        if len(self._samples) == self.WINDOW:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._samples[0]))
        self._samples.append(seconds)
        bisect.insort(self._sorted, seconds)
        if len(self._sorted) >= self.MIN_SAMPLES:
            self._value = self._sorted[int(len(self._sorted) * 0.95)]
            self._gauge.set(self._value)

    def need(self) -> float:
        """The time an attempt must have left to start."""
        return self._value * 1.1 + self.MARGIN


class TwilioHttp:
    """Sends Twilio requests under the retry policy; raises a FacadeError on failure."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: Settings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._http = http
        self._settings = settings
        self._sleep = sleep
        self._estimates: dict[str, LatencyEstimate] = {}

    def estimate(self, endpoint: str) -> LatencyEstimate:
        if endpoint not in self._estimates:
            initial = self._settings.latency_estimate
            self._estimates[endpoint] = LatencyEstimate(endpoint, initial)
        return self._estimates[endpoint]

    async def send(
        self,
        request: UpstreamRequest,
        deadline: Deadline,
        *,
        retry_ambiguous: bool,
        limiter: Limiter | None = None,
        reserve: float = 0.0,
        admitted: bool = False,
    ) -> httpx.Response:
        """The first 2xx answer to ``request``, retried as the policy allows. An attempt starts
        only with its expected duration, plus ``reserve`` (for what must follow), still left.
        ``admitted``: the first attempt's turn was already taken with ``wait_turn``."""
        estimate = self.estimate(request.endpoint)
        # The first attempt waits for its turn, and is made, before any retry machinery exists:
        # a call queued behind the rate limit holds its place in the queue and little else, and
        # tenacity's machinery (about 0.1 ms of CPU per call) is built only to retry.
        if not admitted:
            await self.wait_turn(request, deadline, limiter, reserve)
        try:
            return await self._attempt(request, limiter, estimate)
        except Exception as exc:
            if not is_retryable(exc, retry_ambiguous):
                raise
            failed: Exception | None = exc
        # tenacity takes over as if its own first attempt had failed so: the same stops,
        # backoff, logging and attempt count as when it made that attempt itself.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._settings.max_attempts)
            | stop_unless_attempt_fits(deadline, estimate)
            | stop_if_caller_left(),
            wait=wait_retry_after(wait_random_exponential(multiplier=0.2, max=5.0)),
            retry=retry_if_exception(lambda exc: is_retryable(exc, retry_ambiguous)),
            before_sleep=_log_retry,
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if failed is not None:
                    first, failed = failed, None
                    raise first
                await self.wait_turn(request, deadline, limiter, reserve)  # each retry's own
                return await self._attempt(request, limiter, estimate)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def wait_turn(
        self,
        request: UpstreamRequest,
        deadline: Deadline,
        limiter: Limiter | None,
        reserve: float = 0.0,
    ) -> None:
        """Waits for an attempt's turn: its rate-limit slot, with the attempt's expected duration
        plus ``reserve`` still left; raises (having taken nothing) when it would come too late.
        A caller may wait outside the work that sends, then ``send(..., admitted=True)``."""
        if request.creates and execution.current().abandoned:
            raise DeadlineExceeded("the caller left; no further create is sent")
        need = self.estimate(request.endpoint).need() + reserve
        if limiter is None:
            require_time_for(need, deadline)
            return
        try:
            # Each caller has its own place in the queue (callers are served in turn).
            waited = await limiter.acquire(deadline, need, obs.current_rpc().caller)
        except RateLimitExceeded:
            obs.RATE_LIMIT_REFUSED.inc()
            raise
        obs.RATE_LIMIT_WAIT.observe(waited)

    async def _attempt(
        self, request: UpstreamRequest, limiter: Limiter | None, estimate: LatencyEstimate
    ) -> httpx.Response:
        work = execution.current()
        if work.before_send is not None:
            await work.before_send()
        record = obs.current_rpc()
        record.upstream_attempts += 1
        work.last_sent_at = time.monotonic()
        with tracing.attempt_span(
            record.upstream_attempts, request.method, request.route or request.endpoint
        ) as span:
            started = time.monotonic()
            try:
                # From here the request may leave: nothing cancels it but its own timeout.
                response = await self._http.request(
                    request.method,
                    request.url,
                    data=request.form,
                    headers=BASE_HEADERS | request.headers,
                )
            except httpx.TransportError as exc:
                obs.child(obs.UPSTREAM_REQUESTS, type(exc).__name__).inc()
                failure = transport_failure(exc)
                tracing.finish(span, {}, error=failure.reason)
                raise failure from None
            finally:
                obs.UPSTREAM_LATENCY.observe(time.monotonic() - started)
            obs.child(obs.UPSTREAM_REQUESTS, str(response.status_code)).inc()
            tracing.finish(
                span,
                {"http.response.status_code": response.status_code},
                error="" if response.is_success else f"HTTP {response.status_code}",
            )
        if response.is_success:
            estimate.observe(time.monotonic() - started)
            record.twilio_code = None  # an earlier attempt's failure is not this call's outcome
            return response
        error = upstream_error(response)
        record.twilio_code = error.twilio_code
        if response.status_code == 429 and limiter is not None:
            # Everybody slows down, not only this request.
            await limiter.penalize(error.retry_after or 1.0)
        raise error


def is_retryable(exc: BaseException, retry_ambiguous: bool) -> bool:
    if isinstance(exc, UpstreamError):
        if exc.http_status in SAFE_STATUSES:
            return True
        return exc.http_status in AMBIGUOUS_STATUSES and retry_ambiguous
    if isinstance(exc, UpstreamUnreachable):
        return retry_ambiguous or not exc.maybe_processed
    return False


class stop_unless_attempt_fits(stop_base):
    """Stop when the coming backoff plus an attempt's expected duration would not fit."""

    def __init__(self, deadline: Deadline, estimate: LatencyEstimate) -> None:
        self.deadline = deadline
        self.estimate = estimate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return retry_state.upcoming_sleep + self.estimate.need() > self.deadline.remaining()


class stop_if_caller_left(stop_base):
    """Once the caller is gone, the attempt that was in flight is the last one."""

    def __call__(self, retry_state: RetryCallState) -> bool:
        return execution.current().abandoned


class wait_retry_after(wait_base):
    """Twilio's Retry-After when it sent one, else the fallback backoff."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        hint = getattr(outcome.exception(), "retry_after", None) if outcome else None
        return float(hint) if hint is not None else self.fallback(retry_state)


def is_ambiguous(exc: BaseException | None) -> bool:
    """True when the failed request may have been processed by Twilio."""
    if isinstance(exc, UpstreamUnreachable):
        return exc.maybe_processed
    return isinstance(exc, UpstreamError) and exc.http_status in AMBIGUOUS_STATUSES


def _log_retry(retry_state: RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    cause = str(exc.http_status) if isinstance(exc, UpstreamError) else type(exc).__name__
    obs.child(obs.UPSTREAM_RETRIES, cause).inc()
    fields: dict[str, Any] = {
        "attempt": retry_state.attempt_number,
        "cause": cause,
        "sleep_s": round(retry_state.upcoming_sleep, 3),
    }
    if is_ambiguous(exc):
        obs.POSSIBLE_DUPLICATES.inc()
        log.warning(
            "retrying after an ambiguous failure: Twilio may have created a conversation "
            "that nobody will use",
            extra={"fields": fields},
        )
    else:
        log.info("retrying upstream request", extra={"fields": fields})


def transport_failure(exc: httpx.TransportError) -> UpstreamUnreachable:
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return UpstreamUnreachable(reason, maybe_processed=not never_sent)


def upstream_error(response: httpx.Response) -> UpstreamError:
    """An UpstreamError from any error response; Twilio's JSON body is used when it has one."""
    body = json_object(response) or {}
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


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The response body as a JSON object, or None."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


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
