"""``make bench`` section 11: a second caller's wait while a first caller floods the rate limit.

Caller ``billing`` queues FLOOD calls at once (60 s deadlines: 12.6 s of queue at 5/s); while they
wait, caller ``support`` makes SECOND_CALLS calls one after the other (30 s deadlines) and each
call's latency is its wait for a slot plus one create. Against the emulator at Twilio's 5/s:

* one replica, callers authenticated by bearer token: the callers take turns;
* two replicas sharing Redis, the flood spread over both, the second caller on one of them;
* both again with caller authentication off: the facade then sees one caller, ``anonymous``, and
  serves it first come, first served, so the second caller waits behind the whole flood.

Expected with turns: about one slot interval per caller with calls queued (2 x 0.21 s).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc

from emulator.harness import (
    ADDRESS_SID,
    EmulatorProcess,
    FacadeProcess,
    facade_env,
    start_emulator,
    start_facade,
    start_redis,
    stop_process,
)

Row = dict[str, Any]

FLOOD = 60
SECOND_CALLS = 10
FLOODER = (("authorization", "Bearer tok-billing-0123456789abcdef"),)
SECOND = (("authorization", "Bearer tok-support-0123456789abcdef"),)
SLOT = 1.05 / 5  # the facade's slot interval at the default 5/s


def request() -> webchat_pb2.CreateWebChatRequest:
    return webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID, request_id=str(uuid.uuid4()))


async def flood_then_measure(
    targets: list[str], second_target: str, authenticated: bool, emulator: EmulatorProcess
) -> list[float]:
    """The second caller's latencies, one call after the other, while the flood waits."""
    channels = {target: grpc.aio.insecure_channel(target) for target in targets}
    stubs = {target: webchat_pb2_grpc.WebChatServiceStub(ch) for target, ch in channels.items()}
    flooder = FLOODER if authenticated else ()
    second = SECOND if authenticated else ()
    try:
        flood = [
            asyncio.ensure_future(
                stubs[targets[i % len(targets)]].CreateWebChat(
                    request(), metadata=flooder, timeout=60
                )
            )
            for i in range(FLOOD)
        ]
        for _ in range(200):  # until every flood call is queued and the first ones sent
            if len(emulator.requests()) >= 2:
                break
            await asyncio.sleep(0.05)
        latencies = []
        for _ in range(SECOND_CALLS):
            started = time.perf_counter()
            await stubs[second_target].CreateWebChat(request(), metadata=second, timeout=30)
            latencies.append(time.perf_counter() - started)
        for call in flood:
            call.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        return latencies
    finally:
        await asyncio.gather(*[channel.close() for channel in channels.values()])


def measure(
    workdir: Path, emulator: EmulatorProcess, replicas: int, authenticated: bool
) -> list[float]:
    emulator.reset()
    tokens = workdir / "fairness-tokens"
    tokens.write_text(
        "billing:tok-billing-0123456789abcdef\nsupport:tok-support-0123456789abcdef\n"
    )
    env: dict[str, str] = {"LOG_LEVEL": "WARNING"}
    if authenticated:
        env["AUTH_TOKENS_FILE"] = str(tokens)
    redis = start_redis() if replicas > 1 else None
    if redis is not None:
        env["REDIS_URL"] = redis.url
    facades: list[FacadeProcess] = []
    try:
        for n in range(replicas):
            log = workdir / f"fairness-{replicas}-{authenticated}-{n}.log"
            facades.append(start_facade(facade_env(emulator.url, **env), log))
        targets = [facade.target for facade in facades]
        return asyncio.run(flood_then_measure(targets, targets[-1], authenticated, emulator))
    finally:
        for facade in facades:
            facade.stop()
        if redis is not None:
            stop_process(redis.proc)


def rows(workdir: Path) -> list[Row]:
    emulator = start_emulator(rate_limit=5.0)
    result = []
    try:
        for replicas in (1, 2):
            for authenticated in (True, False):
                latencies = measure(workdir, emulator, replicas, authenticated)
                result.append(
                    {
                        "name": (
                            f"{replicas} replica{'s on Redis' if replicas > 1 else ''}, "
                            + ("callers take turns" if authenticated else "one caller (auth off)")
                        ),
                        "replicas": replicas,
                        "callers_authenticated": authenticated,
                        "first_wait_s": round(latencies[0], 3),
                        "median_wait_s": round(statistics.median(latencies), 3),
                        "max_wait_s": round(max(latencies), 3),
                        "waits_s": [round(v, 3) for v in latencies],
                    }
                )
                print(format_row(result[-1]), flush=True)
    finally:
        stop_process(emulator.proc)
    return result


def print_header() -> None:
    print(
        f"11. A second caller's wait while a first caller floods: {FLOOD} calls queued at once "
        f"({FLOOD * SLOT:.1f} s at 5/s),"
    )
    print(
        f"    then {SECOND_CALLS} calls of the second caller one after the other; "
        f"expected with turns: 2 callers x {SLOT:.2f} s"
    )
    print(f"{'':<44} {'first s':>8} {'median s':>9} {'max s':>8}")


def format_row(r: Row) -> str:
    return (
        f"{r['name']:<44} {r['first_wait_s']:8.2f} {r['median_wait_s']:9.2f} {r['max_wait_s']:8.2f}"
    )


def print_footer() -> None:
    print("    wait: a call's latency, its wait for a slot plus one create (milliseconds)")
    print("    one caller (auth off): every call is 'anonymous', first come, first served: the")
    print("    first call waits out the flood, and the later ones find the queue empty")
    print()
