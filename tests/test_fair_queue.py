"""Callers served in turn by the upstream rate limit, through the real server (two callers with
bearer tokens, the emulator at Twilio's 5/s): one caller's flood cannot push another caller's call
past its deadline, on one replica or on replicas sharing one Redis budget."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ADDRESS_SID, EmulatorProcess, FacadeProcess, RedisProcess
from flexwebchat.v1 import webchat_pb2

FLOODER = [("authorization", "Bearer tok-billing-0123456789abcdef")]
OTHER = [("authorization", "Bearer tok-support-0123456789abcdef")]


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("billing:tok-billing-0123456789abcdef\nsupport:tok-support-0123456789abcdef\n")
    return path


def request() -> webchat_pb2.CreateWebChatRequest:
    return webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID, request_id=str(uuid.uuid4()))


def flood(facade: FacadeProcess, count: int) -> list[Any]:
    """``count`` calls of the flooding caller, queued at once with long deadlines."""
    return [
        facade.stub.CreateWebChat.future(request(), metadata=FLOODER, timeout=60)
        for _ in range(count)
    ]


def wait_until_draining(upstream: EmulatorProcess, sent: int = 2) -> None:
    """Until the flood is queued and Twilio has seen its first creates."""
    give_up = time.monotonic() + 10
    while len(upstream.requests()) < sent and time.monotonic() < give_up:
        time.sleep(0.05)
    time.sleep(0.2)


def end(calls: list[Any]) -> None:
    for call in calls:
        call.cancel()


def test_a_flood_of_one_caller_leaves_another_callers_turn_one_slot_away(
    make_facade: Any, upstream: EmulatorProcess, tokens: Path
) -> None:
    facade = make_facade(upstream.url, AUTH_TOKENS_FILE=str(tokens))
    queued = flood(facade, 40)  # 8 s of queue at 5/s
    try:
        wait_until_draining(upstream)
        # First come, first served, this call's turn would be 7 s away: refused at once.
        reply = facade.stub.CreateWebChat(request(), metadata=OTHER, timeout=5)
        assert reply.conversation_sid.startswith("CH")
        # The flooder's own next call still queues behind its earlier ones.
        with pytest.raises(grpc.RpcError) as refused:
            facade.stub.CreateWebChat(request(), metadata=FLOODER, timeout=3)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        end(queued)


def test_callers_take_turns_across_replicas_sharing_redis(
    redis_server: RedisProcess, make_facade: Any, upstream: EmulatorProcess, tokens: Path
) -> None:
    # redis_server first: set up first, it is stopped last, after the replicas.
    env = {"AUTH_TOKENS_FILE": str(tokens), "REDIS_URL": redis_server.url}
    replicas = [make_facade(upstream.url, **env), make_facade(upstream.url, **env)]
    # The flooder's calls spread over both replicas (12 s of the shared budget), as a load
    # balancer spreads them.
    queued = flood(replicas[0], 30) + flood(replicas[1], 30)
    try:
        wait_until_draining(upstream)
        for replica in replicas:
            reply = replica.stub.CreateWebChat(request(), metadata=OTHER, timeout=5)
            assert reply.conversation_sid.startswith("CH")
    finally:
        end(queued)
