"""What a hostile or careless caller can do to the real server, on loopback: nothing it does may
cost other callers their service, reach Twilio unauthenticated, or shape the logs."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ADDRESS_SID, EmulatorProcess, rich_status
from flexwebchat.v1 import webchat_pb2
from rawh2 import RawConnection, grpc_frame

CREATE = "/flexwebchat.v1.WebChatService/CreateWebChat"
WATCH = "/grpc.health.v1.Health/Watch"
TOKEN = "tok-billing-0123456789abcdef"
AUTH = [("authorization", f"Bearer {TOKEN}")]
REQUEST = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID)


def with_token(make_facade: Any, tmp_path: Path, url: str, **env: str) -> Any:
    """A facade whose one caller, billing, holds TOKEN (in ``tmp_path / "tokens"``)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"billing:{TOKEN}\n")
    return make_facade(url, AUTH_TOKENS_FILE=str(tokens), **env)


@pytest.fixture
def guarded(make_facade, tmp_path: Path, upstream: EmulatorProcess) -> Any:
    """billing's share is the whole replica: what is tested here is what callers without a
    token can take (tests/test_caller_shares.py: what one caller can take from another)."""
    return with_token(
        make_facade,
        tmp_path,
        upstream.url,
        GRPC_REQUEST_MESSAGE_TIMEOUT_SECONDS="1",
        GRPC_MAX_CONCURRENT_RPCS_PER_CALLER="256",
    )


def test_idle_unauthenticated_streams_cannot_take_the_callers_slots(guarded, upstream) -> None:
    """256 idle health Watch streams and 256 header-only calls (without and with a token) used
    to take every slot of GRPC_MAX_CONCURRENT_RPCS (256): an authenticated call then failed."""
    connections = [RawConnection(guarded.port) for _ in range(6)]
    try:
        watches = [
            (conn, conn.open(WATCH, body=grpc_frame(b""), end_stream=False))
            for conn in connections[:3]
            for _ in range(86)
        ]
        headers_only = [  # 3 x 86 = 258: half without a token, half with one
            (conn, conn.open(CREATE, metadata=meta, end_stream=False), bool(meta))
            for conn in connections[3:]
            for meta in ([], AUTH)
            for _ in range(43)
        ]
        for conn in connections:
            conn.pump(0.3)

        reply = guarded.stub.CreateWebChat(REQUEST, metadata=AUTH, timeout=10)
        assert reply.conversation_sid.startswith("CH")

        # Health and reflection streams share a small cap of their own; the excess is refused,
        # logged and counted.
        # Which 16 are admitted depends on the order the server reads the connections in.
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up and sum(s in c.ended for c, s in watches) < 242:
            for conn in connections[:3]:
                conn.pump(0.05)
        ended = [conn.ended[stream] for conn, stream in watches if stream in conn.ended]
        assert len(ended) == 242  # 16 stay open
        assert {trailers.get("grpc-status") for trailers in ended} == {
            str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        }
        # Without a token: refused at once. With one, but no message: timed out.
        codes = {
            (authed, conn.status(stream).get("grpc-status"))
            for conn, stream, authed in headers_only
        }
        unauthenticated = str(grpc.StatusCode.UNAUTHENTICATED.value[0])
        deadline = str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        assert codes == {(False, unauthenticated), (True, deadline)}
    finally:
        for conn in connections:
            conn.close()
    lines = guarded.rpc_lines(count=1 + 242 + 258, timeout=10)
    assert sum(1 for line in lines if line["method"] == "Watch") == 242
    assert {line["code"] for line in lines if line["method"] == "Watch"} == {"RESOURCE_EXHAUSTED"}
    assert sum(1 for line in lines if line["code"] == "DEADLINE_EXCEEDED") == 129
    assert sum(1 for line in lines if line["code"] == "UNAUTHENTICATED") == 129
    assert len(upstream.requests()) == 1
    refused = 'flexwebchat_rpcs_total{caller="anonymous",code="RESOURCE_EXHAUSTED",method="Watch"}'
    assert guarded.metric(refused) == 242
    assert guarded.metric("flexwebchat_rpcs_in_flight") == 0


