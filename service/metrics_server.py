"""The Prometheus ``/metrics`` endpoint, served by a few threads with a timeout per connection.

prometheus_client's own server starts a thread per connection and never times one out, so idle
connections pile up threads without bound. Here at most ``WORKERS`` threads serve, a connection
that says nothing for ``TIMEOUT_SECONDS`` is closed, and connections beyond ``WORKERS +
BACKLOG`` at once are closed unanswered (a scraper retries at its next interval).
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

WORKERS = 4
BACKLOG = 4
TIMEOUT_SECONDS = 5.0


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT_SECONDS  # applied to the socket by StreamRequestHandler.setup

    def log_message(self, format: str, *args: Any) -> None:
        return None  # the RPC log is the log; scrapes are not news


class MetricsServer(WSGIServer):
    address_family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET

    def __init__(self, port: int) -> None:
        host = "::" if self.address_family == socket.AF_INET6 else "0.0.0.0"
        super().__init__((host, port), _Handler)
        self.set_app(make_wsgi_app())
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="metrics")
        self._admitted = threading.BoundedSemaphore(WORKERS + BACKLOG)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._admitted.acquire(blocking=False):
            self.shutdown_request(request)
            return
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._admitted.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that timed out or went away; nothing to report

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def start_metrics_server(port: int) -> MetricsServer:
    """Serves /metrics on ``port`` (all interfaces) from a daemon thread; OSError if taken."""
    server = MetricsServer(port)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
