"""One request_id, one conversation, in every failure; and no orphans without one.

Each test counts what Twilio (the emulator) holds: the conversations it created, per guest
identity, which the facade derives from the request_id when the caller gives none.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import redis
from conftest import EmulatorProcess, FacadeProcess, RedisProcess, rich_status

from emulator.app import ACCOUNT_SID
from emulator.harness import guest_env

# Short timeouts keep the tests quick: a lost answer settles after 2 attempt timeouts (1 s).
FAST = {"FLEX_ATTEMPT_TIMEOUT_SECONDS": "0.5", "IDEMPOTENCY_LOCK_SECONDS": "1"}
CREATE = "/v2/WebChats"  # a fault for the create only, not the lookups around it


def per_identity(upstream: EmulatorProcess) -> Counter[str]:
    return Counter(upstream.conversations().values())


@pytest.fixture
def keyed(make_facade: Any, upstream: EmulatorProcess) -> FacadeProcess:
    return make_facade(upstream.url, **guest_env(upstream.url), **FAST)  # type: ignore[no-any-return]


def test_a_caller_that_gave_up_and_retried_gets_the_one_conversation(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    keyed = make_facade(upstream.url, **guest_env(upstream.url))
    upstream.fault(latency=1.0)
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as gave_up:
        keyed.create(request_id=request_id, timeout=0.4)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    again = keyed.create(request_id=request_id, timeout=5)  # waits for the request in flight
    assert upstream.conversations() == {again.conversation_sid: again.identity}


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500, "after": True},
        {"status": 502, "after": True},
        {"status": 504, "after": True},
        {"drop": True, "after": True},
    ],
)
def test_a_create_whose_answer_was_lost_is_found_not_repeated(
    keyed: FacadeProcess, upstream: EmulatorProcess, fault: dict[str, Any]
) -> None:
    upstream.fault({**fault, "path": CREATE})  # Twilio created it, then the answer was lost
    reply = keyed.create(request_id=str(uuid.uuid4()), initial_message="hello")
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}
    assert reply.initial_message_sid.startswith("IM")  # never posted before: posted once now
    paths = [r["path"] for r in upstream.requests()]
    # Looked (an id without a record), created, lost the answer, looked again: found.
    assert paths.count("/v2/WebChats") == 1 and sum("/Users/" in p for p in paths) == 2


@pytest.mark.parametrize("fault", [{"status": 502}, {"drop": True}])
def test_a_create_that_did_not_happen_is_resent_once_it_has_settled(
    keyed: FacadeProcess, upstream: EmulatorProcess, fault: dict[str, Any]
) -> None:
    upstream.fault({**fault, "path": CREATE})  # refused before creating anything
    reply = keyed.create(request_id=str(uuid.uuid4()), timeout=5)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}
    paths = [r["path"] for r in upstream.requests()]
    # Looked before the first create; then looked, waited for it to settle, looked again, re-sent.
    assert paths.count("/v2/WebChats") == 2 and sum("/Users/" in p for p in paths) == 3


def test_read_timeouts_then_the_callers_retry_make_one_conversation(
    keyed: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault(latency=0.8)  # every answer comes after the 0.5 s attempt timeout
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as first:
        keyed.create(request_id=request_id, timeout=1.5)
    assert first.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    upstream.fault(latency=0.0)
    time.sleep(1.2)  # what the RetryInfo asks for
    reply = keyed.create(request_id=request_id, timeout=5)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}


def test_an_unusable_2xx_is_recorded_and_never_reposted(
    keyed: FacadeProcess, upstream: EmulatorProcess
) -> None:
    upstream.fault({"status": 201, "body": "not json", "after": True, "path": CREATE})
    request_id = str(uuid.uuid4())
    codes = []
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as caught:
            keyed.create(request_id=request_id)
        codes.append(caught.value.code())
    assert codes == [grpc.StatusCode.INTERNAL] * 2
    assert len(upstream.conversations()) == 1
    assert [r["path"] for r in upstream.requests()].count("/v2/WebChats") == 1


def test_short_deadlines_under_load_make_one_conversation_per_id(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url, **guest_env(upstream.url), **FAST)
    upstream.fault(latency=0.4)
    ids = [str(uuid.uuid4()) for _ in range(20)]

    def call_until_done(request_id: str) -> str:
        for _ in range(15):
            try:
                return facade.create(request_id=request_id, timeout=2).conversation_sid
            except grpc.RpcError:
                time.sleep(0.3)
        raise AssertionError(f"{request_id} never completed")

    with ThreadPoolExecutor(20) as pool:
        delivered = list(pool.map(call_until_done, ids))
    assert len(set(delivered)) == 20
    assert set(per_identity(upstream).values()) == {1}
    assert sorted(upstream.conversations()) == sorted(delivered)


def test_two_replicas_a_retry_on_the_other_one_gets_the_same_conversation(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    env = {**guest_env(upstream.url), **FAST, "REDIS_URL": redis_server.url}
    replicas = [make_facade(upstream.url, **env), make_facade(upstream.url, **env)]
    gave_up_id, lost_id = str(uuid.uuid4()), str(uuid.uuid4())
    upstream.fault({"latency": 0.4, "path": CREATE})
    with pytest.raises(grpc.RpcError):
        replicas[0].create(request_id=gave_up_id, timeout=0.2)
    on_b = replicas[1].create(request_id=gave_up_id, timeout=5)  # waits for A's request
    upstream.fault({"status": 502, "after": True, "path": CREATE})
    lost = replicas[0].create(request_id=lost_id, timeout=5)  # 502 after creating: found
    again = replicas[1].create(request_id=lost_id, timeout=5)
    assert again.conversation_sid == lost.conversation_sid
    assert sorted(upstream.conversations()) == sorted(
        [on_b.conversation_sid, lost.conversation_sid]
    )


def test_a_replica_that_dies_mid_create_leaves_one_conversation(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    env = {**guest_env(upstream.url), **FAST, "REDIS_URL": redis_server.url}
    doomed, survivor = make_facade(upstream.url, **env), make_facade(upstream.url, **env)
    upstream.fault(latency=0.3)
    request_id = str(uuid.uuid4())
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(doomed.create, request_id=request_id, timeout=5)
        time.sleep(0.15)  # the create is at Twilio now
        doomed.proc.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError):
            call.result()
    upstream.fault(latency=0.0)
    time.sleep(1.1)  # the dead replica's lock expires
    reply = survivor.create(request_id=request_id, timeout=5)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}


def test_the_drain_waits_for_a_request_whose_caller_left(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url, SHUTDOWN_GRACE_SECONDS="0.2")
    upstream.fault(latency=1.0)
    with pytest.raises(grpc.RpcError):
        facade.create(timeout=0.3)
    assert facade.stop() == 0
    # The request was answered (not cut off), and its conversation is reported as an orphan.
    assert [r["status"] for r in upstream.requests()] == [201]
    orphan = [line for line in facade.log_lines() if "had left" in line["msg"]]
    assert orphan and orphan[0]["conversation_sid"] in upstream.conversations()


def test_a_warm_burst_of_short_deadlines_orphans_nothing(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(
        upstream.url, FLEX_LATENCY_ESTIMATE_SECONDS="0.05", FLEX_RATE_LIMIT_RPS="50"
    )
    upstream.fault(latency=0.3)
    with ThreadPoolExecutor(5) as pool:  # warm the estimate: 25 observed creates
        list(pool.map(lambda _: facade.create(timeout=5), range(25)))
    upstream.reset()
    upstream.fault(latency=0.3)

    def call(_: int) -> grpc.RpcError | str:
        try:
            return facade.create(timeout=1.5).conversation_sid  # type: ignore[no-any-return]
        except grpc.RpcError as error:
            return error

    # 50/s in the facade, but the emulator allows 5/s: most callers wait, or are refused.
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(call, range(30)))
    delivered = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if not isinstance(r, str)]
    time.sleep(1.0)  # anything still in flight lands
    assert sorted(upstream.conversations()) == sorted(delivered)
    assert facade.metric("flexwebchat_orphaned_conversations_total") == 0
    for error in refused:
        assert error.code() in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNAVAILABLE,
        ), rich_status(error)


def test_the_drain_waits_for_a_request_whose_caller_is_still_waiting(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url, SHUTDOWN_GRACE_SECONDS="0.3")
    upstream.fault(latency=1.5)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(facade.create, timeout=10)
        time.sleep(0.3)  # the create is at Twilio
        facade.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError):
            call.result()  # the grace is shorter than Twilio's answer
    assert facade.proc.wait(10) == 0
    assert [r["status"] for r in upstream.requests()] == [201]  # answered, not cut off
    orphan = [line for line in facade.log_lines() if "had left" in line["msg"]]
    assert orphan and orphan[0]["conversation_sid"] in upstream.conversations()


def test_a_caller_that_gave_up_still_gets_its_first_message_posted(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url, **guest_env(upstream.url))
    upstream.fault(latency=0.6)  # the create; the message that follows answers at once
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError):
        facade.create(request_id=request_id, initial_message="hello", timeout=0.4)
    again = facade.create(request_id=request_id, initial_message="hello", timeout=5)
    assert again.initial_message_sid.startswith("IM")  # recorded as if the caller had waited
    assert [r["path"] for r in upstream.requests()].count(
        f"/v1/Conversations/{again.conversation_sid}/Messages"
    ) == 1


def test_a_deadline_that_fits_the_create_but_not_its_first_message_sends_nothing(
    keyed: FacadeProcess, upstream: EmulatorProcess
) -> None:
    # Estimates start at 0.1 s (the test default): 0.16 s needed per request, 0.32 s for both.
    with pytest.raises(grpc.RpcError) as refused:
        keyed.create(initial_message="hello", timeout=0.25)
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert upstream.requests() == []
    assert keyed.create(timeout=0.25).conversation_sid  # without a message it fits


def test_work_that_outlived_its_callers_counts_against_their_quota(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    facade = make_facade(upstream.url, FLEX_MAX_PENDING_PER_CALLER="2")
    upstream.fault(latency=1.5)
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            facade.create(timeout=0.3)  # the caller leaves; its create stays in flight
    with pytest.raises(grpc.RpcError) as refused:
        facade.create(timeout=5)
    status = rich_status(refused.value)
    assert status["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status["ErrorInfo"].reason == "CALLER_QUOTA" and "RetryInfo" in status
    time.sleep(1.5)  # the two creates land: the quota is free again
    upstream.fault(latency=0.0)
    assert facade.create(timeout=5).conversation_sid


def test_callers_that_leave_the_rate_limit_queue_give_their_quota_back(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    """A call waiting for its turn holds a place in its caller's quota; refused while it
    waits (or cancelled: the same path), it gives the place back, having sent nothing."""
    facade = make_facade(upstream.url, FLEX_MAX_PENDING_PER_CALLER="2", FLEX_RATE_LIMIT_RPS="0.5")
    assert facade.create(timeout=5).conversation_sid  # takes the slot: the next is 2 s away
    for _ in range(3):  # more than the quota: each is refused for the rate, not the quota
        with pytest.raises(grpc.RpcError) as refused:
            facade.create(timeout=1.0)
        assert rich_status(refused.value)["ErrorInfo"].reason != "CALLER_QUOTA"
    assert len(upstream.requests()) == 1
    assert facade.create(timeout=5).conversation_sid  # every place was given back


@pytest.mark.parametrize(
    "forged",
    [b"inf", b"1e400", b"9999999999999", b"not a time", ["a list"]],
    ids=["inf", "1e400", "far ahead", "not a time", "a list"],
)
def test_a_forged_sent_mark_in_redis_delays_an_id_briefly_never_for_good(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess, forged: Any
) -> None:
    env = {**guest_env(upstream.url), **FAST, "REDIS_URL": redis_server.url}
    facade = make_facade(upstream.url, **env)
    request_id = str(uuid.uuid4())
    client = redis.Redis(port=redis_server.port)
    key = f"flexwebchat:{ACCOUNT_SID.lower()}:sent:{request_id}"
    if isinstance(forged, list):
        client.rpush(key, *forged)
    else:
        client.set(key, forged)  # no expiry, like the list
    # Read as "sent just now" once: a caller whose deadline cannot wait the settle time (1 s
    # here) is told when to retry, and the retry is not put off again.
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(request_id=request_id, timeout=0.5)
    status = rich_status(caught.value)
    assert status["code"] == grpc.StatusCode.UNAVAILABLE and "RetryInfo" in status
    assert client.pttl(key) > 0  # rewritten as a readable mark, with an expiry
    time.sleep(1.0)
    reply = facade.create(request_id=request_id, timeout=2)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}
