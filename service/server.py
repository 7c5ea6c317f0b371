"""Assembles the running facade: gRPC server, servicer, health, reflection, interceptors, metrics,
the one HTTP client and the (local or shared) rate limit and idempotency records; then drains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import tracing
from .auth import CallerTokens, server_credentials
from .config import ConfigError, Settings
from .connections import ConnectionShares, UnauthenticatedConnections
from .conversations import ConversationsClient
from .credential_check import CredentialCheck
from .credentials import Credentials
from .flex import FlexClient
from .idempotency import IdempotencyStore, LocalRecords, RecordBackend
from .interceptors import Limits, RpcObserver
from .metrics_server import MetricsServer, start_metrics_server
from .ratelimit import Limiter, LocalSchedule, RateLimiter, Unlimited
from .tokens import GuestTokens
from .upstream import TwilioHttp, new_http_client
from .webchat import WebChatServicer

log = logging.getLogger("flexwebchat")

SERVICE_NAME = webchat_pb2.DESCRIPTOR.services_by_name["WebChatService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Facade:
    settings: Settings
    server: grpc.aio.Server
    health: Any
    http: httpx.AsyncClient
    limiter: Limiter
    records: RecordBackend
    servicer: WebChatServicer
    port: int
    observer: RpcObserver
    health_server: grpc.aio.Server | None = None
    metrics: MetricsServer | None = None
    flush_traces: Callable[[], None] | None = None
    # Readiness waiting for Redis, the connection sweep: cancelled by stop()
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings) -> Facade:
        """Builds and starts everything; call inside the running event loop."""
        secrets = Credentials(settings)
        http = new_http_client(settings, secrets)
        try:
            return await cls._start(settings, secrets, http)
        except BaseException:
            await http.aclose()  # a refusal exits with its one line, no unclosed-session noise
            raise

    @classmethod
    async def _start(
        cls, settings: Settings, secrets: Credentials, http: httpx.AsyncClient
    ) -> Facade:
        flush_traces = tracing.configure()
        credentials = server_credentials(settings)
        tokens = CallerTokens(settings.auth_tokens_file) if settings.auth_tokens_file else None
        check = CredentialCheck(http, settings, secrets)
        checked = await check.at_start()  # refused credentials: ConfigError, exit 2
        secrets.verify_with(check.refusal)  # and a reloaded one refused is not applied
        limiter, records, first_answer = await _state(settings, secrets)
        idempotency = IdempotencyStore(
            records, ttl_seconds=settings.idempotency_ttl, lock_seconds=settings.idempotency_lock
        )
        twilio = TwilioHttp(http, settings)
        servicer = WebChatServicer(
            FlexClient(twilio, settings, limiter),
            ConversationsClient(twilio, settings),
            idempotency,
            _guest_tokens(settings, secrets),
            settings,
            secrets,
        )

        limits = Limits(
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            max_concurrent_rpcs_per_caller=(
                settings.max_concurrent_rpcs_per_caller if settings.caller_auth else None
            ),
            message_timeout=settings.request_message_timeout,
            max_message_bytes=settings.max_message_bytes,
        )
        sweeps: list[UnauthenticatedConnections] = []
        warden = None
        if settings.caller_auth:
            shares = ConnectionShares(settings.max_connections_per_caller, settings.max_connections)
            callers = tokens.names if tokens is not None else None
            warden = _sweep(settings, "grpc", callers, shares=shares)
            sweeps.append(warden)
        # No maximum_concurrent_rpcs: the interceptor enforces the limit after authentication,
        # and logs and counts its refusals.
        observer = RpcObserver(tokens, limits, settings.tls_client_names, connections=warden)
        server = grpc.aio.server(interceptors=[observer], options=_channel_options(settings))
        webchat_pb2_grpc.add_WebChatServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        metrics = None
        if settings.metrics_port:
            try:
                metrics = start_metrics_server(settings.metrics_host, settings.metrics_port)
            except OSError as exc:
                where = (
                    f"METRICS_PORT={settings.metrics_port} on METRICS_HOST={settings.metrics_host}"
                )
                raise ConfigError(f"{where}: {exc.strerror}") from None
        port = _listen(server, "GRPC_PORT", settings.grpc_host, settings.grpc_port, credentials)
        if warden is not None:
            warden.ports.add(port)
        health_server = None
        if settings.health_port:
            # The kubelet's gRPC probe speaks plaintext only: with TLS on, health is served
            # (and nothing else) on this port too.
            health_server = grpc.aio.server(
                interceptors=[RpcObserver(limits=limits)], options=_channel_options(settings)
            )
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            health_port = _listen(
                health_server, "HEALTH_PORT", settings.grpc_host, settings.health_port, None
            )
            # No caller authenticates there: connections live at most the grace (the kubelet
            # opens one per probe), so idle ones cannot take the probes' slots.
            sweeps.append(_sweep(settings, "health", None, health_port))
            await health_server.start()
        background = [asyncio.create_task(sweep.run()) for sweep in sweeps if sweep.available()]
        background.append(asyncio.create_task(secrets.watch()))
        if not checked:
            background.append(asyncio.create_task(check.until_conclusive()))
        await server.start()
        if tokens is not None and credentials is None:
            log.warning(
                "bearer tokens are accepted over plaintext: anyone on the network path can read "
                "and replay them; set TLS_CERT_FILE and TLS_KEY_FILE"
            )
        # "" is liveness (the process is up); the service's own name is readiness, which waits
        # for shared state to have answered once (see RedisRecords.first_answer).
        await health_servicer.set("", SERVING)
        if first_answer is None:
            await health_servicer.set(SERVICE_NAME, SERVING)
        else:
            await health_servicer.set(SERVICE_NAME, NOT_SERVING)
            background.append(asyncio.create_task(_ready_after(first_answer, health_servicer)))

        log.info(
            "serving",
            extra={
                "fields": {
                    "grpc_host": settings.grpc_host,
                    "grpc_port": port,
                    "tls": "mutual" if settings.tls_client_ca_file else bool(credentials),
                    "caller_tokens": tokens is not None,
                    "health_port": settings.health_port or None,
                    "metrics_host": settings.metrics_host if settings.metrics_port else None,
                    "metrics_port": settings.metrics_port or None,
                    "upstream": settings.base_url,
                    "guest_tokens": settings.tokens_enabled,
                    "rate_limit_rps": settings.rate_limit_rps,
                    "shared_state": "redis" if settings.redis_url else "local",
                    "tracing": flush_traces is not None,
                }
            },
        )
        return cls(
            settings,
            server,
            health_servicer,
            http,
            limiter,
            records,
            servicer,
            port,
            observer,
            health_server,
            metrics,
            flush_traces,
            background,
        )

    async def stop(self, *, at_once: bool = False) -> None:
        """Drain: NOT_SERVING at once, keep serving while endpoints update, let in-flight RPCs
        finish within the grace period, then close the HTTP client and shared state. With
        ``at_once`` (a second signal), in-flight RPCs and requests at Twilio are cut instead."""
        for task in self.background:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        if not at_once:
            log.info("draining", extra={"fields": {"delay_s": self.settings.shutdown_delay}})
            await asyncio.sleep(self.settings.shutdown_delay)
        self.limiter.close()  # callers still queued go elsewhere at once
        self.observer.stopping = True
        await self.server.stop(grace=None if at_once else self.settings.shutdown_grace)
        # Requests already at Twilio finish and are recorded, whatever their callers did.
        await self.servicer.executions.drain(
            within=0 if at_once else self.settings.attempt_timeout + 1
        )
        await self.servicer.idempotency.drain(
            within=0 if at_once else self.settings.idempotency_lock
        )
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        await self.http.aclose()
        await self.records.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.flush_traces is not None:
            self.flush_traces()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains and returns; a second signal during the drain
    stops at once (an operator's Ctrl-C Ctrl-C, or a supervisor that means it)."""
    raise_file_limit(settings)
    facade = await Facade.start(settings)
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    await signals.get()
    drain = asyncio.create_task(facade.stop())
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if drain.done():
        second.cancel()
        return await drain
    log.warning("second signal: stopping at once; in-flight RPCs are cut")
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain
    await facade.stop(at_once=True)


