"""Optional OpenTelemetry tracing, on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; it needs the ``otel`` extra
(``pip install 'flexwebchat[otel]'``). The standard ``OTEL_*`` variables configure the exporter.

Each RPC gets a server span that continues the caller's W3C ``traceparent`` from gRPC metadata;
each upstream attempt a client span under it. Trace context is never sent to Twilio, so the
upstream request stays exactly what twilio-python sends. Off, every call here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from .config import ConfigError

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_tracer: Any = None  # an opentelemetry Tracer once configured


def configure() -> Callable[[], None] | None:
    """Starts exporting spans when an OTLP endpoint is configured; returns the shutdown (flush)."""
    global _tracer
    if not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
            "pip install 'flexwebchat[otel]'"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": "flexwebchat"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = provider.get_tracer("flexwebchat")
    return provider.shutdown


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def rpc_span(method: str, metadata: dict[str, str]) -> Iterator[Any]:
    """A server span for one RPC, child of the caller's traceparent when it sent one."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    attributes = {"rpc.system": "grpc", "rpc.service": "flexwebchat.v1.WebChatService"}
    with _tracer.start_as_current_span(
        f"flexwebchat.v1.WebChatService/{method}",
        context=extract(metadata),
        kind=SpanKind.SERVER,
        attributes={**attributes, "rpc.method": method},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def attempt_span(attempt: int, method: str, route: str) -> contextlib.AbstractContextManager[Any]:
    """A client span for one upstream attempt, named ``METHOD route`` (the path with its SIDs as
    placeholders); no context is injected into the request. Tracing off: a shared no-op."""
    return _NO_SPAN if _tracer is None else _attempt_span(attempt, method, route)


@contextlib.contextmanager
def _attempt_span(attempt: int, method: str, route: str) -> Iterator[Any]:
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    with _tracer.start_as_current_span(
        f"{method} {route}",
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": method,
            "url.template": route,
            "flexwebchat.attempt": attempt,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def trace_id(span: Any) -> str:
    """The span's trace id as 32 hex digits, for the RPC's log line."""
    context = span.get_span_context() if span is not None else None
    return f"{context.trace_id:032x}" if context is not None and context.is_valid else ""


def finish(span: Any, attributes: dict[str, Any], error: str = "") -> None:
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes({k: v for k, v in attributes.items() if v not in (None, "")})
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