def test_the_concurrency_limit_is_logged_and_counted(
    make_facade, tmp_path: Path, unlimited_upstream: EmulatorProcess
) -> None:
    facade = with_token(
        make_facade,
        tmp_path,
        unlimited_upstream.url,
        FLEX_RATE_LIMIT_RPS="0",
        GRPC_MAX_CONCURRENT_RPCS="2",
        GRPC_MAX_CONCURRENT_RPCS_PER_CALLER="3",  # the replica's limit answers first
    )
    unlimited_upstream.fault(latency=1.0)
    outcomes: list[object] = []

    def call() -> None:
        try:
            outcomes.append(facade.stub.CreateWebChat(REQUEST, metadata=AUTH, timeout=10))
        except grpc.RpcError as error:
            outcomes.append(rich_status(error))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    [refused] = [o for o in outcomes if isinstance(o, dict)]
    assert refused["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused["ErrorInfo"].reason == "CONCURRENCY_LIMIT"
    assert refused["RetryInfo"].retry_delay.seconds == 1
    lines = facade.rpc_lines(count=3)
    assert sorted(line["code"] for line in lines) == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    assert all(line["caller"] == "billing" for line in lines)
    sample = (
        'flexwebchat_rpcs_total{caller="billing",code="RESOURCE_EXHAUSTED",method="CreateWebChat"}'
    )
    assert facade.metric(sample) == 1


def test_oversized_and_missing_messages_are_logged_and_counted(make_facade, upstream) -> None:
    facade = make_facade(upstream.url, GRPC_MAX_MESSAGE_BYTES="4096")
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(pre_engagement_data='{"x": "' + "a" * 5000 + '"}')
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    conn = RawConnection(facade.port)
    try:  # headers, then the end of the stream: no message at all
        assert conn.status(conn.open(CREATE))["grpc-status"] == "8"
    finally:
        conn.close()
    lines = facade.rpc_lines(count=2)
    assert [line["code"] for line in lines] == ["RESOURCE_EXHAUSTED"] * 2
    assert upstream.requests() == []
    labels = 'caller="anonymous",code="RESOURCE_EXHAUSTED",method="CreateWebChat"'
    assert facade.metric(f"flexwebchat_rpcs_total{{{labels}}}") == 2


def test_malformed_protobuf_is_invalid_argument_logged_and_counted(facade, upstream) -> None:
    raw = facade.channel.unary_unary(CREATE)  # bytes in, bytes out: no client-side checks
    identity = b"\x32\x03ab\xff"  # field 6 (identity), 3 bytes, not UTF-8
    with pytest.raises(grpc.RpcError) as caught:
        raw(REQUEST.SerializeToString() + identity, timeout=5)
    status = rich_status(caught.value)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT
    [violation] = status["BadRequest"].field_violations
    assert (violation.field, violation.description) == ("identity", "must be valid UTF-8")
    [line] = facade.rpc_lines()
    assert line["code"] == "INVALID_ARGUMENT"
    assert "Traceback" not in facade.logs()
    assert upstream.requests() == []


HOSTILE_IDS = [
    b"abc\r\nforged line",
    b"abc\nlevel=ERROR msg=forged",
    b"abc\x1b[31mred",
    b"abc\x00nul",
    "abc\u2028sep".encode(),
    "abc\u0085nel".encode(),
    "abc\u202egnp.exe".encode(),
    b'abc" code=OK x="',
]


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_callers_cannot_shape_the_logs(make_facade, upstream, log_format: str) -> None:
    facade = make_facade(upstream.url, LOG_FORMAT=log_format)
    conn = RawConnection(facade.port)
    try:
        body = grpc_frame(REQUEST.SerializeToString())
        for value in HOSTILE_IDS:
            for header in ("x-request-id", "traceparent"):
                stream = conn.open(CREATE, metadata=[(header, value)], body=body)
                assert conn.status(stream).get("grpc-status") == "0"
    finally:
        conn.close()
    time.sleep(0.3)
    text = facade.log_path.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    rpc_lines = [line for line in lines if " rpc " in line or '"msg": "rpc"' in line]
    assert len(rpc_lines) == 2 * len(HOSTILE_IDS)
    for line in lines:
        assert line.isascii() and line.isprintable(), repr(line)
        if log_format == "console":
            assert re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", line), line
        else:
            json.loads(line)
    assert "forged" not in text and "trace_id" not in text


def test_upstream_text_is_capped_for_callers_and_kept_out_of_the_logs(facade, upstream) -> None:
    personal = "Guest Jane Roe <jane.roe@example.com> +1 555 0100"
    body = {"code": 21211, "message": f"Invalid value for {personal}", "more_info": "x" * 20_000}
    request_id = "0b6f2f4e-5d5a-4c1e-9d55-3f5e6b7a8c9d"
    outcomes = []
    for _ in range(2):  # the second is the stored outcome, replayed
        upstream.fault({"status": 400, "body": json.dumps(body)})
        with pytest.raises(grpc.RpcError) as caught:
            facade.create(request_id=request_id)
        outcomes.append(rich_status(caught.value))
    for status in outcomes:
        assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT
        assert personal in status["message"]  # the caller still learns what Twilio said
        assert status["ErrorInfo"].metadata["twilio_code"] == "21211"
        assert len(status["ErrorInfo"].metadata["more_info"]) <= 512
    assert len(upstream.requests()) == 1
    lines = facade.rpc_lines(count=2)
    assert [line["twilio_code"] for line in lines[:1]] == [21211]
    assert "jane.roe" not in facade.logs() and "Jane Roe" not in facade.logs()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("customer_friendly_name", "Ada\u200b Lovelace"),  # zero-width space
        ("chat_friendly_name", "Support \u202eeciovni"),  # right-to-left override
        ("identity", "guest\ufdd0"),  # noncharacter
        ("identity", "guest\u2028x"),  # line separator
        ("pre_engagement_data", '{"name": "\\ud800"}'),  # lone surrogate
        ("pre_engagement_data", '{"amount": 1e400}'),  # overflows to infinity
        ("pre_engagement_data", '{"role": "guest", "role": "admin"}'),  # duplicate keys
    ],
)
def test_what_would_spoof_an_agent_is_refused(
    make_facade, upstream, field: str, value: str
) -> None:
    # The caller may choose identities under "guest", so the text rules are what refuses them.
    facade = make_facade(upstream.url, CALLER_IDENTITY_PREFIXES="anonymous=guest")
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(**{field: value})
    status = rich_status(caught.value)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in status["BadRequest"].field_violations] == [field]
    assert upstream.requests() == []


