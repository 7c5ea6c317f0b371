"""Logs, metrics and the per-RPC record that ties them together.

Each RPC gets an :class:`RpcRecord` (in a context variable) that the layers below fill in
(attempts, Twilio code, conversation SID); the server interceptor logs it as one line when the RPC
ends. Nothing here ever sees a secret, and pre-engagement data (personal data) is never logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("flexwebchat")

RPCS = Counter("flexwebchat_rpcs", "RPCs handled, by final gRPC code", ["method", "code", "caller"])
RPCS_IN_FLIGHT = Gauge("flexwebchat_rpcs_in_flight", "RPCs being handled now")
GRPC_CONNECTIONS = Gauge(
    "flexwebchat_grpc_connections",
    "Connections by listener (grpc, health) and by whether they made an authenticated call",
    ["listener", "state"],
)
CONNECTIONS_CLOSED = Counter(
    "flexwebchat_connections_closed",
    "Connections closed for not authenticating in time, or beyond a peer's share",
    ["listener", "reason"],
)
RPC_LATENCY = Histogram(
    "flexwebchat_rpc_duration_seconds",
    "RPC duration",
    ["method"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPSTREAM_REQUESTS = Counter(
    "flexwebchat_upstream_requests",
    "Requests sent to Flex, by HTTP status (or transport failure)",
    ["status"],
)
UPSTREAM_LATENCY = Histogram(
    "flexwebchat_upstream_attempt_duration_seconds",
    "Duration of one upstream attempt",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
UPSTREAM_LATENCY_ESTIMATE = Gauge(
    "flexwebchat_upstream_latency_estimate_seconds",
    "Expected duration of an upstream attempt (p95 of recent successes): what admission uses",
    ["endpoint"],
)
ORPHANED_CONVERSATIONS = Counter(
    "flexwebchat_orphaned_conversations",
    "Conversations Twilio created after their caller (without request_id) had left",
)
UPSTREAM_RETRIES = Counter("flexwebchat_upstream_retries", "Upstream retries, by cause", ["cause"])
POSSIBLE_DUPLICATES = Counter(
    "flexwebchat_possible_duplicates",
    "Retries after an ambiguous failure: Twilio may have created an extra, unused conversation",
)
RATE_LIMIT_WAIT = Histogram(
    "flexwebchat_rate_limit_wait_seconds",
    "Time an upstream attempt waited for the account-wide rate limit",
    buckets=(0, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
RATE_LIMIT_REFUSED = Counter(
    "flexwebchat_rate_limit_refused", "Requests refused because the wait exceeded the deadline"
)
IDEMPOTENCY = Counter(
    "flexwebchat_idempotency",
    "request_id outcomes: executed, replayed, conflict, evicted (in-process records full), "
    "lost (an outcome could not be stored), recovered_by_lookup (an id without a record whose "
    "conversation Twilio already had: a lost record)",
    ["outcome"],
)
# Exported at 0 from the start, so that an alert on increase() counts the first lost record too.
for _outcome in ("recovered_by_lookup", "lost"):
    IDEMPOTENCY.labels(outcome=_outcome)
GUEST_TOKENS = Counter(
    "flexwebchat_guest_tokens_issued",
    "Guest access tokens issued, by way (create, refresh, resume of an expired token)",
    ["via"],
)
TOKEN_REFRESH_REFUSED = Counter(
    "flexwebchat_token_refresh_refused",
    "RefreshGuestToken refusals, by reason "
    "(TOKEN_INVALID, TOKEN_EXPIRED, TOKEN_WRONG_CALLER, CONVERSATION_CLOSED)",
    ["reason"],
)
INITIAL_MESSAGES = Counter(
    "flexwebchat_initial_messages",
    "Guests' first messages, by outcome (posted, failed)",
    ["outcome"],
)
CONFIG_RELOAD_FAILURES = Counter(
    "flexwebchat_config_reload_failures",
    "Changed files (caller auth, TLS, secrets) that could not be applied in whole or in part, "
    "by variable",
    ["file"],
)


CONFIG_RELOAD_FAILING = Gauge(
    "flexwebchat_config_reload_failing",
    "1 while the content on disk of a reloaded file is refused (the replica runs on what it had), "
    "0 once a change is applied, by variable",
    ["file"],
)


def reload_failed(variable: str, message: str, error: str) -> None:
    """A changed file that could not be applied: logged at error and counted, by variable; it
    stays failing until ``reload_applied``."""
    CONFIG_RELOAD_FAILURES.labels(file=variable).inc()
    CONFIG_RELOAD_FAILING.labels(file=variable).set(1)
    _failing.add(variable)
    logging.getLogger("flexwebchat.reload").error(
        message, extra={"fields": {"file": variable, "error": error}}
    )


def reload_applied(*variables: str) -> None:
    """The files behind ``variables`` were applied whole: none of them is failing any more."""
    for variable in _failing.intersection(variables):
        CONFIG_RELOAD_FAILING.labels(file=variable).set(0)
        _failing.discard(variable)


_failing: set[str] = set()  # variables whose gauge is 1


SHARED_STATE_ERRORS = Counter(
    "flexwebchat_shared_state_errors", "Failed operations on the shared state (Redis)"
)


@dataclass(slots=True)  # one per call in flight: no __dict__ each
class RpcRecord:
    """What one RPC did; logged as one line when it ends."""

    method: str
    caller: str = "anonymous"
    trace_id: str = ""
    request_id: str = ""
    upstream_attempts: int = 0
    twilio_code: int | None = None
    conversation_sid: str = ""
    idempotency: str = ""
    started: float = field(default_factory=time.monotonic)


_current: ContextVar[RpcRecord | None] = ContextVar("flexwebchat_rpc", default=None)


def current_rpc() -> RpcRecord:
    """The running RPC's record (a throwaway one outside an RPC, e.g. in unit tests)."""
    record = _current.get()
    return record if record is not None else RpcRecord(method="")


