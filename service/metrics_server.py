"""The Prometheus ``/metrics`` endpoint: one small HTTP server on an event loop of its own thread.

Every connection gets ``DEADLINE_SECONDS`` from its accept to send its request and receive the
answer, whatever it does meanwhile, so clients that trickle a byte now and then cannot hold the
server (a timeout per read would restart with each byte). Waiting connections cost a socket
each, no thread; past ``MAX_CONNECTIONS`` at once the oldest is closed, so a new scrape, which
sends its request at once and is answered in milliseconds, always gets in. One request per
connection (``Connection: close``), as Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

DEADLINE_SECONDS = 5.0
MAX_CONNECTIONS = 64
MAX_HEAD_BYTES = 8192


class MetricsServer:
    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    def start(self) -> None:
        """Listens, or raises the OSError that prevented it."""
        started: Future[None] = Future()
        self._thread.start()
        self._loop.call_soon_threadsafe(self._loop.create_task, self._listen(started))
        started.result()

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._open:
            writer.transport.abort()
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _listen(self, started: Future[None]) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=MAX_HEAD_BYTES
            )
        except OSError as exc:
            started.set_exception(exc)
            self._loop.stop()
            return
        started.set_result(None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open[writer] = None
        if len(self._open) > MAX_CONNECTIONS:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()
        try:
            # The whole exchange, closing included: closing waits for the answer to be read.
            async with asyncio.timeout(DEADLINE_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(_answer(head))
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # too slow, gone, or not HTTP: nothing to report
        finally:
            self._open.pop(writer, None)
            writer.transport.abort()


def _answer(head: bytes) -> bytes:
    """The whole HTTP response to a request head: the metrics for any GET or HEAD."""
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method = request_line.split(" ", 1)[0]
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    body = encoder(REGISTRY)
    return _response("200 OK", content_type, b"" if method == "HEAD" else body, len(body))


def _response(status: str, content_type: str, body: bytes, length: int | None = None) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def start_metrics_server(host: str, port: int) -> MetricsServer:
    """Serves /metrics on ``host`` (brackets allowed; ``::`` means every interface) and ``port``
    from a daemon thread; OSError when it cannot listen there."""
    host = host.strip("[]")
    server = MetricsServer("" if host in ("::", "") else host, port)
    server.start()
    return server
