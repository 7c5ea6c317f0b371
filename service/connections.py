"""Connections that never authenticate do not keep their place under ``GRPC_MAX_CONNECTIONS``,
and no caller holds more than its share of it.

gRPC counts every connection against the cap before anything is authenticated, and any call
(a health Check, a refused call without a token) keeps a connection from ever being idle. So a
client without a token could hold every slot with a ping now and then, and lock authenticated
clients out for good. With caller authentication on, the facade therefore closes, once a second:

* connections that have made no authenticated call within
  ``GRPC_UNAUTHENTICATED_CONNECTION_SECONDS`` of being first seen;
* one peer address's unauthenticated connections beyond
  ``GRPC_MAX_UNAUTHENTICATED_CONNECTIONS_PER_PEER``, oldest first (a new connection keeps its
  chance to authenticate);
* a caller's idle connections beyond ``GRPC_MAX_CONNECTIONS_PER_CALLER``, oldest first (a
  connection belongs to its first authenticated caller); and
* while callers' connections leave less than a tenth of ``GRPC_MAX_CONNECTIONS`` free, the oldest
  idle connection of the caller holding the most: gRPC refuses a connection at accept, before
  anyone knows whose it is, so a caller not yet connected gets in only if room is kept for it.

A connection with an authenticated call in progress is never closed here, so no call that could
have reached Twilio is ever cut; past those two shares, one that has made an authenticated call
keeps its standing until none of its callers has been allowed for the grace (revoked). The
health port (``HEALTH_PORT``) has no callers to authenticate, whether caller authentication is on
or not: there every connection lives at most the grace (the kubelet opens one per probe, so a
health ``Watch`` belongs on the gRPC port).

gRPC has no API for closing a server connection: the facade reads its listening ports'
connections from the kernel's TCP tables (Linux ``/proc``), finds the descriptors of those it
closes, and shuts them down, which gRPC sees as the client going away.

What this cannot do is keep out a peer that reconnects in a tight loop: it takes the slots freed
each second before a newcomer's backoff comes round. The NetworkPolicy (only labelled callers
reach the port) and mutual TLS (no handshake without a certificate) are what keep strangers out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import sys
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

from . import observability as obs

log = logging.getLogger("flexwebchat.connections")

Peer = tuple[str, int]  # normalized address, port
FD_DIR = "/proc/self/fd"
TCP_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")
LISTEN = "0A"  # the state column of a listening socket


@dataclass
class _Mark:
    """A connection that made authenticated calls: whose it is (its first caller), as whom,
    when last, how many now, and since when none of its callers is allowed any more."""

    owner: str
    callers: set[str]
    at: float
    in_flight: int = 0
    revoked_at: float | None = None


class UnauthenticatedConnections:
    """See the module docstring. ``callers`` gives the names still allowed (a revoked caller's
    connections lose their standing); None allows every name that once authenticated."""

    def __init__(
        self,
        ports: set[int],
        grace: float,
        per_peer: int,
        interval: float = 1.0,
        callers: Callable[[], Container[str]] | None = None,
        listener: str = "grpc",
        shares: ConnectionShares | None = None,
    ) -> None:
        self.ports = ports  # the listening ports, once listening
        self._listener = listener  # the metrics' label: "grpc", or "health" (no caller auth)
        self._grace = grace
        self._per_peer = per_peer
        self._interval = interval
        self._callers = callers
        self._shares = shares
        self._first_seen: dict[Peer, float] = {}
        self._marks: dict[Peer, _Mark] = {}

    @staticmethod
    def available() -> bool:
        return os.path.isdir(FD_DIR)

    def call_started(self, peer: str, caller: str) -> _Mark | None:
        """An authenticated call from ``peer`` (as ``context.peer()`` names it) began; pass the
        result to ``call_ended``. While it runs, its connection is never closed here."""
        address = _parse_peer(peer)
        if address is None:
            return None
        mark = self._marks.get(address)
        if mark is None:
            mark = self._marks[address] = _Mark(caller, set(), time.monotonic())
        mark.callers.add(caller)
        mark.at = time.monotonic()
        mark.in_flight += 1
        return mark

    @staticmethod
    def call_ended(mark: _Mark | None) -> None:
        if mark is not None:
            mark.in_flight -= 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                # The kernel's tables are read off the event loop: at 1000 connections that takes
                # a few milliseconds, mostly in the kernel.
                read_at = time.monotonic()
                live = await asyncio.to_thread(_connections, self.ports)
                self.sweep(time.monotonic(), live, read_at)
            except OSError as exc:  # never let a sweep failure stop the next one
                log.warning("connection sweep failed", extra={"fields": {"error": str(exc)}})

    def to_close(
        self, now: float, live: Mapping[Peer, object], read_at: float
    ) -> tuple[dict[Peer, str], int]:
        """The connections to close, each with why; and how many have no standing."""
        self._first_seen = {p: self._first_seen.get(p, now) for p in live}
        # A mark made after the read is of a connection the read may have missed: kept.
        self._marks = {
            p: m for p, m in self._marks.items() if p in live or m.in_flight > 0 or m.at >= read_at
        }
        allowed = self._callers() if self._callers is not None else None
        standing = {p for p, m in self._marks.items() if self._stands(m, allowed, now)}
        waiting = sorted((p for p in live if p not in standing), key=self._first_seen.__getitem__)
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
        if self._shares is not None:
            callers_live = [p for p in live if p in standing]
            close.update(self._over_shares(self._shares, callers_live))
        return close, len(waiting)

    def _over_shares(self, shares: ConnectionShares, live: list[Peer]) -> dict[Peer, str]:
        """Callers' idle connections past their share, then past the room kept for newcomers."""
        held: dict[str, int] = defaultdict(int)  # connections by owner
        idle: dict[str, list[Peer]] = defaultdict(list)  # idle ones by owner, oldest first
        for peer in sorted(live, key=self._first_seen.__getitem__):
            mark = self._marks[peer]
            held[mark.owner] += 1
            if mark.in_flight == 0:
                idle[mark.owner].append(peer)
        close: dict[Peer, str] = {}
        for owner, count in held.items():
            excess = max(count - shares.per_caller, 0)
            closing, idle[owner] = idle[owner][:excess], idle[owner][excess:]
            close.update(dict.fromkeys(closing, "per_caller"))
            held[owner] -= len(closing)
        left = sum(held.values())
        while left > shares.callers_room:
            holders = [owner for owner in held if idle[owner]]
            if not holders:
                break  # every connection past the room has a call in progress
            owner = max(holders, key=held.__getitem__)
            close[idle[owner].pop(0)] = "headroom"
            held[owner] -= 1
            left -= 1
        return close

    def _stands(self, mark: _Mark, allowed: Container[str] | None, now: float) -> bool:
        """A revoked caller's connection keeps its standing for the grace, so that a tokens
        file caught mid-rewrite (empty for a moment) does not close everyone's connections."""
        if allowed is None or any(caller in allowed for caller in mark.callers):
            mark.revoked_at = None
            return True
        if mark.revoked_at is None:
            mark.revoked_at = now
        return mark.in_flight > 0 or now - mark.revoked_at < self._grace

    def sweep(
        self, now: float, live: dict[Peer, int] | None = None, read_at: float | None = None
    ) -> int:
        """Closes what the module docstring says, among the ``live`` connections read at
        ``read_at`` (else read now); returns how many connections it closed."""
        if live is None:
            read_at, live = time.monotonic(), _connections(self.ports)
        assert read_at is not None
        close, waiting = self.to_close(now, live, read_at)
        closed = _shut_down({live[peer] for peer in close})
        by_reason: dict[str, int] = defaultdict(int)
        owners: set[str] = set()
        for peer, reason in close.items():
            if live[peer] in closed:
                by_reason[reason] += 1
                obs.child(obs.CONNECTIONS_CLOSED, self._listener, reason).inc()
                if reason in ("per_caller", "headroom"):
                    owners.add(self._marks[peer].owner)
        strangers = by_reason["unauthenticated"] + by_reason["per_peer"]
        gauge = obs.GRPC_CONNECTIONS
        authenticated = len(live) - waiting - (len(closed) - strangers)
        obs.child(gauge, self._listener, "authenticated").set(authenticated)
        obs.child(gauge, self._listener, "unauthenticated").set(waiting - strangers)
        fields = {"listener": self._listener, "open": len(live) - len(closed)}
        if strangers:
            log.warning(
                "closed connections that did not authenticate",
                extra={"fields": {**fields, "closed": strangers}},
            )
        if len(closed) > strangers:
            log.warning(
                "closed idle connections of callers past their share",
                extra={
                    "fields": {
                        **fields,
                        "closed": len(closed) - strangers,
                        "callers": sorted(owners),
                        "past_share": by_reason["per_caller"],
                        "for_newcomers": by_reason["headroom"],
                    }
                },
            )
        return len(closed)