def test_a_connection_flood_is_capped_and_timed_out(make_facade, upstream) -> None:
    """Connections that send only the HTTP/2 preface: past GRPC_MAX_CONNECTIONS they are closed
    at once, and the rest when the handshake timeout passes; callers are still served."""
    facade = make_facade(upstream.url, GRPC_MAX_CONNECTIONS="100")
    flood: list[socket.socket] = []
    try:
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", facade.port), timeout=5)
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            flood.append(sock)
        time.sleep(1)  # the cap closes the excess at once; the handshake timeout is 5 s
        still_open = [sock for sock in flood if not _closed_by_peer(sock)]
        assert len(still_open) <= 100
        closed = 0
        give_up = time.monotonic() + 20
        while closed < len(flood) and time.monotonic() < give_up:
            closed = sum(1 for sock in flood if _closed_by_peer(sock))
        assert closed == len(flood)
    finally:
        for sock in flood:
            sock.close()
    assert facade.create().conversation_sid.startswith("CH")


def test_clients_without_a_token_cannot_hold_the_connection_slots(
    make_facade, tmp_path: Path, upstream: EmulatorProcess
) -> None:
    """A health Check now and then keeps a connection from ever being idle. Without a token, it
    keeps it no longer than GRPC_UNAUTHENTICATED_CONNECTION_SECONDS, and one peer keeps no more
    than its share; connections that authenticated are never closed."""
    facade = with_token(
        make_facade,
        tmp_path,
        upstream.url,
        GRPC_MAX_CONNECTIONS="12",
        GRPC_UNAUTHENTICATED_CONNECTION_SECONDS="1",
        GRPC_MAX_UNAUTHENTICATED_CONNECTIONS_PER_PEER="4",
    )
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    create = grpc.insecure_channel(facade.target, options=own_connection).unary_unary(CREATE)
    assert create(REQUEST.SerializeToString(), metadata=AUTH, timeout=5)  # connected first
    attackers = [grpc.insecure_channel(facade.target, options=own_connection) for _ in range(16)]
    stop = threading.Event()

    def ping() -> None:  # every attacker connection is busy once a second: never idle
        while not stop.is_set():
            for channel in attackers:
                check = channel.unary_unary("/grpc.health.v1.Health/Check")
                try:
                    check(b"", timeout=0.5)
                except grpc.RpcError:
                    pass
            stop.wait(1.0)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        time.sleep(1.5)  # the attackers fill every free slot
        served_new = 0
        for _ in range(10):
            assert create(REQUEST.SerializeToString(), metadata=AUTH, timeout=5)
            newcomer = grpc.insecure_channel(facade.target, options=own_connection)
            try:
                newcomer.unary_unary(CREATE)(
                    REQUEST.SerializeToString(), metadata=AUTH, timeout=3, wait_for_ready=True
                )
                served_new += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                newcomer.close()
    finally:
        stop.set()
        pinger.join()
        for channel in attackers:
            channel.close()
    assert served_new > 0  # before: never, the attackers held every slot for good
    assert (
        facade.metric(
            'flexwebchat_connections_closed_total{listener="grpc",reason="unauthenticated"}'
        )
        > 0
    )
    assert (
        facade.metric('flexwebchat_connections_closed_total{listener="grpc",reason="per_peer"}') > 0
    )
    assert "closed connections that did not authenticate" in facade.logs()


