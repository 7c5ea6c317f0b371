"""Optional OpenTelemetry tracing, exported over OTLP/HTTP to a collector stand-in on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ADDRESS_SID, EmulatorProcess
from flexwebchat.v1 import webchat_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from emulator.harness import guest_env

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), CollectorHandler)
        self.spans: list = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class CollectorHandler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.server.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_rpc_and_attempt_spans_continue_the_callers_trace(
    make_facade, upstream: EmulatorProcess, collector: Collector
) -> None:
    facade = make_facade(
        upstream.url, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY="100"
    )
    upstream.fault({"status": 503, "retry_after": "0"})
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    facade.stub.CreateWebChat(
        webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID),
        metadata=[("traceparent", traceparent)],
        timeout=10,
    )
    assert facade.stop() == 0  # flushes the spans

    spans = {span.name: span for span in collector.spans if span.name.startswith("flexwebchat")}
    attempts = [span for span in collector.spans if span.name == "POST /v2/WebChats"]
    [rpc] = spans.values()
    assert rpc.name == "flexwebchat.v1.WebChatService/CreateWebChat"
    assert rpc.trace_id.hex() == TRACE_ID and rpc.parent_span_id.hex() == PARENT_SPAN_ID
    assert len(attempts) == 2
    assert all(a.trace_id.hex() == TRACE_ID and a.parent_span_id == rpc.span_id for a in attempts)
    codes = sorted(
        attr.value.int_value
        for a in attempts
        for attr in a.attributes
        if attr.key == "http.response.status_code"
    )
    assert codes == [201, 503]
    # The trace id is in the RPC's log line; no trace context went to Twilio.
    assert facade.rpc_lines()[0]["trace_id"] == TRACE_ID
    assert all("traceparent" not in {k.lower() for k in r["headers"]} for r in upstream.requests())


def test_each_upstream_attempt_span_names_its_own_request(
    make_facade, upstream: EmulatorProcess, collector: Collector
) -> None:
    """A create with a first message traces two Twilio requests, each under its own route
    (SIDs as placeholders, so span names stay few), not both as the create."""
    facade = make_facade(
        upstream.url,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
        **guest_env(upstream.url),
    )
    assert facade.create(initial_message="Hello").initial_message_sid
    assert facade.stop() == 0  # flushes the spans

    clients = sorted(span.name for span in collector.spans if span.kind == Span.SPAN_KIND_CLIENT)
    assert clients == ["POST /v1/Conversations/{ConversationSid}/Messages", "POST /v2/WebChats"]


def test_tracing_is_off_without_an_endpoint(facade, upstream: EmulatorProcess) -> None:
    facade.create()
    assert facade.log_lines()[0]["tracing"] is False
