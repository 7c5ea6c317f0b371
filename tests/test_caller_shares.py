"""One caller's share of a replica, through the real server with two authenticated callers:
whatever billing does with its calls, connections and streams, support is still served, and every
limit billing reaches is answered as the facade's own RESOURCE_EXHAUSTED with a RetryInfo."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ADDRESS_SID, EmulatorProcess, rich_status
from flexwebchat.v1 import webchat_pb2
from google.rpc import error_details_pb2, status_pb2
from rawh2 import RawConnection, grpc_frame

from service.config import Settings

CREATE = "/flexwebchat.v1.WebChatService/CreateWebChat"
TOKENS = {"billing": "tok-billing-0123456789abcdef", "support": "tok-support-0123456789abcdef"}
BILLING = [("authorization", f"Bearer {TOKENS['billing']}")]
SUPPORT = [("authorization", f"Bearer {TOKENS['support']}")]
REQUEST = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID)
EXHAUSTED = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


def two_callers(make_facade: Any, tmp_path: Path, url: str, **env: str) -> Any:
    """A facade with two callers, billing and support, each holding its own token."""
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    return make_facade(url, AUTH_TOKENS_FILE=str(tokens), **env)


def counted(facade: Any, sample: str, value: float) -> bool:
    """Whether ``sample`` reaches ``value`` within a few seconds (a refusal's status can reach
    the caller a moment before it is counted)."""
    give_up = time.monotonic() + 3
    while facade.metric(sample) != value and time.monotonic() < give_up:
        time.sleep(0.05)
    return facade.metric(sample) == value


def reason(trailers: dict[str, str]) -> str:
    """The ErrorInfo reason of a raw stream's trailers, and whether a RetryInfo came with it."""
    raw = trailers["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    found, retry = "", False
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            found = info.reason
        retry = retry or packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    return f"{found}+RetryInfo" if retry else found


def test_the_per_caller_share_defaults_to_a_quarter_of_the_replicas_calls() -> None:
    creds = {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "t"}
    assert Settings.from_env(creds).max_concurrent_rpcs_per_caller == 64
    env = {**creds, "GRPC_MAX_CONCURRENT_RPCS": "10"}
    assert Settings.from_env(env).max_concurrent_rpcs_per_caller == 2
    env = {**creds, "GRPC_MAX_CONCURRENT_RPCS": "3"}
    assert Settings.from_env(env).max_concurrent_rpcs_per_caller == 1


def test_one_caller_cannot_hold_every_call_slot(
    make_facade: Any, tmp_path: Path, upstream: EmulatorProcess
) -> None:
    """billing opens every slot's worth of calls that never send their message: past its share
    (a quarter) it alone is refused, at once, and support is served."""
    facade = two_callers(
        make_facade,
        tmp_path,
        upstream.url,
        GRPC_MAX_CONCURRENT_RPCS="8",
        GRPC_REQUEST_MESSAGE_TIMEOUT_SECONDS="20",
    )
    conn = RawConnection(facade.port)
    try:
        held = [conn.open(CREATE, metadata=BILLING, end_stream=False) for _ in range(8)]
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up and sum(s in conn.ended for s in held) < 6:
            conn.pump(0.05)
        refused = [conn.ended[s] for s in held if s in conn.ended]
        assert [t.get("grpc-status") for t in refused] == [EXHAUSTED] * 6  # 2 still wait
        assert {reason(t) for t in refused} == {"CALLER_CONCURRENCY_LIMIT+RetryInfo"}

        for _ in range(3):  # support still gets in, while billing's two calls wait
            reply = facade.stub.CreateWebChat(REQUEST, metadata=SUPPORT, timeout=10)
            assert reply.conversation_sid.startswith("CH")
        with pytest.raises(grpc.RpcError) as caught:  # billing, with a standard client
            facade.stub.CreateWebChat(REQUEST, metadata=BILLING, timeout=10)
        status = rich_status(caught.value)
        assert status["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status["ErrorInfo"].reason == "CALLER_CONCURRENCY_LIMIT"
        assert status["RetryInfo"].retry_delay.seconds == 1
        assert "GRPC_MAX_CONCURRENT_RPCS_PER_CALLER" in status["message"]
        labels = 'caller="billing",code="RESOURCE_EXHAUSTED",method="CreateWebChat"'
        assert counted(facade, f"flexwebchat_rpcs_total{{{labels}}}", 7)
    finally:
        conn.close()
    # Billing's held calls end with their connection; its share comes back.
    give_up = time.monotonic() + 10
    while facade.metric("flexwebchat_rpcs_in_flight") and time.monotonic() < give_up:
        time.sleep(0.05)
    assert facade.stub.CreateWebChat(REQUEST, metadata=BILLING, timeout=10).conversation_sid
    support = 'flexwebchat_rpcs_total{caller="support",code="OK",method="CreateWebChat"}'
    assert counted(facade, support, 3)


def test_without_caller_auth_one_caller_may_use_every_slot(
    make_facade: Any, unlimited_upstream: EmulatorProcess
) -> None:
    """With caller auth off every call is anonymous's: there is no one else to share with."""
    facade = make_facade(
        unlimited_upstream.url, FLEX_RATE_LIMIT_RPS="0", GRPC_MAX_CONCURRENT_RPCS="8"
    )
    unlimited_upstream.fault(latency=0.5)
    calls = [facade.stub.CreateWebChat.future(REQUEST, timeout=10) for _ in range(8)]
    assert all(call.result().conversation_sid.startswith("CH") for call in calls)


def test_a_thousand_calls_on_one_channel_wait_for_their_streams(
    make_facade: Any, tmp_path: Path, unlimited_upstream: EmulatorProcess
) -> None:
    """A standard grpcio channel asking for 1000 calls at once, ten times the streams a
    connection may hold, with every cap of the facade lifted: the client waits for streams and
    every call is served; none is refused by HTTP/2 ("Stream removed")."""
    lifted = "2000"
    facade = two_callers(
        make_facade,
        tmp_path,
        unlimited_upstream.url,
        FLEX_RATE_LIMIT_RPS="0",
        GRPC_MAX_CONCURRENT_RPCS=lifted,
        GRPC_MAX_CONCURRENT_RPCS_PER_CALLER=lifted,
        FLEX_MAX_PENDING_PER_CALLER=lifted,
    )
    unlimited_upstream.fault(latency=0.1)
    with grpc.insecure_channel(facade.target) as channel:
        create = channel.unary_unary(CREATE)
        billing = [
            create.future(REQUEST.SerializeToString(), metadata=BILLING, timeout=60)
            for _ in range(1000)
        ]
        support = facade.stub.CreateWebChat(REQUEST, metadata=SUPPORT, timeout=60)
        outcomes: dict[str, int] = {}
        for call in billing:
            try:
                call.result()
                code = "OK"
            except grpc.RpcError as error:
                code = f"{error.code().name}: {error.details()}"
            outcomes[code] = outcomes.get(code, 0) + 1
    assert outcomes == {"OK": 1000}
    assert support.conversation_sid.startswith("CH")


def test_a_client_within_the_advertised_streams_is_never_refused(
    make_facade: Any, tmp_path: Path, unlimited_upstream: EmulatorProcess
) -> None:
    """A client that keeps exactly to SETTINGS_MAX_CONCURRENT_STREAMS and opens the next stream
    the moment one ends (as grpc-java does): no stream is reset, and where billing reaches its
    share of the replica, the answer is the facade's own, with a RetryInfo, counted."""
    facade = two_callers(make_facade, tmp_path, unlimited_upstream.url, FLEX_RATE_LIMIT_RPS="0")
    unlimited_upstream.fault(latency=0.05)
    body = grpc_frame(REQUEST.SerializeToString())
    conn = RawConnection(facade.port)
    try:
        limit = conn.advertised_streams()
        opened: list[int] = []
        give_up = time.monotonic() + 60
        while len(conn.ended) < 600 and time.monotonic() < give_up:
            while len(opened) < 600 and conn.conn.open_outbound_streams < limit:
                opened.append(conn.open(CREATE, metadata=BILLING, body=body))
            conn.pump(0.02)
        reply = facade.stub.CreateWebChat(REQUEST, metadata=SUPPORT, timeout=10)
        assert reply.conversation_sid.startswith("CH")
    finally:
        conn.close()
    assert conn.resets == {}
    assert len(conn.ended) == 600
    outcomes = [
        (t.get("grpc-status"), reason(t) if t.get("grpc-status") != "0" else "")
        for t in conn.ended.values()
    ]
    refused = outcomes.count((EXHAUSTED, "CALLER_CONCURRENCY_LIMIT+RetryInfo"))
    assert outcomes.count(("0", "")) + refused == 600
    labels = 'caller="billing",code="RESOURCE_EXHAUSTED",method="CreateWebChat"'
    assert counted(facade, f"flexwebchat_rpcs_total{{{labels}}}", refused)


def test_a_caller_past_its_connections_loses_its_oldest_idle_ones_first() -> None:
    """The sweep's decisions: billing holds four connections with a share of two; its two oldest
    idle ones are closed (one older is busy: kept), support's one is not. A connection is its
    first caller's, whoever calls on it later."""
    from service.connections import ConnectionShares, UnauthenticatedConnections

    sweep = UnauthenticatedConnections(
        set(), grace=1.0, per_peer=8, shares=ConnectionShares(per_caller=2, max_connections=100)
    )
    owners = {1: "billing", 2: "billing", 3: "billing", 4: "support", 5: "billing"}
    marks = {}
    start = time.monotonic()
    live: dict[tuple[str, int], int] = {}
    for port, owner in owners.items():  # one a second: port 1 is the oldest
        marks[port] = sweep.call_started(f"ipv4:10.0.0.7:{port}", owner)
        later = sweep.call_started(f"ipv4:10.0.0.7:{port}", "support")  # not the owner
        sweep.call_ended(later)
        live[("10.0.0.7", port)] = port
        sweep.to_close(start + port, live, start + port)
    for port, mark in marks.items():
        if port != 1:  # port 1's call is still running
            sweep.call_ended(mark)
    close, _ = sweep.to_close(start + 10, live, start + 10)
    assert close == {("10.0.0.7", 2): "per_caller", ("10.0.0.7", 3): "per_caller"}


def test_room_is_kept_for_a_caller_not_yet_connected() -> None:
    """Callers' connections may fill nine tenths of GRPC_MAX_CONNECTIONS: past that, the oldest
    idle connection of the caller holding the most is closed, one at a time."""
    from service.connections import ConnectionShares, UnauthenticatedConnections

    sweep = UnauthenticatedConnections(
        set(), grace=1.0, per_peer=8, shares=ConnectionShares(per_caller=100, max_connections=10)
    )
    start = time.monotonic()
    live: dict[tuple[str, int], int] = {}
    for port in range(1, 11):  # billing 1-7, support 8-10: all ten slots
        caller = "billing" if port <= 7 else "support"
        sweep.call_ended(sweep.call_started(f"ipv4:10.0.0.7:{port}", caller))
        live[("10.0.0.7", port)] = port
        sweep.to_close(start + port, live, start + port)
    close, _ = sweep.to_close(start + 20, live, start + 20)
    assert close == {("10.0.0.7", 1): "headroom"}


def _connect_each(target: str, count: int, metadata: Any) -> list[grpc.Channel]:
    """``count`` channels, each on a connection of its own, each having made one cheap
    authenticated call (a refresh of a token the facade cannot verify: no upstream)."""
    channels = []
    for _ in range(count):
        channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        refresh = channel.unary_unary("/flexwebchat.v1.WebChatService/RefreshGuestToken")
        with pytest.raises(grpc.RpcError) as caught:
            refresh(b"", metadata=metadata, timeout=10, wait_for_ready=True)
        assert caught.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED
        channels.append(channel)
    return channels


def _newcomer_served(facade: Any, metadata: Any) -> bool:
    channel = grpc.insecure_channel(facade.target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        create = channel.unary_unary(CREATE)
        create(REQUEST.SerializeToString(), metadata=metadata, timeout=8, wait_for_ready=True)
        return True
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return False
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("per_caller", "reason"), [("4", "per_caller"), ("100", "headroom")], ids=["share", "room"]
)
def test_one_caller_cannot_fill_the_replicas_connections(
    make_facade: Any, tmp_path: Path, upstream: EmulatorProcess, per_caller: str, reason: str
) -> None:
    """billing opens every connection the replica accepts, each idle after one call. Past its
    share (or, within it, past the room kept for newcomers) its oldest idle connections are
    closed, so support, connecting later, gets in."""
    facade = two_callers(
        make_facade,
        tmp_path,
        upstream.url,
        GRPC_MAX_CONNECTIONS="20",
        GRPC_MAX_CONNECTIONS_PER_CALLER=per_caller,
    )
    billing = _connect_each(facade.target, 20, BILLING)
    try:
        assert _newcomer_served(facade, SUPPORT)
    finally:
        for channel in billing:
            channel.close()
    closed = f'flexwebchat_connections_closed_total{{listener="grpc",reason="{reason}"}}'
    assert facade.metric(closed) >= (16 if reason == "per_caller" else 2)
    assert "closed idle connections of callers past their share" in facade.logs()