def _closed_by_peer(sock: socket.socket) -> bool:
    if sock.fileno() < 0:
        return True
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):  # the server's SETTINGS, then EOF
            del chunk
        sock.close()
        return True
    except BlockingIOError:
        return False
    except OSError:
        sock.close()
        return True


SERVICES = ("flexwebchat.v2.WebChatService", "flexwebchat.admin.v1.Admin", "other.X")


async def _admin_server(tmp_path: Path) -> tuple[grpc.aio.Server, int]:
    """A real server with the facade's interceptor and methods of every handler kind under
    services it has never heard of: what a future API version or an admin service would add."""
    from grpc_health.v1 import health, health_pb2_grpc

    from service.auth import CallerTokens
    from service.interceptors import RpcObserver

    tokens = tmp_path / "tokens"
    tokens.write_text(f"billing:{TOKEN}\n")

    async def unary(request: bytes, context: Any) -> bytes:
        return b"secret:" + request

    async def server_stream(request: bytes, context: Any) -> Any:
        yield b"secret:" + request

    async def client_stream(requests: Any, context: Any) -> bytes:
        return b"secret:" + b"".join([r async for r in requests])

    async def both_stream(requests: Any, context: Any) -> Any:
        async for request in requests:
            yield b"secret:" + request

    server = grpc.aio.server(interceptors=[RpcObserver(CallerTokens(str(tokens)))])
    for service in SERVICES:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    service,
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(unary),
                        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
                        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
                        "BothStream": grpc.stream_stream_rpc_method_handler(both_stream),
                    },
                )
            ]
        )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


KINDS = {
    "Unary": lambda ch, path: ch.unary_unary(path),
    "ServerStream": lambda ch, path: ch.unary_stream(path),
    "ClientStream": lambda ch, path: ch.stream_unary(path),
    "BothStream": lambda ch, path: ch.stream_stream(path),
}


async def _invoke(channel: Any, path: str, kind: str, metadata: Any) -> list[bytes]:
    call = KINDS[kind](channel, path)
    if kind in ("Unary", "ServerStream"):
        result = call(b"x", metadata=metadata, timeout=5)
    else:

        async def one() -> Any:
            yield b"x"

        result = call(one(), metadata=metadata, timeout=5)
    if kind in ("Unary", "ClientStream"):
        return [await result]
    return [message async for message in result]


