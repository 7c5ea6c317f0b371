"""The one place where exceptions become gRPC statuses, and where each RPC is admitted, logged
and counted.

Deny by default: every method is authenticated (when caller auth is on) and counted against
``GRPC_MAX_CONCURRENT_RPCS`` and, with caller auth on, against its caller's own share of it
(``GRPC_MAX_CONCURRENT_RPCS_PER_CALLER``), whatever its service or handler kind, except the
services in ``PUBLIC_SERVICES`` (health, reflection), which need no token and whose streams share
a small cap of their own. The limit is enforced here, after authentication, rather than by gRPC's
``maximum_concurrent_rpcs`` (which counts unauthenticated streams too, before anything can log
them), so that every refusal the server makes is logged and counted like any other outcome.
A caller's share is taken as soon as the caller is known, before its request message arrives, so
calls that never send one count too: no caller can hold another's slots.

Requests with one message are read here, as raw bytes, rather than by gRPC: a request whose
message never arrives is timed out, and one that is not a valid protobuf message is an
INVALID_ARGUMENT like any other bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status

from . import observability as obs
from . import tracing
from .auth import ANONYMOUS, CallerTokens, is_reserved
from .connections import UnauthenticatedConnections
from .errors import (
    CallerConcurrencyExceeded,
    DeadlineExceeded,
    Draining,
    FacadeError,
    InvalidRequest,
    ServerLimit,
    Unauthenticated,
    pushback_ms,
    to_status,
)
from .validation import wire_problems

log = logging.getLogger("flexwebchat.rpc")

PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
TRACE_HEADERS = ("x-request-id", "x-trace-id")
# What a caller may put in the logs as its trace id: a plain token, or a W3C traceparent.
TRACE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

# Generic only in the typing stubs, so quoted.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass(frozen=True)
class Limits:
    max_concurrent_rpcs: int = 256
    max_concurrent_rpcs_per_caller: int | None = None  # None: one caller, no shares
    max_public_streams: int = 16  # health Watch + reflection streams, unauthenticated
    message_timeout: float = 10.0  # seconds for a request's message to arrive
    max_message_bytes: int = 64 * 1024


class Slots:
    """A count of calls in progress against a limit; refusing is the caller's job."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