async def _state(
    settings: Settings, credentials: Credentials
) -> tuple[Limiter, RecordBackend, Callable[[], Awaitable[None]] | None]:
    """Rate limit and idempotency records: in Redis when REDIS_URL is set, else in-process; and
    what readiness must wait for (Redis's first answer), if anything."""
    if settings.redis_url is not None:
        from .shared import connect_shared_state

        shared_limiter, records = await connect_shared_state(settings, credentials)
        return shared_limiter, records, records.first_answer
    limiter: Limiter = Unlimited()
    if settings.rate_limit_rps > 0:
        schedule = LocalSchedule(settings.rate_limit_rps, settings.rate_limit_burst)
        limiter = RateLimiter(schedule, schedule.gcra.interval)
    return limiter, LocalRecords(max_records=settings.idempotency_max_local_records), None


async def _ready_after(first_answer: Callable[[], Awaitable[None]], health: Any) -> None:
    await first_answer()
    await health.set(SERVICE_NAME, SERVING)


def _sweep(
    settings: Settings,
    listener: str,
    callers: Callable[[], frozenset[str]] | None,
    port: int | None = None,
    shares: ConnectionShares | None = None,
) -> UnauthenticatedConnections:
    return UnauthenticatedConnections(
        set() if port is None else {port},
        settings.unauthenticated_connection_grace,
        settings.max_unauthenticated_per_peer,
        callers=callers,
        listener=listener,
        shares=shares,
    )