async def test_every_method_of_every_kind_needs_a_token(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port = await _admin_server(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for service in (
                "flexwebchat.v2.WebChatService",
                "flexwebchat.admin.v1.Admin",
                "other.X",
            ):
                for kind in KINDS:
                    path = f"/{service}/{kind}"
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await _invoke(channel, path, kind, [])
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
                    assert await _invoke(channel, path, kind, AUTH) == [b"secret:x"], path
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING  # allowlisted
    finally:
        await server.stop(None)


def test_the_health_port_caps_streams_too(make_facade, upstream) -> None:
    from conftest import free_port

    health_port = free_port()
    make_facade(upstream.url, HEALTH_PORT=str(health_port))
    conn = RawConnection(health_port)
    try:
        watches = [conn.open(WATCH, body=grpc_frame(b""), end_stream=False) for _ in range(40)]
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up and sum(s in conn.ended for s in watches) < 24:
            conn.pump(0.05)
        refused = [conn.ended[s].get("grpc-status") for s in watches if s in conn.ended]
        assert refused == [str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])] * 24  # 16 open
        check = conn.open("/grpc.health.v1.Health/Check", body=grpc_frame(b""))
        assert conn.status(check).get("grpc-status") == "0"  # probes still answered
    finally:
        conn.close()


async def test_the_sweep_finds_ipv4_and_ipv6_callers_of_a_dual_stack_port() -> None:
    """gRPC names a peer ``ipv4:10.0.0.1:5000`` or ``ipv6:%5B::1%5D:5000``; a socket on ``[::]``
    sees an IPv4 caller as ``::ffff:10.0.0.1``. Both must name the same connection, or an
    authenticated caller's connection would be taken for a stranger's and closed.

    Each channel gets a connection of its own: from gRPC's process-wide subchannel pool, the
    stranger's channel would often ride on the caller's connection, still open while the first
    channel's close completes, and so never be a stranger at all."""
    from service.connections import UnauthenticatedConnections

    peers: list[str] = []

    async def answer(request: bytes, context: Any) -> bytes:
        peers.append(context.peer())
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(answer)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("x.Y", {"Z": handler})])
    port = server.add_insecure_port("[::]:0")
    await server.start()
    own = [("grpc.use_local_subchannel_pool", 1)]
    try:
        for host in ("127.0.0.1", "[::1]"):
            sweep = UnauthenticatedConnections({port}, grace=1.0, per_peer=1)
            async with grpc.aio.insecure_channel(f"{host}:{port}", options=own) as channel:
                await channel.unary_unary("/x.Y/Z")(b"")
                sweep.call_ended(sweep.call_started(peers[-1], "billing"))
                assert sweep.sweep(time.monotonic() + 60) == 0, peers[-1]  # kept, long after
                assert await channel.unary_unary("/x.Y/Z")(b"again") == b"again"
            async with grpc.aio.insecure_channel(f"{host}:{port}", options=own) as stranger:
                await stranger.unary_unary("/x.Y/Z")(b"")
                sweep.sweep(time.monotonic())
                assert sweep.sweep(time.monotonic() + 1.0) == 1  # closed at the grace
    finally:
        await server.stop(None)


def test_the_sweep_never_takes_standing_from_a_call_in_progress() -> None:
    """The decisions, one by one: a call marked while the kernel's table was being read (its
    connection not in that reading) keeps its mark; a connection with a call in progress is
    never closed, even for a caller revoked meanwhile; once the call ends, a revoked caller's
    connection is closed like a stranger's."""
    from service.connections import UnauthenticatedConnections

    allowed = {"billing"}
    sweep = UnauthenticatedConnections(set(), grace=1.0, per_peer=8, callers=lambda: allowed)
    peer = ("10.0.0.7", 40000)
    read_at = time.monotonic()
    held = sweep.call_started("ipv4:10.0.0.7:40000", "billing")  # after the read
    assert sweep.to_close(read_at + 0.1, {}, read_at) == ({}, 0)  # not in it: mark kept
    later = read_at + 60
    assert sweep.to_close(later, {peer: 1}, later) == ({}, 0)
    allowed.clear()  # billing's token is revoked while its call runs
    assert sweep.to_close(later + 60, {peer: 1}, later + 60) == ({}, 0)
    sweep.call_ended(held)
    assert sweep.to_close(later + 61, {peer: 1}, later + 61) == ({peer: "unauthenticated"}, 1)


