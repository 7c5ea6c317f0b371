"""Callers served in turn by the upstream rate limit, through the real server (two callers with
bearer tokens, the emulator at Twilio's 5/s): one caller's flood cannot push another caller's call
past its deadline, on one replica or on replicas sharing one Redis budget."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from conftest import ADDRESS_SID, EmulatorProcess, FacadeProcess, RedisProcess
from flexwebchat.v1 import webchat_pb2

from service.shared import RedisSchedule

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
        # A retry waiting on its caller's earlier call with the same request_id is answered
        # when that call's turn comes, which is the caller's own, not after the flood.
        same = request()
        earlier = facade.stub.CreateWebChat.future(same, metadata=OTHER, timeout=60)
        retry = facade.stub.CreateWebChat(same, metadata=OTHER, timeout=5)
        assert retry.conversation_sid == earlier.result().conversation_sid
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


def test_turns_are_the_callers_across_replicas_not_the_replicas(
    redis_server: RedisProcess, make_facade: Any, upstream: EmulatorProcess, tokens: Path
) -> None:
    """The flooder on both replicas, the other caller on one: the other caller gets every other
    slot of the shared budget, not every other slot of its replica's half."""
    env = {"AUTH_TOKENS_FILE": str(tokens), "REDIS_URL": redis_server.url}
    replicas = [make_facade(upstream.url, **env), make_facade(upstream.url, **env)]
    queued = flood(replicas[0], 30) + flood(replicas[1], 30)
    try:
        wait_until_draining(upstream)
        # Six calls at once: about twelve slots away in turn (2.5 s); a quarter of the slots
        # would take them 5 s, past their deadline.
        calls = [
            replicas[1].stub.CreateWebChat.future(request(), metadata=OTHER, timeout=4)
            for _ in range(6)
        ]
        assert all(call.result().conversation_sid.startswith("CH") for call in calls)
    finally:
        end(queued)


async def test_a_slot_kept_for_a_caller_in_turn_goes_on_when_its_replica_does_not_ask(
    redis_server: RedisProcess,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    schedule = RedisSchedule(client, "flexwebchat:{test}:ratelimit", 5, 1)
    try:
        assert await schedule.take(["b"]) == (0, "b")
        # Another replica's caller, never served, waits for the next slot, then its replica
        # stops asking (stopped, or too loaded to ask in time).
        wait, turn = await schedule.take(["ghost"])
        assert wait > 0 and turn == ""
        await asyncio.sleep(wait)
        wait, turn = await schedule.take(["b"])
        assert turn == "" and schedule.contenders == 2, "the due slot is kept for ghost a while"
        await asyncio.sleep(wait)
        assert await schedule.take(["b"]) == (0, "b"), "then it goes to the caller that asked"
    finally:
        await client.aclose()
