"""``make bench``: the facade next to twilio-python, measured in the same run, on loopback.

1. Cost and latency of one CreateWebChat through the facade (limits off), 1 and 50 at a time,
   beside twilio-python's ``web_channels.create()`` called directly, against the same emulator.
2. 30 simultaneous chats against Twilio's 5 requests/second limit (the emulator enforces it):
   30 threads calling twilio-python directly, beside 30 callers going through the facade.

Loops are bounded; every process started here is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from emulator.app import ACCOUNT_SID, AUTH_TOKEN
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

CALLS = int(os.environ.get("BENCH_CALLS", "400"))
BURST = 30
REQUEST = webchat_pb2.CreateWebChatRequest(
    address_sid=ADDRESS_SID, customer_friendly_name="Ada", pre_engagement_data='{"topic": "bench"}'
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def facade_calls(target: str, calls: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = webchat_pb2_grpc.WebChatServiceStub(channel)
        await stub.CreateWebChat(REQUEST, timeout=10)  # warm-up: connection + first upstream call
        queue = iter(range(calls))

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                await stub.CreateWebChat(REQUEST, timeout=10)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return latencies


def twilio_client(emulator: EmulatorProcess) -> Client:
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.flex_api.base_url = emulator.url
    return client


def twilio_create(client: Client) -> None:
    client.flex_api.v2.web_channels.create(
        address_sid=ADDRESS_SID,
        customer_friendly_name="Ada",
        pre_engagement_data='{"topic": "bench"}',
    )


def row(name: str, latencies: list[float], wall: float, cpu_ms: float | None) -> str:
    ms = [v * 1000 for v in latencies]
    cpu = f"{cpu_ms:8.2f}" if cpu_ms is not None else "       -"
    return (
        f"{name:<44} {len(ms) / wall:8.0f} {statistics.median(ms):8.2f} "
        f"{percentile(ms, 99):8.2f} {cpu}"
    )


def cost_and_latency(workdir: Path) -> list[str]:
    emulator = start_emulator(rate_limit=0)
    facade = start_facade(
        facade_env(emulator.url, FLEX_RATE_LIMIT_RPS="0", LOG_LEVEL="WARNING"), workdir / "f.log"
    )
    lines = []
    try:
        for concurrency in (1, 50):
            before, started = cpu_seconds(facade.proc.pid), time.perf_counter()
            latencies = asyncio.run(facade_calls(facade.target, CALLS, concurrency))
            wall = time.perf_counter() - started
            cpu_ms = (cpu_seconds(facade.proc.pid) - before) * 1000 / (CALLS + 1)
            lines.append(row(f"facade gRPC, {concurrency} at a time", latencies, wall, cpu_ms))
        client = twilio_client(emulator)
        twilio_create(client)  # warm-up
        latencies = []
        cpu_before, started = time.process_time(), time.perf_counter()
        for _ in range(CALLS):
            t0 = time.perf_counter()
            twilio_create(client)
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        cpu_ms = (time.process_time() - cpu_before) * 1000 / CALLS
        lines.append(row("twilio-python direct (sync), 1 at a time", latencies, wall, cpu_ms))
    finally:
        facade.stop()
        stop_process(emulator.proc)
    return lines


def account_limit(workdir: Path) -> list[str]:
    emulator = start_emulator(rate_limit=5)
    lines = []
    try:
        client = twilio_client(emulator)

        def direct(_: int) -> str:
            try:
                twilio_create(client)
                return "ok"
            except TwilioRestException as exc:
                return str(exc.status)

        started = time.perf_counter()
        with ThreadPoolExecutor(BURST) as pool:
            outcomes = list(pool.map(direct, range(BURST)))
        wall = time.perf_counter() - started
        lines.append(burst_row("twilio-python direct, 30 threads", outcomes, wall, emulator))

        redis = start_redis()
        try:
            for name, replicas, extra in (
                ("facade, 1 replica, 30 callers", 1, {}),
                ("facade, 2 replicas + Redis, 30 callers", 2, {"REDIS_URL": redis.url}),
            ):
                time.sleep(1.5)  # let the emulator's bucket refill
                emulator.reset()
                facades = [
                    start_facade(
                        facade_env(emulator.url, LOG_LEVEL="WARNING", **extra),
                        workdir / f"{replicas}-{i}.log",
                    )
                    for i in range(replicas)
                ]
                try:
                    outcomes, wall = facade_burst(facades)
                finally:
                    for facade in facades:
                        facade.stop()
                lines.append(burst_row(name, outcomes, wall, emulator))
        finally:
            stop_process(redis.proc)
    finally:
        stop_process(emulator.proc)
    return lines


def facade_burst(facades: list[FacadeProcess]) -> tuple[list[str], float]:
    def call(i: int) -> str:
        try:
            facades[i % len(facades)].stub.CreateWebChat(REQUEST, timeout=30)
            return "ok"
        except grpc.RpcError as exc:
            return exc.code().name

    started = time.perf_counter()
    with ThreadPoolExecutor(BURST) as pool:
        outcomes = list(pool.map(call, range(BURST)))
    return outcomes, time.perf_counter() - started


def burst_row(name: str, outcomes: list[str], wall: float, emulator: EmulatorProcess) -> str:
    ok = outcomes.count("ok")
    seen_429 = sum(1 for r in emulator.requests() if r["status"] == 429)
    busiest = emulator.busiest_second()
    return f"{name:<44} {ok:>5}/{len(outcomes)} {seen_429:>10} {wall:9.2f} {busiest:>9}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print(
            f"1. One CreateWebChat, {CALLS} calls after warm-up (emulator on loopback, limits off)"
        )
        print(f"{'':<44} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>8}")
        for line in cost_and_latency(workdir):
            print(line, flush=True)
        print("   CPU ms: per call, of the facade process (facade rows) or of the calling process")
        print()
        print("2. 30 simultaneous chats against Twilio's limit of 5 requests/second")
        print(f"{'':<44} {'created':>9} {'429s sent':>10} {'wall s':>9} {'max/1s':>9}")
        for line in account_limit(workdir):
            print(line, flush=True)
        print("   max/1s: requests the emulator saw in the busiest second, refused included")


if __name__ == "__main__":
    main()