@dataclass(frozen=True)
class ConnectionShares:
    """How many connections one caller may hold, and how many all callers' may fill: the rest of
    ``GRPC_MAX_CONNECTIONS`` stays free for a caller not yet connected."""

    per_caller: int
    max_connections: int

    @property
    def callers_room(self) -> int:
        return self.max_connections - max(self.max_connections // 10, 1)


def _connections(ports: set[int]) -> dict[Peer, int]:
    """The accepted TCP connections on ``ports``: each peer's socket inode, from the kernel's
    tables (one read each, however many descriptors the process has)."""
    wanted = {f"{port:04X}" for port in ports}
    found: dict[Peer, int] = {}
    for table in TCP_TABLES:
        try:
            with open(table) as rows:
                next(rows, None)  # the header
                for row in rows:
                    # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                    if row.split(None, 2)[1][-4:] not in wanted:
                        continue
                    fields = row.split()
                    remote, state, inode = fields[2], fields[3], fields[9]
                    if state != LISTEN and inode != "0":
                        host, _, port = remote.partition(":")
                        found[(_from_hex(host), int(port, 16))] = int(inode)
        except OSError:
            continue  # no IPv6, say
    return found


def _shut_down(inodes: set[int]) -> set[int]:
    """Shuts down the process's sockets with these inodes; returns those it did."""
    done: set[int] = set()
    if not inodes:
        return done
    for name in os.listdir(FD_DIR):
        try:
            link = os.readlink(f"{FD_DIR}/{name}")  # socket:[inode]
            if not (link.startswith("socket:[") and int(link[8:-1]) in inodes):
                continue
            fd = os.dup(int(name))
        except (OSError, ValueError):
            continue  # closed since the listing
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # no longer a socket: the number was reused meanwhile
            continue
        with sock:  # closes our duplicate only
            inode = os.fstat(fd).st_ino  # the number may have been reused meanwhile, too
            if inode in inodes and inode not in done:
                with contextlib.suppress(OSError):  # already gone
                    sock.shutdown(socket.SHUT_RDWR)
                    done.add(inode)
    return done


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


@functools.lru_cache(maxsize=4096)  # callers' addresses are few; each is parsed once
def _from_hex(host: str) -> str:
    """An address as the kernel's tables write it: 32-bit words, each in host byte order."""
    raw = bytes.fromhex(host)
    words = raw
    if sys.byteorder == "little":
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return _normalize(socket.inet_ntop(family, words))


def _normalize(host: str) -> str:
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # a dual-stack listener sees IPv4 clients this way
    return str(address)
