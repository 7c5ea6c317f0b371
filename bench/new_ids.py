"""``make bench`` section 12: what looking before the first create costs per new request_id.

With the conversations service set and the identity left to the facade, every request_id that has
no record is looked up (``GET /v1/Services/{IS}/Users/{identity}/Conversations``) before its first
create, because a missing record proves nothing (a flushed, evicted or restarted Redis). Beside it,
the same facade setup without the conversations service: no lookup, the create alone. Both with
their records in one Redis, a fresh request_id per call, one call at a time, in interleaved rounds,
against the emulator on loopback (limits off), and again with the emulator answering every request
after UPSTREAM_LATENCY, as a nearby Twilio would: on loopback the row shows the facade's own cost
(CPU, one more local round trip); with latency, what a caller waits for the extra request.
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

from bench.cpu import cpu_seconds
from emulator.harness import (
    ADDRESS_SID,
    FacadeProcess,
    facade_env,
    guest_env,
    start_emulator,
    start_facade,
    start_redis,
    stop_process,
)

Row = dict[str, Any]

UPSTREAM_LATENCY = 0.05  # seconds: a Twilio region near the facade
LATENT_CALLS = 40  # per round, with latency (each call waits for one or two answers)
WITH, WITHOUT = "lookup first (facade-chosen identity)", "create alone (no conversations service)"


async def calls(target: str, count: int) -> list[float]:
    latencies = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = webchat_pb2_grpc.WebChatServiceStub(channel)
        for _ in range(count + 1):  # the first warms the connection up
            request = webchat_pb2.CreateWebChatRequest(
                address_sid=ADDRESS_SID, request_id=str(uuid.uuid4())
            )
            started = time.perf_counter()
            await stub.CreateWebChat(request, timeout=10)
            latencies.append(time.perf_counter() - started)
    return latencies[1:]


def sample(facade: FacadeProcess, count: int) -> tuple[list[float], float]:
    """Latencies, and the facade's CPU ms per call."""
    before = cpu_seconds(facade.proc.pid)
    latencies = asyncio.run(calls(facade.target, count))
    return latencies, (cpu_seconds(facade.proc.pid) - before) * 1000 / (count + 1)


def rows(workdir: Path, rounds: int, count: int) -> list[Row]:
    emulator = start_emulator(rate_limit=0)
    redis_server = start_redis()
    base = {
        **guest_env(emulator.url),
        "REDIS_URL": redis_server.url,
        "FLEX_RATE_LIMIT_RPS": "0",
        "LOG_LEVEL": "WARNING",
    }
    without = {k: v for k, v in base.items() if k != "TWILIO_CONVERSATIONS_SERVICE_SID"}
    facades = {
        WITH: start_facade(facade_env(emulator.url, **base), workdir / "new-ids-with.log"),
        WITHOUT: start_facade(facade_env(emulator.url, **without), workdir / "new-ids-wo.log"),
    }
    results: list[Row] = []
    try:
        for latency, per_round in ((0.0, count), (UPSTREAM_LATENCY, LATENT_CALLS)):
            measured: dict[str, list[tuple[list[float], float]]] = {name: [] for name in facades}
            sent: dict[str, int] = dict.fromkeys(facades, 0)
            for _ in range(rounds):
                for name, facade in facades.items():
                    emulator.reset()  # forgets the conversations: each round starts small
                    emulator.fault(latency=latency)
                    measured[name].append(sample(facade, per_round))
                    sent[name] += len(emulator.requests())
            for name, samples in measured.items():
                ms = [v * 1000 for latencies, _ in samples for v in latencies]
                results.append(
                    {
                        "name": name,
                        "upstream_latency_ms": round(latency * 1000),
                        "calls": len(ms),
                        "p50_ms": round(statistics.median(ms), 3),
                        "p99_ms": round(statistics.quantiles(ms, n=100)[98], 3),
                        "cpu_ms_per_call": round(statistics.median(c for _, c in samples), 3),
                        "upstream_requests_per_id": round(
                            sent[name] / (rounds * (per_round + 1)), 2
                        ),
                    }
                )
    finally:
        for facade in facades.values():
            facade.stop()
        stop_process(redis_server.proc)
        stop_process(emulator.proc)
    return results


def print_rows(results: list[Row], rounds: int) -> None:
    print(
        f"12. A new request_id: looked up before its first create, beside the create alone "
        f"({rounds} interleaved rounds,"
    )
    print("    one call at a time, fresh ids, records in Redis, emulator limits off)")
    print(f"{'':<44} {'upstream':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>8} {'req/id':>7}")
    by_latency: dict[int, dict[str, Row]] = {}
    for r in results:
        by_latency.setdefault(r["upstream_latency_ms"], {})[r["name"]] = r
        print(
            f"{r['name']:<44} {r['upstream_latency_ms']:>6}ms {r['p50_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['cpu_ms_per_call']:8.2f} {r['upstream_requests_per_id']:7.2f}"
        )
    for latency, pair in by_latency.items():
        extra_p50 = pair[WITH]["p50_ms"] - pair[WITHOUT]["p50_ms"]
        extra_cpu = pair[WITH]["cpu_ms_per_call"] - pair[WITHOUT]["cpu_ms_per_call"]
        print(
            f"    the lookup, upstream answering in {latency} ms: +{extra_p50:.2f} ms p50, "
            f"+{extra_cpu:.2f} CPU ms per new id"
        )
    print("    CPU ms: the facade process's, per call; req/id: requests Twilio received per id")
    print()