class CallerSlots:
    """Each caller's calls in progress against the same limit for every caller."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used: dict[str, int] = {}

    def take(self, caller: str) -> bool:
        used = self.used.get(caller, 0)
        if used >= self.limit:
            return False
        self.used[caller] = used + 1
        return True

    def give(self, caller: str) -> None:
        left = self.used[caller] - 1
        if left:
            self.used[caller] = left
        else:
            del self.used[caller]  # callers come and go: keep only those with calls


class RpcObserver(grpc.aio.ServerInterceptor):
    """Authenticates, admits, logs and counts every call; see the module docstring.

    Under mutual TLS with ``client_names``, the client certificate's common name must be one of
    them. With ``tokens``, every call must also carry a known bearer token, whose name is the
    caller; else the caller is the certificate's common name, or "anonymous".
    """

    def __init__(
        self,
        tokens: CallerTokens | None = None,
        limits: Limits | None = None,
        client_names: frozenset[str] = frozenset(),
        connections: UnauthenticatedConnections | None = None,
    ) -> None:
        self._tokens = tokens
        self._limits = limits or Limits()
        self._client_names = client_names
        self._connections = connections  # told of each authenticated call's connection
        self.slots = Slots(self._limits.max_concurrent_rpcs)
        self.public_slots = Slots(self._limits.max_public_streams)
        per_caller = self._limits.max_concurrent_rpcs_per_caller
        self.caller_slots = CallerSlots(per_caller) if per_caller is not None else None
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}
        # Set once the server stops: gRPC then ends a stream still waiting for its message as
        # if the client had sent none, and the call is logged as cut by the shutdown instead.
        self.stopping = False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        # gRPC resolves the same handler object for a method on every call: wrap it once.
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(details.method, handler)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        service, _, short = method.lstrip("/").rpartition("/")
        if service in PUBLIC_SERVICES:
            if handler.unary_unary is not None:  # Health/Check: one short answer
                return handler
            return _wrap(handler, lambda context: _Call(self, short, context, public=True))
        return _wrap(handler, lambda context: _Call(self, short, context, public=False), self)

    async def read_request(self, context: Context, decode: Any) -> Any:
        """The one request message, decoded; raises a FacadeError when it cannot be had."""
        timeout = self._limits.message_timeout
        try:
            # context.read() rather than the request iterator: the same read without the
            # async generator gRPC wraps around it.
            async with asyncio.timeout(timeout):
                raw = await context.read()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request message did not arrive within {timeout:g}s"
            ) from None
        if raw is grpc.aio.EOF:
            if self.stopping:
                raise Draining()
            # gRPC ends the stream without a message both when the message was over the size
            # limit (it has then answered RESOURCE_EXHAUSTED itself) and when none was sent.
            raise ServerLimit(
                "MESSAGE_REFUSED",
                f"no request message of at most {self._limits.max_message_bytes} bytes arrived",
            )
        try:
            return decode(raw) if decode is not None else raw
        except DecodeError:
            descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
            raise InvalidRequest(wire_problems(raw, descriptor)) from None

    def call_started(self, context: Context, caller: str) -> Any:
        """Tells the connection watch that an authenticated call runs on this connection; the
        mark returned goes back to ``UnauthenticatedConnections.call_ended`` when it ends."""
        if self._connections is None:
            return None
        return self._connections.call_started(context.peer(), caller)

    def caller(self, metadata: dict[str, str], context: Context) -> str:
        certificate = context.auth_context()
        names = list(certificate.get("x509_common_name") or [])
        name = names[0].decode(errors="backslashreplace") if names else ""
        # Checked first, with or without tokens: both must hold, so a stolen token is no use
        # from a machine whose certificate is not among the names.
        if self._client_names and name not in self._client_names:
            raise Unauthenticated("the client certificate's name is not allowed")
        if self._tokens is not None:
            return self._tokens.caller(metadata)
        if certificate.get("x509_pem_cert") and (not name or is_reserved(name)):
            # Would share the records of unauthenticated callers (webchat.record_key).
            raise Unauthenticated(
                f"the client certificate needs a common name other than {ANONYMOUS!r}: "
                "it names the caller"
            )
        return name or ANONYMOUS


class _Call:
    """One call admitted, logged and counted around its behaviour (see RpcObserver): an async
    context manager written out, as contextlib's generator-based one costs more on every call."""

    __slots__ = (
        "_admitted",
        "_context",
        "_held",
        "_method",
        "_observer",
        "_public",
        "_record",
        "_scope",
        "_share",
        "_slots",
        "_span",
    )

    def __init__(self, observer: RpcObserver, method: str, context: Context, *, public: bool):
        self._observer, self._method, self._context = observer, method, context
        self._public = public
        self._slots = observer.public_slots if public else observer.slots
        self._admitted = False
        self._held: Any = None  # the connection's mark while an authenticated call runs
        self._share: str | None = None  # the caller whose share this call holds

    async def __aenter__(self) -> None:
        context = self._context
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self._scope = tracing.rpc_span(self._method, metadata) if tracing.enabled() else None
        self._span = self._scope.__enter__() if self._scope is not None else None
        caller_trace = trace_id(metadata) or tracing.trace_id(self._span)
        self._record = obs.RpcRecord(method=self._method, trace_id=caller_trace)
        obs.begin_rpc(self._record)
        slots = self._slots
        try:
            if not self._public:
                caller = self._record.caller = self._observer.caller(metadata, context)
                self._held = self._observer.call_started(context, caller)
                shares = self._observer.caller_slots
                if shares is not None:
                    if not shares.take(caller):
                        raise CallerConcurrencyExceeded(caller, shares.limit)
                    self._share = caller
            if not slots.take():
                raise ServerLimit(
                    "CONCURRENCY_LIMIT",
                    f"this replica is handling its maximum of {slots.limit} concurrent "
                    f"{'health and reflection streams' if self._public else 'calls'}; "
                    "retry shortly",
                    retry_after=1.0,
                )
        except BaseException as exc:
            await self._failed(exc)
            raise
        self._admitted = True
        if not self._public:
            obs.RPCS_IN_FLIGHT.inc()

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self._end("OK", "")
        else:
            await self._failed(exc)  # re-raised by ``async with``, or replaced by an abort

    async def _failed(self, exc: BaseException) -> None:
        """The outcome of ``exc``, given to the caller (an abort) and then logged and counted."""
        context = self._context
        code, message = "OK", ""
        try:
            if isinstance(exc, FacadeError):
                status = to_status(exc)
                code, message = CODE_NAMES.get(status.code, "UNKNOWN"), str(exc)
                await context.abort_with_status(_grpc_status(status))
            elif isinstance(exc, asyncio.CancelledError) and self._observer.stopping:
                # Cut by a stop at once (a second signal): the caller sees UNAVAILABLE, and
                # the call counts as the server's failure, not the caller's choice.
                code, message = "UNAVAILABLE", "cut by the server stopping at once"
            elif isinstance(exc, asyncio.CancelledError):
                code, message = "CANCELLED", "the caller cancelled or its deadline passed"
            elif isinstance(exc, grpc.aio.AbortError):  # the behaviour aborted by itself
                code, message = _aborted(context)
            elif isinstance(exc, Exception):
                log.exception(
                    "unexpected error", exc_info=exc, extra={"fields": {"method": self._method}}
                )
                status = to_status(exc)
                code, message = "INTERNAL", status.message
                await context.abort_with_status(_grpc_status(status))
        finally:
            self._end(code, message)

    def _end(self, code: str, message: str) -> None:
        UnauthenticatedConnections.call_ended(self._held)
        if self._share is not None:
            self._observer.caller_slots.give(self._share)  # type: ignore[union-attr]
        if self._admitted:
            self._slots.give()
            if not self._public:
                obs.RPCS_IN_FLIGHT.dec()
        # Public calls are logged only when refused: probes would flood the log.
        if not self._public or not self._admitted:
            _finish(self._record, code, message, self._span)
        if self._scope is not None:
            self._scope.__exit__(None, None, None)


