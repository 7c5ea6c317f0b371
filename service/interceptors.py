"""The one place where exceptions become gRPC statuses, and where each RPC is logged and counted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from grpc_status import rpc_status

from service import observability as obs
from service import tracing
from service.auth import CallerTokens
from service.errors import FacadeError, to_status

log = logging.getLogger("flexwebchat.rpc")

SERVICE_PREFIX = "/flexwebchat.v1."
TRACE_HEADERS = ("x-request-id", "x-trace-id", "traceparent")
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

# Generic only in the typing stubs, so quoted.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behavior: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class RpcObserver(grpc.aio.ServerInterceptor):
    """Wraps the facade's unary methods; health and reflection pass through untouched.

    With ``tokens``, every call must carry a known bearer token, whose name is the caller; else
    the caller is the client certificate's common name under mutual TLS, or "anonymous".
    """

    def __init__(self, tokens: CallerTokens | None = None) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        if handler.unary_unary is None:  # pragma: no cover - the API has only unary methods
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._observe(details.method, cast(Behavior, handler.unary_unary)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _observe(self, method: str, behavior: Behavior) -> Behavior:
        short = method.rsplit("/", 1)[-1]

        async def observed(request: Any, context: Context) -> Any:
            metadata = {
                k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
            }
            with tracing.rpc_span(short, metadata) as span:
                return await self._run(short, behavior, request, context, metadata, span)

        return observed

    async def _run(
        self,
        short: str,
        behavior: Behavior,
        request: Any,
        context: Context,
        metadata: dict[str, str],
        span: Any,
    ) -> Any:
        record = obs.RpcRecord(method=short, trace_id=_trace_id(metadata) or tracing.trace_id(span))
        obs.begin_rpc(record)
        obs.RPCS_IN_FLIGHT.inc()
        code, message = "OK", ""
        try:
            if self._tokens is not None:
                record.caller = self._tokens.caller(metadata)
            else:
                record.caller = _certificate_name(context) or record.caller
            return await behavior(request, context)
        except FacadeError as exc:
            status = to_status(exc)
            code, message = CODE_NAMES.get(status.code, "UNKNOWN"), status.message
            await context.abort_with_status(rpc_status.to_status(status))
        except asyncio.CancelledError:
            code, message = "CANCELLED", "the caller cancelled or its deadline passed"
            raise
        except Exception as exc:
            log.exception("unexpected error", extra={"fields": {"method": short}})
            status = to_status(exc)
            code, message = "INTERNAL", status.message
            await context.abort_with_status(rpc_status.to_status(status))
        finally:
            obs.RPCS_IN_FLIGHT.dec()
            obs.RPCS.labels(method=short, code=code, caller=record.caller).inc()
            obs.RPC_LATENCY.labels(method=short).observe(time.monotonic() - record.started)
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
        raise AssertionError("unreachable: abort_with_status raises")


def _certificate_name(context: Context) -> str:
    names = list(context.auth_context().get("x509_common_name") or [])
    return names[0].decode(errors="replace") if names else ""


def _trace_id(metadata: dict[str, str]) -> str:
    for name in TRACE_HEADERS:
        value = metadata.get(name, "")
        if name == "traceparent":  # version-traceid-spanid-flags: the trace id is what ties logs
            parts = value.split("-")
            value = parts[1] if len(parts) == 4 else value
        if value:
            return value[:128]
    return ""
