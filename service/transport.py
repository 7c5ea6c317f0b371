"""An httpx transport over aiohttp: httpx stays the client API, aiohttp moves the bytes.

Why: a form POST through httpx on this transport with ``CookielessClient`` costs about half the
CPU of httpx on its default transport (httpcore), and about twice that of aiohttp alone (make
bench: 0.33, 0.64 and 0.15 ms on a quiet 2-core machine). The PyPI package httpx-aiohttp was
refused because it maps aiohttp's ServerDisconnectedError (the server closed after the request
was sent) to ConnectTimeout, which the retry policy reads as "never sent".

The retry policy (service/upstream.py) splits transport failures in two, and this module keeps that
split exact:

* never sent -> ConnectError (refused, DNS failure, TLS handshake), ConnectTimeout, PoolTimeout.
  aiohttp raises ClientConnectorError and ConnectionTimeoutError only from its connector, before a
  connection is handed to the request (aiohttp/client.py, ``_connect_and_send_request``), and the
  pool wait is ours (a semaphore), so these three are certain.
* may have been sent -> ReadTimeout, RemoteProtocolError, ReadError: everything that happens once
  a connection is in hand, including a reused keep-alive connection found dead. aiohttp drops
  pooled connections it already knows are closed before reusing one; when the close arrives after
  the request went out, nothing on this side can tell whether the server read the request first,
  so it stays "may have been sent", as with httpcore.

aiohttp never re-sends a POST on a dead keep-alive connection (it does re-send idempotent
methods once, which is safe by definition).
Responses are neither decompressed (httpx decodes them) nor followed (httpx handles redirects).
aiohttp has no write timeout, and starts its read timeout only once the body is written, so a
body the server stops reading would wait forever; each exchange is therefore also bounded by its
connect, write and read timeouts added up (a ReadTimeout: may have been sent).

Cookies: the facade never needs them, yet httpx's client parses every response for them through
urllib's cookie jar, about a quarter of the client's CPU per call here (make bench). Neither
aiohttp's session nor ``CookielessClient`` keeps any.
"""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
from yarl import URL

# httpx always sets these on the request; aiohttp must not add its own when one is removed.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=AiohttpTransport(...))``; HTTP/1.1 only, no proxies.

    ``limits.max_connections`` bounds the requests in flight (PoolTimeout past the pool
    timeout), ``keepalive_expiry`` closes idle connections; ``max_keepalive_connections`` is
    not applied (aiohttp keeps each idle connection until it expires).
    """

    def __init__(
        self,
        *,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._limits = limits
        # httpx's own context (certifi's CA bundle), so TLS verification is what it was before.
        self._ssl = httpx.create_ssl_context(verify, trust_env=False)
        # The pool limit is ours, so that waiting for a connection (PoolTimeout) is never
        # confused with connecting (ConnectTimeout); aiohttp's connector itself is unlimited.
        slots = limits.max_connections
        self._slots = asyncio.Semaphore(slots) if slots is not None else None
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp wants the running event loop.
        connector = aiohttp.TCPConnector(
            limit=0,
            keepalive_timeout=self._limits.keepalive_expiry,
            ssl=self._ssl,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        await self._acquire_slot(request, timeouts.get("pool"))
        try:
            session = self._session or self._open()
            headers = [(k.decode("ascii"), v.decode("utf-8")) for k, v in request.headers.raw]
            body = await request.aread()
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=_client_timeout(
                    timeouts.get("connect"), timeouts.get("write"), timeouts.get("read")
                ),
            )
        except BaseException as exc:
            self._release_slot()
            if isinstance(exc, aiohttp.ClientError | OSError):
                raise transport_error(exc, request) from exc
            if isinstance(exc, UnicodeError):
                raise httpx.LocalProtocolError("header is not UTF-8", request=request) from exc
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request, self._release_slot),
            extensions={
                "http_version": _http_version(response),
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def _acquire_slot(self, request: httpx.Request, pool_timeout: float | None) -> None:
        slots = self._slots
        if slots is None:
            return
        if not slots.locked():
            await slots.acquire()  # returns at once, without yielding
            return
        try:
            async with asyncio.timeout(pool_timeout):
                await slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout(
                "timed out waiting for a free connection", request=request
            ) from None

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(
        self, response: aiohttp.ClientResponse, request: httpx.Request, release: Callable[[], None]
    ) -> None:
        self._response = response
        self._request = request
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise transport_error(exc, self._request) from exc

    async def aclose(self) -> None:
        # Releasing a response that was not read to the end closes its connection.
        if self._release is not None:
            self._response.release()
            self._release()
            self._release = None


def transport_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx error for an aiohttp failure: never-sent classes only where that is certain.

    Order matters: aiohttp's classes overlap (ConnectionTimeoutError is a ServerTimeoutError,
    ClientConnectorError a ClientOSError).
    """
    message = str(exc) or type(exc).__name__
    error: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        error = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):  # DNS, refused, TLS handshake
        error = httpx.ConnectError
    elif isinstance(exc, TimeoutError):  # the read timeout, or the bound on the whole exchange
        error = httpx.ReadTimeout
        if not isinstance(exc, aiohttp.ServerTimeoutError):
            message = "the exchange outlasted its connect, write and read timeouts together"
    elif isinstance(
        exc,
        aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError,
    ):
        error = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.InvalidURL):
        error = httpx.UnsupportedProtocol
    else:  # a reset or another socket error once connected
        error = httpx.ReadError
    return error(message, request=request)


def _http_version(response: aiohttp.ClientResponse) -> bytes:
    version = response.version
    return f"HTTP/{version.major}.{version.minor}".encode() if version else b"HTTP/1.1"


@functools.lru_cache(maxsize=16)
def _client_timeout(
    connect: float | None, write: float | None, read: float | None
) -> aiohttp.ClientTimeout:
    # connect covers DNS, TCP and TLS (our pool wait is separate); sock_read is the longest
    # silence while reading, like httpx's read timeout; total stands in for the write timeout
    # aiohttp lacks. No ceiling: aiohttp would otherwise round timeouts over 5 s up to a whole
    # second of the loop clock.
    parts = (connect, write, read)
    total = sum(p for p in parts if p is not None) if None not in parts else None
    return aiohttp.ClientTimeout(
        total=total, connect=connect, sock_read=read, ceil_threshold=math.inf
    )


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        pass  # Set-Cookie is ignored, never stored, never sent back

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        raise TypeError("this client keeps no cookies")


class CookielessClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that keeps no cookies (httpx has no switch for it)."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("this client keeps no cookies")


_NO_COOKIES = _NoCookies()
