"""The aiohttp transport against a raw socket server on loopback, case by case.

What matters is the retry policy's split: a failure is "never sent" (safe to re-send a POST) only
when that is certain. Each case runs through the project's transport and, where the two must
agree, through httpx's default transport too, against the same server.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import socket
import ssl
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from test_caller_auth import Pem, issue

from emulator.harness import free_port
from service.config import Secret, Settings
from service.transport import AiohttpTransport
from service.upstream import new_http_client, transport_failure

SECRET = "s3cret-auth-token"
FORM = {"AddressSid": "IG" + "ab" * 16, "PreEngagementData": '{"q": "Où est ma commande ?"}'}
CREATED = {"conversation_sid": "CH" + "0" * 32, "identity": "guest"}

Behaviour = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """HTTP/1.1 by hand on raw sockets: every connection runs ``behaviour``; requests are kept
    byte for byte as they arrived."""

    def __init__(self, behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> None:
        self.behaviour = behaviour
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self.request_arrived = asyncio.Event()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self.behaviour(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # cancelled by __aexit__; returning keeps 3.11's stream callback from logging it
        finally:
            writer.close()
            self._handlers.discard(handler)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        raw = head + await reader.readexactly(length)
        self.requests.append(raw)
        self.request_arrived.set()
        return raw


def respond(writer: asyncio.StreamWriter, status: int, body: bytes, *headers: str) -> None:
    lines = [f"HTTP/1.1 {status} {'Created' if status == 201 else 'OK'}", *headers]
    lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def answer_201(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    while True:  # keep-alive: one connection, many requests
        await server.read_request(reader)
        respond(writer, 201, json.dumps(CREATED).encode(), "Content-Type: application/json")
        await writer.drain()


TRANSPORTS: dict[str, Callable[..., httpx.AsyncBaseTransport]] = {
    "aiohttp": AiohttpTransport,
    "httpx-default": httpx.AsyncHTTPTransport,
}


def client(
    kind: str,
    base_url: str,
    *,
    max_connections: int = 10,
    verify: ssl.SSLContext | bool = True,
    **timeouts: float,
) -> httpx.AsyncClient:
    """Configured as service.upstream.new_http_client configures it, on the given transport."""
    limits = httpx.Limits(max_connections=max_connections)
    return httpx.AsyncClient(
        base_url=base_url,
        transport=TRANSPORTS[kind](limits=limits, verify=verify),
        auth=httpx.BasicAuth("AC" + "1" * 32, SECRET),
        headers={"User-Agent": "flexwebchat/test"},
        timeout=httpx.Timeout(timeouts.pop("timeout", 5.0), **timeouts),
        follow_redirects=False,
        trust_env=False,
    )


def post(http: httpx.AsyncClient, url: str = "/v2/WebChats") -> Awaitable[httpx.Response]:
    headers = {"Accept": "application/json", "Accept-Charset": "utf-8", "Ui-Version": "1.0.0"}
    return http.post(url, data=FORM, headers=headers)


async def failure(http: httpx.AsyncClient) -> httpx.TransportError:
    with pytest.raises(httpx.TransportError) as caught:
        await post(http)
    assert SECRET not in str(caught.value)
    return caught.value


def never_sent(exc: httpx.TransportError) -> bool:
    """What the retry policy concludes: may this POST be re-sent without risking a duplicate?"""
    return not transport_failure(exc).maybe_processed


@pytest.fixture(params=list(TRANSPORTS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- never sent: safe to re-send -----------------------------------------------------------------


async def test_connection_refused_is_never_sent(kind: str) -> None:
    async with client(kind, f"http://127.0.0.1:{free_port()}") as http:
        exc = await failure(http)
    assert isinstance(exc, httpx.ConnectError)
    assert never_sent(exc)


async def test_dns_failure_is_never_sent(kind: str) -> None:
    async with client(kind, "http://nonexistent.invalid", timeout=30) as http:
        exc = await failure(http)
    assert isinstance(exc, httpx.ConnectError)
    assert never_sent(exc)


@pytest.fixture
def full_backlog() -> Iterator[str]:
    """A listener that never accepts, its accept queue full: new connections hang in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            sock = socket.socket()
            sock.settimeout(0.3)
            fillers.append(sock)
            try:
                sock.connect(address)
            except TimeoutError:
                break  # this one hangs, so will ours
        else:
            pytest.fail("could not fill the accept queue of a backlog-0 listener")
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


async def test_connect_timeout_is_never_sent(kind: str, full_backlog: str) -> None:
    async with client(kind, full_backlog, connect=0.3) as http:
        exc = await failure(http)
    assert isinstance(exc, httpx.ConnectTimeout)
    assert never_sent(exc)


