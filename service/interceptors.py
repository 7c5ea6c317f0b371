"""The one place where exceptions become gRPC statuses, and where each RPC is admitted, logged
and counted.

Deny by default: every method is authenticated (when caller auth is on) and counted against
``GRPC_MAX_CONCURRENT_RPCS``, whatever its service or handler kind, except the services in
``PUBLIC_SERVICES`` (health, reflection), which need no token and whose streams share a small cap
of their own. The limit is enforced here, after authentication, rather than by gRPC's
``maximum_concurrent_rpcs`` (which counts unauthenticated streams too, before anything can log
them), so that every refusal the server makes is logged and counted like any other outcome.

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status

from . import observability as obs
from . import tracing
from .auth import ANONYMOUS, CallerTokens
from .connections import UnauthenticatedConnections
from .errors import (
    DeadlineExceeded,
    FacadeError,
    InvalidRequest,
    ServerLimit,
    Unauthenticated,
    retry_delay_ms,
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


class RpcObserver(grpc.aio.ServerInterceptor):
    """Authenticates, admits, logs and counts every call; see the module docstring.

    With ``tokens``, every call must carry a known bearer token, whose name is the caller; else
    the caller is the client certificate's common name under mutual TLS (which must be in
    ``client_names`` when that is not empty), or "anonymous".
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
        self._slots = Slots(self._limits.max_concurrent_rpcs)
        self._public = Slots(self._limits.max_public_streams)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, short = details.method.lstrip("/").rpartition("/")
        if service in PUBLIC_SERVICES:
            if handler.unary_unary is not None:  # Health/Check: one short answer
                return handler
            return _wrap(handler, lambda context: self._call(short, context, public=True))
        return _wrap(handler, lambda context: self._call(short, context, public=False), self)

    async def read_request(self, requests: AsyncIterator[bytes], decode: Any) -> Any:
        """The one request message, decoded; raises a FacadeError when it cannot be had."""
        timeout = self._limits.message_timeout
        try:
            async with asyncio.timeout(timeout):
                raw = await anext(requests)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request message did not arrive within {timeout:g}s"
            ) from None
        except StopAsyncIteration:
            # gRPC ends the stream without a message both when the message was over the size
            # limit (it has then answered RESOURCE_EXHAUSTED itself) and when none was sent.
            raise ServerLimit(
                "MESSAGE_REFUSED",
                f"no request message of at most {self._limits.max_message_bytes} bytes arrived",
            ) from None
        try:
            return decode(raw) if decode is not None else raw
        except DecodeError:
            descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
            raise InvalidRequest(wire_problems(raw, descriptor)) from None

    @contextlib.asynccontextmanager
    async def _call(self, short: str, context: Context, *, public: bool) -> AsyncIterator[None]:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        with tracing.rpc_span(short, metadata) as span:
            caller_trace = trace_id(metadata) or tracing.trace_id(span)
            record = obs.RpcRecord(method=short, trace_id=caller_trace)
            obs.begin_rpc(record)
            slots = self._public if public else self._slots
            admitted = False
            held = None  # the connection's mark while an authenticated call runs
            code, message = "OK", ""
            try:
                if not public:
                    record.caller = self._caller(metadata, context)
                    if self._connections is not None:
                        held = self._connections.call_started(context.peer(), record.caller)
                if not slots.take():
                    raise ServerLimit(
                        "CONCURRENCY_LIMIT",
                        f"this replica is handling its maximum of {slots.limit} concurrent "
                        f"{'health and reflection streams' if public else 'calls'}; retry shortly",
                        retry_after=1.0,
                    )
                admitted = True
                if not public:
                    obs.RPCS_IN_FLIGHT.inc()
                yield
            except FacadeError as exc:
                status = to_status(exc)
                code, message = CODE_NAMES.get(status.code, "UNKNOWN"), str(exc)
                await context.abort_with_status(_grpc_status(status))
            except asyncio.CancelledError:
                code, message = "CANCELLED", "the caller cancelled or its deadline passed"
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):  # the behaviour aborted by itself
                    code, message = _aborted(context)
                    raise
                log.exception("unexpected error", extra={"fields": {"method": short}})
                status = to_status(exc)
                code, message = "INTERNAL", status.message
                await context.abort_with_status(_grpc_status(status))
            finally:
                UnauthenticatedConnections.call_ended(held)
                if admitted:
                    slots.give()
                    if not public:
                        obs.RPCS_IN_FLIGHT.dec()
                # Public calls are logged only when refused: probes would flood the log.
                if not public or not admitted:
                    self._finish(record, code, message, span)

    def _caller(self, metadata: dict[str, str], context: Context) -> str:
        if self._tokens is not None:
            return self._tokens.caller(metadata)
        certificate = context.auth_context()
        names = list(certificate.get("x509_common_name") or [])
        name = names[0].decode(errors="backslashreplace") if names else ""
        if self._client_names and name not in self._client_names:
            raise Unauthenticated("the client certificate's name is not allowed")
        if certificate.get("x509_pem_cert") and name.lower() in ("", ANONYMOUS):
            # Would share the records of unauthenticated callers (webchat.record_key).
            raise Unauthenticated(
                f"the client certificate needs a common name other than {ANONYMOUS!r}: "
                "it names the caller"
            )
        return name or ANONYMOUS

    @staticmethod
    def _finish(record: obs.RpcRecord, code: str, message: str, span: Any) -> None:
        obs.RPCS.labels(method=record.method, code=code, caller=record.caller).inc()
        obs.RPC_LATENCY.labels(method=record.method).observe(time.monotonic() - record.started)
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

    async def first(requests: Any) -> Any:
        assert reader is not None
        return await reader.read_request(requests, decode)

    if handler.unary_unary is not None:
        unary_unary = cast(Any, handler.unary_unary)

        async def unary_in_unary_out(requests: Any, context: Context) -> Any:
            async with guard(context):
                request = await first(requests) if reader else requests
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
                request = await first(requests) if reader else requests
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
    """The status with its details trailer and ``grpc-retry-pushback-ms``, which steers gRPC's
    own client retries (the shipped service config): the RetryInfo delay when there is one, else
    -1, which tells gRPC not to retry (an ambiguous failure without a request_id is UNAVAILABLE,
    yet a retry could create a second conversation)."""
    rich = rpc_status.to_status(status)
    delay_ms = retry_delay_ms(status)
    pushback = (("grpc-retry-pushback-ms", str(-1 if delay_ms is None else delay_ms)),)
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