def _finish(record: obs.RpcRecord, code: str, message: str, span: Any) -> None:
    obs.count_rpc(record, code)
    obs.log_rpc(record, code, message)
    if span is not None:  # tracing on: skip building attributes otherwise
        tracing.finish(
            span,
            {
                "rpc.grpc.status_code": grpc.StatusCode[code].value[0],
                "flexwebchat.caller": record.caller,
                "flexwebchat.request_id": record.request_id,
                "flexwebchat.conversation_sid": record.conversation_sid,
            },
            error=message,
        )


Guard: TypeAlias = "Callable[[Context], contextlib.AbstractAsyncContextManager[None]]"


def _wrap(handler: Handler, guard: Guard, reader: RpcObserver | None = None) -> Handler:
    """The same method, of any handler kind, run inside ``guard``. With ``reader``, a request of
    one message is read (and timed out, and decoded) by the reader instead of by gRPC."""
    decode, encode = handler.request_deserializer, handler.response_serializer

    async def first(context: Context) -> Any:
        assert reader is not None
        return await reader.read_request(context, decode)

    if handler.unary_unary is not None:
        unary_unary = cast(Any, handler.unary_unary)

        async def unary_in_unary_out(requests: Any, context: Context) -> Any:
            async with guard(context):
                request = await first(context) if reader else requests
                return await unary_unary(request, context)

        if reader is None:
            return grpc.unary_unary_rpc_method_handler(
                unary_in_unary_out, request_deserializer=decode, response_serializer=encode
            )
        return grpc.stream_unary_rpc_method_handler(
            unary_in_unary_out, request_deserializer=None, response_serializer=encode
        )
    if handler.unary_stream is not None:
        unary_stream = cast(Any, handler.unary_stream)

        async def unary_in_stream_out(requests: Any, context: Context) -> AsyncIterator[Any]:
            async with guard(context):
                request = await first(context) if reader else requests
                async for response in _responses(unary_stream(request, context)):
                    yield response

        if reader is None:
            return grpc.unary_stream_rpc_method_handler(
                unary_in_stream_out, request_deserializer=decode, response_serializer=encode
            )
        return grpc.stream_stream_rpc_method_handler(
            unary_in_stream_out, request_deserializer=None, response_serializer=encode
        )
    if handler.stream_unary is not None:
        stream_unary = cast(Any, handler.stream_unary)

        async def stream_in_unary_out(requests: Any, context: Context) -> Any:
            async with guard(context):
                return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_in_unary_out, request_deserializer=decode, response_serializer=encode
        )
    stream_stream = cast(Any, handler.stream_stream)

    async def stream_in_stream_out(requests: Any, context: Context) -> AsyncIterator[Any]:
        async with guard(context):
            async for response in _responses(stream_stream(requests, context)):
                yield response

    return grpc.stream_stream_rpc_method_handler(
        stream_in_stream_out, request_deserializer=decode, response_serializer=encode
    )


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming behaviour's responses: it may be an async generator, or a coroutine that
    writes them with ``context.write`` itself."""
    if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def _grpc_status(status: status_pb2.Status) -> grpc.Status:
    """The status with its details trailer and, for the codes gRPC's own client retries would
    re-send, ``grpc-retry-pushback-ms`` (see :func:`pushback_ms`)."""
    rich = rpc_status.to_status(status)
    delay_ms = pushback_ms(status)
    pushback = () if delay_ms is None else (("grpc-retry-pushback-ms", str(delay_ms)),)
    return _Status(rich.code, rich.details, tuple(rich.trailing_metadata) + pushback)


def _aborted(context: Context) -> tuple[str, str]:
    code = context.code()
    name = code.name if isinstance(code, grpc.StatusCode) else CODE_NAMES.get(code or 2, "UNKNOWN")
    return name, str(context.details() or "")


def trace_id(metadata: dict[str, str]) -> str:
    """The caller's trace id, when it has the strict shape of one; anything else is ignored, so
    that a caller cannot write arbitrary text into the logs."""
    for name in TRACE_HEADERS:
        value = metadata.get(name, "")
        if TRACE_ID.fullmatch(value):
            return value
    parent = TRACEPARENT.fullmatch(metadata.get("traceparent", ""))
    return parent.group(1) if parent else ""