def raise_file_limit(settings: Settings) -> int:
    """Each connection is a descriptor. Container runtimes may start the process with a soft
    limit of 1024, below GRPC_MAX_CONNECTIONS' default alone: lift it to the hard limit (as Go's
    runtime does), and warn when even that is short. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    # Both ports' connections, the upstream pool, Redis, logs and gRPC's own descriptors.
    needed = 2 * settings.max_connections + settings.upstream_max_connections + 64
    if soft < needed:
        log.warning(
            "the open-file limit is below what GRPC_MAX_CONNECTIONS needs: past it, new "
            "connections and upstream requests fail; raise the container's nofile limit",
            extra={"fields": {"limit": soft, "needed": needed}},
        )
    return soft


def _guest_tokens(settings: Settings, credentials: Credentials) -> GuestTokens | None:
    if not settings.tokens_enabled:
        return None
    return GuestTokens(
        keys=credentials,
        account_sid=settings.account_sid,
        service_sid=settings.conversations_service_sid,
        ttl_seconds=settings.guest_token_ttl,
        session_max_seconds=settings.guest_session_max,
        region=settings.region,
    )


def _listen(
    server: grpc.aio.Server,
    variable: str,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
) -> int:
    address = f"{host}:{port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        raise ConfigError(
            f"{variable}: cannot listen on {address} (in use, or not an address of this host?)"
        ) from None


# gRPC turns SO_REUSEPORT on by default: a second facade on a busy port would start and share it,
# each process with its own in-process records and rate budget. A busy port must be a refusal.
_NO_PORT_SHARING = ("grpc.so_reuseport", 0)

# Streams one connection may hold open at once; more wait in the client (HTTP/2 flow control).
MAX_STREAMS_PER_CONNECTION = 100
# gRPC's "overload protection" counts a stream until the server has freed it, not until it has
# ended, and refuses the next one (RST_STREAM REFUSED_STREAM, "Stream removed" to the caller) even
# when the client keeps to the advertised limit: off, a client within it is never refused, and
# the facade's own limits (RESOURCE_EXHAUSTED with RetryInfo) answer every call it sends. The
# cost: streams a client resets at once do not count against its connection, so one connection
# can fill gRPC's queue of calls waiting for the server (about 1000, then some are CANCELLED),
# where ten would be needed with it on (docs/security.md).
_STREAMS_COUNTED_WHILE_OPEN = ("grpc.http.overload_protection", 0)
# A TCP connection must finish its TLS handshake and send HTTP/2 settings within this time.
HANDSHAKE_TIMEOUT_MS = 5_000


def _channel_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        _NO_PORT_SHARING,
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Each connection costs memory before any authentication: bound them, and close
        # those that never finish a handshake or sit idle.
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle * 1000)),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        _STREAMS_COUNTED_WHILE_OPEN,
    ]
    if settings.max_connection_age > 0:
        # Long-lived HTTP/2 connections pin a client to one pod; ageing them out lets
        # clients re-resolve and spread across replicas.
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)))
        # The grace must outlast any call: a call cut here would be an ambiguous failure made by
        # the facade itself, mid-attempt. No call outlives its deadline (at most
        # FLEX_MAX_DEADLINE_SECONDS) by more than the attempt being cancelled.
        longest_call = settings.max_deadline + settings.attempt_timeout
        options.append(("grpc.max_connection_age_grace_ms", int(longest_call * 1000)))
    return options