def test_a_connection_stands_while_any_of_its_callers_is_allowed() -> None:
    """A gateway calls as alice and bob on one connection: revoking bob leaves it standing. A
    tokens file caught empty mid-rewrite closes nothing within the grace."""
    from service.connections import UnauthenticatedConnections

    allowed = {"alice", "bob"}
    sweep = UnauthenticatedConnections(set(), grace=5.0, per_peer=8, callers=lambda: allowed)
    peer, start = ("10.0.0.7", 40000), time.monotonic()
    for caller in ("alice", "bob"):
        sweep.call_ended(sweep.call_started("ipv4:10.0.0.7:40000", caller))
    allowed.discard("bob")
    assert sweep.to_close(start + 60, {peer: 1}, start + 60) == ({}, 0)
    allowed.clear()  # emptied for a moment
    assert sweep.to_close(start + 61, {peer: 1}, start + 61) == ({}, 0)
    allowed.add("alice")
    assert sweep.to_close(start + 70, {peer: 1}, start + 70) == ({}, 0)
    allowed.clear()  # for good this time
    assert sweep.to_close(start + 71, {peer: 1}, start + 71) == ({}, 0)
    assert sweep.to_close(start + 76, {peer: 1}, start + 76) == ({peer: "unauthenticated"}, 1)


def test_idle_connections_cannot_take_the_health_ports_slots(make_facade, upstream) -> None:
    """The kubelet opens a connection per probe; connections held open there (a Watch) are
    closed after GRPC_UNAUTHENTICATED_CONNECTION_SECONDS, so they cannot starve the probes."""
    from conftest import free_port

    health_port = free_port()
    facade = make_facade(
        upstream.url,
        HEALTH_PORT=str(health_port),
        GRPC_MAX_CONNECTIONS="4",
        GRPC_UNAUTHENTICATED_CONNECTION_SECONDS="1",
    )
    open_now = 'flexwebchat_grpc_connections{listener="health",state="unauthenticated"}'
    give_up = time.monotonic() + 10
    while facade.metric(open_now) != 0 and time.monotonic() < give_up:
        time.sleep(0.2)  # the start-up probe's connection is gone: every slot is free
    closed_before = facade.metric(
        'flexwebchat_connections_closed_total{listener="health",reason="unauthenticated"}'
    )
    holders: list[RawConnection] = []
    try:
        give_up = time.monotonic() + 10
        while len(holders) < 4 and time.monotonic() < give_up:  # every slot taken
            try:
                conn = RawConnection(health_port)
            except OSError:  # a slot still held by the start-up probe's connection
                time.sleep(0.1)
                continue
            try:
                conn.open(WATCH, body=grpc_frame(b""), end_stream=False)
                holders.append(conn)
            except OSError:
                conn.close()
                time.sleep(0.1)
        assert len(holders) == 4
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up and not all(_closed_by_peer(c.sock) for c in holders):
            time.sleep(0.2)
        assert all(_closed_by_peer(c.sock) for c in holders)
        probe = RawConnection(health_port)
        check = probe.open("/grpc.health.v1.Health/Check", body=grpc_frame(b""))
        assert probe.status(check).get("grpc-status") == "0"
        probe.close()
    finally:
        for conn in holders:
            conn.close()
    sample = 'flexwebchat_connections_closed_total{listener="health",reason="unauthenticated"}'
    assert facade.metric(sample) - closed_before == 4


def test_a_revoked_callers_connection_loses_its_standing(
    make_facade, tmp_path: Path, upstream: EmulatorProcess
) -> None:
    facade = with_token(
        make_facade, tmp_path, upstream.url, GRPC_UNAUTHENTICATED_CONNECTION_SECONDS="1"
    )
    tokens = tmp_path / "tokens"
    channel = grpc.insecure_channel(facade.target, options=[("grpc.use_local_subchannel_pool", 1)])
    assert channel.unary_unary(CREATE)(REQUEST.SerializeToString(), metadata=AUTH, timeout=5)
    tokens.write_text("support:tok-support-0123456789abcdef\n")  # billing revoked
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    sample = 'flexwebchat_connections_closed_total{listener="grpc",reason="unauthenticated"}'
    give_up = time.monotonic() + 10
    while facade.metric(sample) == 0 and time.monotonic() < give_up:
        with contextlib.suppress(grpc.RpcError):
            check(b"", timeout=1)  # never idle: only the revocation can close it
        time.sleep(0.3)
    channel.close()
    assert facade.metric(sample) == 1