async def test_pool_timeout_is_never_sent_and_nothing_reaches_the_server(kind: str) -> None:
    async def slow(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await server.read_request(reader)
        await asyncio.sleep(0.5)
        respond(writer, 201, json.dumps(CREATED).encode())
        await writer.drain()

    async with RawServer(slow) as server, client(kind, server.url, max_connections=1) as http:
        first = asyncio.create_task(post(http))
        await server.request_arrived.wait()
        http.timeout = httpx.Timeout(5.0, pool=0.1)
        exc = await failure(http)
        assert (await first).status_code == 201
    assert isinstance(exc, httpx.PoolTimeout)
    assert never_sent(exc)
    assert len(server.requests) == 1


# -- may have been sent: re-sending could create a second conversation --------------------------


async def test_reset_before_the_request_is_read_may_have_been_sent(kind: str) -> None:
    # The client cannot know whether the server read anything before the reset.
    async def hang_up(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        reset(writer)

    async with RawServer(hang_up) as server, client(kind, server.url) as http:
        exc = await failure(http)
    assert not never_sent(exc)


@pytest.mark.parametrize("close", [reset, lambda writer: writer.close()], ids=["reset", "close"])
async def test_reset_or_close_after_the_request_was_read_may_have_been_sent(
    kind: str, close: Callable[[asyncio.StreamWriter], None]
) -> None:
    async def read_then_hang_up(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        close(writer)

    async with RawServer(read_then_hang_up) as server, client(kind, server.url) as http:
        exc = await failure(http)
    assert isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)
    assert not never_sent(exc)
    assert len(server.requests) == 1  # read by the server: a re-send would be a duplicate


async def test_read_timeout_may_have_been_sent(kind: str) -> None:
    async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await server.read_request(reader)
        await asyncio.sleep(5)

    async with RawServer(silent) as server, client(kind, server.url, read=0.2) as http:
        exc = await failure(http)
    assert isinstance(exc, httpx.ReadTimeout)
    assert not never_sent(exc)
    assert len(server.requests) == 1


async def test_a_body_the_server_stops_reading_ends_in_a_timeout(kind: str) -> None:
    # Loopback buffers take a few MB; past that the write waits for a reader that never comes.
    async def never_read(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        await asyncio.sleep(30)

    async with (
        RawServer(never_read) as server,
        client(kind, server.url, connect=1, write=0.3, read=0.3) as http,
    ):
        async with asyncio.timeout(20):  # a hang fails the test here, not in the whole run
            with pytest.raises(httpx.TimeoutException) as caught:
                await http.post("/v2/WebChats", content=b"x" * (16 << 20))
    assert isinstance(caught.value, httpx.WriteTimeout | httpx.ReadTimeout)
    assert not never_sent(caught.value)


async def test_reused_connection_closed_after_the_request_was_read_may_have_been_sent(
    kind: str,
) -> None:
    async def once_then_hang_up(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        respond(writer, 201, json.dumps(CREATED).encode(), "Content-Type: application/json")
        await writer.drain()
        await server.read_request(reader)  # the second request, on the same connection

    async with RawServer(once_then_hang_up) as server, client(kind, server.url) as http:
        assert (await post(http)).status_code == 201
        exc = await failure(http)
    assert isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)
    assert not never_sent(exc)
    # Exactly one connection and two requests: the transport did not re-send the POST itself.
    assert (server.connections, len(server.requests)) == (1, 2)


async def test_idle_connection_closed_by_the_server_is_not_reused(kind: str) -> None:
    async def answer_then_close(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        respond(writer, 201, json.dumps(CREATED).encode(), "Content-Type: application/json")
        await writer.drain()

    async with RawServer(answer_then_close) as server, client(kind, server.url) as http:
        assert (await post(http)).status_code == 201
        await asyncio.sleep(0.2)  # the server's close arrives while the connection is idle
        assert (await post(http)).status_code == 201
    assert (server.connections, len(server.requests)) == (2, 2)


async def test_a_cancelled_request_gives_its_connection_back(kind: str) -> None:
    # The facade cancels the attempt in flight when the caller's deadline passes.
    async def first_silent(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if server.connections == 1:
            await server.read_request(reader)
            await asyncio.sleep(5)
        await answer_201(server, reader, writer)

    async with (
        RawServer(first_silent) as server,
        client(kind, server.url, max_connections=1, pool=0.5) as http,
    ):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await post(http)
        assert (await post(http)).status_code == 201


# -- the wire: the same bytes out, the same response in -----------------------------------------


async def exchange(server: RawServer, kind: str) -> tuple[bytes, httpx.Response]:
    async with client(kind, server.url) as http:
        response = await post(http)
    return server.requests[-1], response


async def test_created_201_with_json() -> None:
    async with RawServer(answer_201) as server:
        request, response = await exchange(server, "aiohttp")
    assert response.status_code == 201
    assert response.json() == CREATED
    assert request.startswith(b"POST /v2/WebChats HTTP/1.1\r\n")
    credentials = base64.b64encode(f"{'AC' + '1' * 32}:{SECRET}".encode()).decode()
    assert f"Authorization: Basic {credentials}\r\n".encode() in request
    assert request.endswith(httpx.QueryParams(FORM).__str__().encode())


async def test_same_bytes_on_the_wire_and_same_response_as_httpx_default() -> None:
    body = gzip.compress(json.dumps(CREATED).encode())

    async def detailed(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        await server.read_request(reader)
        respond(
            writer,
            201,
            body,
            "Content-Type: application/json; charset=utf-8",
            "Content-Encoding: gzip",
            "X-Twilio-Request-Id: RQ0123",
            "x-dup: one",
            "X-Dup: two",
            "Twilio-Concurrent-Requests: 1",
        )
        await writer.drain()

    async with RawServer(detailed) as server:  # the same server, so the same Host header
        ours_request, ours = await exchange(server, "aiohttp")
        reference_request, reference = await exchange(server, "httpx-default")
    assert ours_request == reference_request
    assert ours.status_code == reference.status_code == 201
    assert ours.headers.raw == reference.headers.raw
    assert ours.headers.get_list("x-dup") == ["one", "two"]
    assert ours.json() == reference.json() == CREATED
    assert ours.reason_phrase == reference.reason_phrase == "Created"
    assert ours.http_version == reference.http_version == "HTTP/1.1"


async def test_the_facade_client_keeps_no_cookies() -> None:
    async def with_cookie(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        while True:
            await server.read_request(reader)
            respond(writer, 201, json.dumps(CREATED).encode(), "Set-Cookie: session=abc; Path=/")
            await writer.drain()

    async with RawServer(with_cookie) as server:
        config = Settings(username="AC" + "1" * 32, password=Secret(SECRET), base_url=server.url)
        async with new_http_client(config) as http:
            for _ in range(2):
                assert (await post(http, f"{server.url}/v2/WebChats")).status_code == 201
            assert not http.cookies
    assert all(b"\r\ncookie:" not in raw.lower() for raw in server.requests)
    assert len(server.requests) == 2


async def test_the_facade_client_holds_at_most_flex_max_connections_requests_at_once() -> None:
    in_flight, most = 0, 0

    async def slow(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        nonlocal in_flight, most
        while True:
            await server.read_request(reader)
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.1)
            in_flight -= 1
            respond(writer, 201, json.dumps(CREATED).encode())
            await writer.drain()

    async with RawServer(slow) as server:
        env = {
            "TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
            "TWILIO_AUTH_TOKEN": SECRET,
            "FLEX_API_BASE_URL": server.url,
            "FLEX_MAX_CONNECTIONS": "3",
        }
        async with new_http_client(Settings.from_env(env)) as http:
            url = f"{server.url}/v2/WebChats"
            replies = await asyncio.gather(*[post(http, url) for _ in range(8)])
    assert [reply.status_code for reply in replies] == [201] * 8  # the others waited their turn
    assert most == 3
    assert server.connections == 3


# -- TLS: a failed handshake happens before any byte of the request --------------------------------


@pytest.fixture(scope="module")
def server_tls() -> tuple[ssl.SSLContext, Pem]:
    ca = issue("transport-test-ca", ca=True)
    server = issue("localhost", ca, server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(server.cert)
        key.write_bytes(server.key)
        context.load_cert_chain(cert, key)
    return context, ca


async def test_tls_with_a_trusted_certificate(kind: str, server_tls) -> None:
    context, ca = server_tls
    trusting = ssl.create_default_context(cadata=ca.cert.decode())
    async with RawServer(answer_201, tls=context) as server:
        async with client(kind, server.url, verify=trusting) as http:
            response = await post(http)
    assert response.status_code == 201
    assert response.json() == CREATED


async def test_tls_with_an_untrusted_certificate_is_never_sent(kind: str, server_tls) -> None:
    context, _ = server_tls
    async with RawServer(answer_201, tls=context) as server:
        async with client(kind, server.url) as http:  # verified against the public CAs
            exc = await failure(http)
    assert isinstance(exc, httpx.ConnectError)
    assert never_sent(exc)
    assert server.requests == []
