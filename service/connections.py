"""Connections that never authenticate do not keep their place under ``GRPC_MAX_CONNECTIONS``.

gRPC counts every connection against the cap before anything is authenticated, and any call
(a health Check, a refused call without a token) keeps a connection from ever being idle. So a
client without a token could hold every slot with a ping now and then, and lock authenticated
clients out for good. With caller authentication on, the facade therefore closes, once a second:

* connections that have made no authenticated call within
  ``GRPC_UNAUTHENTICATED_CONNECTION_SECONDS`` of being first seen, and
* one peer address's unauthenticated connections beyond
  ``GRPC_MAX_UNAUTHENTICATED_CONNECTIONS_PER_PEER``, oldest first (a new connection keeps its
  chance to authenticate).

A connection that has made one authenticated call is never closed here, so no call that could have
reached Twilio is ever cut. gRPC has no API for closing a server connection: the facade finds the
sockets of its own listening ports among the process's file descriptors (Linux ``/proc``) and shuts
them down, which gRPC sees as the client going away. What this cannot do is stop a peer that keeps
reconnecting from competing for free slots: the NetworkPolicy (only labelled callers reach the
port) and mutual TLS (no handshake without a certificate) are what keep strangers out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
import urllib.parse
from collections import defaultdict

from . import observability as obs

log = logging.getLogger("flexwebchat.connections")

Peer = tuple[str, int]  # normalized address, port
FD_DIR = "/proc/self/fd"


class UnauthenticatedConnections:
    def __init__(self, ports: set[int], grace: float, per_peer: int, interval: float = 1.0):
        self.ports = ports  # the gRPC ports, once listening
        self._grace = grace
        self._per_peer = per_peer
        self._interval = interval
        self._first_seen: dict[Peer, float] = {}
        self._authenticated: set[Peer] = set()

    @staticmethod
    def available() -> bool:
        return os.path.isdir(FD_DIR)

    def authenticated(self, peer: str) -> None:
        """``peer`` as gRPC names it (``context.peer()``) made an authenticated call."""
        address = _parse_peer(peer)
        if address is not None:
            self._authenticated.add(address)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.sweep(time.monotonic())
            except OSError as exc:  # never let a sweep failure stop the next one
                log.warning("connection sweep failed", extra={"fields": {"error": str(exc)}})

    def sweep(self, now: float) -> int:
        """Closes what the module docstring says; returns how many connections it closed."""
        live = _connections(self.ports)
        try:
            self._first_seen = {p: self._first_seen.get(p, now) for p in live}
            self._authenticated = {p for p in self._authenticated if p in live}
            waiting = sorted(
                (p for p in live if p not in self._authenticated), key=self._first_seen.__getitem__
            )
            by_host: dict[str, list[Peer]] = defaultdict(list)
            close: dict[Peer, str] = {}
            for peer in waiting:
                if now - self._first_seen[peer] >= self._grace:
                    close[peer] = "unauthenticated"
                else:
                    by_host[peer[0]].append(peer)
            for peers in by_host.values():
                for peer in peers[: max(len(peers) - self._per_peer, 0)]:
                    close[peer] = "per_peer"
            for peer, reason in close.items():
                try:
                    live[peer].shutdown(socket.SHUT_RDWR)
                except OSError:
                    continue  # already gone
                obs.CONNECTIONS_CLOSED.labels(reason=reason).inc()
            obs.GRPC_CONNECTIONS.labels(state="authenticated").set(len(self._authenticated))
            obs.GRPC_CONNECTIONS.labels(state="unauthenticated").set(len(waiting) - len(close))
            if close:
                log.warning(
                    "closed connections that did not authenticate",
                    extra={"fields": {"closed": len(close), "open": len(live) - len(close)}},
                )
            return len(close)
        finally:
            for sock in live.values():
                sock.close()  # our duplicate of the descriptor only


def _connections(ports: set[int]) -> dict[Peer, socket.socket]:
    """The accepted TCP connections on ``ports``, by peer, each as a duplicate descriptor."""
    found: dict[Peer, socket.socket] = {}
    for name in os.listdir(FD_DIR):
        try:
            if not os.readlink(f"{FD_DIR}/{name}").startswith("socket:"):
                continue
            fd = os.dup(int(name))
        except OSError:
            continue  # closed since the listing
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # replaced by something else since the readlink
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                if sock.getsockname()[1] in ports:
                    host, port = sock.getpeername()[:2]
                    peer = (_normalize(host), port)
                    if peer not in found:
                        found[peer] = sock
                        continue
        except OSError:
            pass  # a listener has no peer; or it closed meanwhile
        sock.close()
    return found


def _parse_peer(peer: str) -> Peer | None:
    """``ipv4:10.0.0.1:5000`` or ``ipv6:[::1]:5000`` (percent-encoded in some gRPC versions)."""
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    host, _, port = rest.rpartition(":")
    if scheme not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    try:
        return _normalize(host.strip("[]")), int(port)
    except ValueError:
        return None


def _normalize(host: str) -> str:
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # a dual-stack listener sees IPv4 clients this way
    return str(address)
