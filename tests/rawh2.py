"""A raw HTTP/2 client (the pure-Python h2 package over a plain socket) for sending what a normal
gRPC client refuses to: headers without a body, header values with control characters, streams
left idle."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class RawConnection:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        self.sock.sendall(self.conn.data_to_send())
        self.ended: dict[int, dict[str, str]] = {}  # stream id -> trailers (or headers)
        self.headers: dict[int, dict[str, str]] = {}
        self.resets: dict[int, int] = {}  # stream id -> the server's RST_STREAM error code

    def open(
        self,
        path: str,
        metadata: list[tuple[str, str | bytes]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
        end_stream: bool = True,
    ) -> int:
        """Starts a call; ``body`` None sends headers only (and, with end_stream, no message)."""
        stream = self.conn.get_next_available_stream_id()
        headers: list[tuple[str, str | bytes]] = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self.conn.send_headers(stream, headers, end_stream=end_stream and body is None)
        if body is not None:
            self.conn.send_data(stream, body, end_stream=end_stream)
        self.sock.sendall(self.conn.data_to_send())
        return stream

    def pump(self, timeout: float) -> bool:
        """Reads what arrives within ``timeout``; False once the server closed the connection."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        except OSError:
            return False
        if not data:
            return False
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                fields = {_text(k): _text(v) for k, v in event.headers}
                self.headers.setdefault(event.stream_id, {}).update(fields)
            if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended[event.stream_id] = self.headers.get(event.stream_id, {})
            if isinstance(event, h2.events.StreamReset) and event.remote_reset:
                self.resets[event.stream_id] = int(event.error_code)
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        pending = self.conn.data_to_send()
        if pending:
            self.sock.sendall(pending)
        return True

    def status(self, stream: int, timeout: float = 10) -> dict[str, str]:
        """The trailers (grpc-status, grpc-message) the stream ended with."""
        deadline = time.monotonic() + timeout
        while stream not in self.ended:
            if time.monotonic() > deadline or not self.pump(0.2):
                raise AssertionError(f"stream {stream} did not end")
        return self.ended[stream]

    def advertised_streams(self, timeout: float = 5) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS, once its settings have arrived."""
        deadline = time.monotonic() + timeout
        unlimited = self.conn.remote_settings.max_concurrent_streams
        while self.conn.remote_settings.max_concurrent_streams == unlimited:
            if time.monotonic() > deadline or not self.pump(0.05):
                raise AssertionError("no SETTINGS_MAX_CONCURRENT_STREAMS from the server")
        return int(self.conn.remote_settings.max_concurrent_streams)

    def close(self) -> None:
        self.sock.close()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