def begin_rpc(record: RpcRecord) -> None:
    _current.set(record)


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)`` (values in the metric's label order), looked up once per label
    set: prometheus_client's labels() checks and locks on every call. Label values here come from
    small fixed sets (methods, codes, callers, HTTP statuses), so the cache stays small."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


def count_rpc(record: RpcRecord, code: str) -> None:
    """Counts a finished RPC and observes its duration."""
    child(RPCS, record.method, code, record.caller).inc()
    child(RPC_LATENCY, record.method).observe(time.monotonic() - record.started)


_LOGGED_FIELDS = tuple(f.name for f in dataclasses.fields(RpcRecord) if f.name != "started")


def log_rpc(record: RpcRecord, code: str, message: str) -> None:
    level = logging.INFO if code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND") else logging.WARNING
    if not log.isEnabledFor(level):
        return  # the line is built only to be written (dataclasses.asdict alone cost 0.09 ms)
    fields = {
        name: value for name in _LOGGED_FIELDS if (value := getattr(record, name)) not in ("", None)
    }
    fields["code"] = code
    fields["duration_ms"] = round((time.monotonic() - record.started) * 1000, 1)
    if code != "OK":
        fields["error"] = message
    log.log(level, "rpc", extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # ASCII only: no raw line or paragraph separators, bidi controls or escapes in a line.
        return json.dumps(entry, default=str, ensure_ascii=True)


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL msg key=value ...``; a value that could be mistaken for more pairs or
    lines (spaces, '=', quotes, anything but printable ASCII) is written as a JSON string."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={_console_value(v)}" for k, v in fields.items())
        time_of_day = self.formatTime(record, "%H:%M:%S")
        message = _console_value(record.getMessage(), spaces=True)
        line = f"{time_of_day} {record.levelname:<7} {message} {extra}"
        if record.exc_info:  # a traceback is the facade's own text; keep it, indented
            trace = self.formatException(record.exc_info).encode("ascii", "backslashreplace")
            line += "\n  " + trace.decode().replace("\n", "\n  ")
        return line


_PLAIN = re.compile(r"[!#-<>-~]*")  # printable ASCII without space, '"' and '='


def _console_value(value: object, *, spaces: bool = False) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text.replace(" ", "") if spaces else text):
        return text
    return json.dumps(text, ensure_ascii=True)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else ConsoleFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; ours are in the RPC line already.
    logging.getLogger("httpx").setLevel(logging.WARNING)
