"""``make bench``: the facade next to twilio-python, measured in the same run, on loopback.

1. Cost and latency of one CreateWebChat through the facade (limits off), 1 and 50 at a time,
   in BENCH_ROUNDS interleaved rounds (3) of BENCH_CALLS calls (400),
   beside twilio-python's ``web_channels.create()`` called directly and bare HTTP clients doing
   the same POST (httpx with its default transport, httpx with the facade's aiohttp transport,
   aiohttp alone), against the same emulator.
2. 30 simultaneous chats against Twilio's 5 requests/second limit (the emulator enforces it):
   30 threads calling twilio-python directly, beside 30 callers going through the facade.
3. The cost ratios against twilio-python and bare httpx, computed from 1 (same run, so comparable).
4. A burst of short-deadline callers without request_id: creates Twilio received against
   conversations delivered (``bench/one_conversation.py``).
5. A mix of ambiguous and plain faults, callers retrying with their request_id: creates
   per id.
6-9. Capacity (``bench/capacity.py``): 1000 creates at once against a 250 ms
   upstream; 1000 callers queued behind the 5/s limit beside a bare grpc.aio floor; CPU of a
   replay, a refusal and a token refresh; start to SERVING and RSS.
10. Every performance target beside its measured value, from this run.
11. A second caller's wait while a first caller floods the rate limit, with callers taking turns
   and, beside it, with one caller for the facade (auth off: first come, first served), on one
   replica and on two sharing Redis (``bench/fairness.py``).
12. What the lookup before a new request_id's first create costs, beside the create alone
   (``bench/new_ids.py``).

Prints tables; ``--json PATH`` also writes every number as JSON (``make bench`` writes
bench/results.json). ``--only`` runs some sections. ``--before CHECKOUT`` adds, in sections 4 and
5, a row for the facade of another checkout (with its own ``.venv``, e.g. a ``git worktree`` of an
older commit), run against this checkout's emulator. Loops are bounded; every process started here
is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from bench import capacity, fairness, new_ids, one_conversation
from bench.cpu import cpu_seconds
from emulator.app import ACCOUNT_SID, AUTH_TOKEN
from emulator.harness import (
    ADDRESS_SID,
    EmulatorProcess,
    FacadeProcess,
    facade_command,
    facade_env,
    start_emulator,
    start_facade,
    start_redis,
    stop_process,
)
from service.config import Secret, Settings
from service.upstream import new_http_client

CALLS = int(os.environ.get("BENCH_CALLS", "400"))  # per row and round
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BURST = 30
REQUEST = webchat_pb2.CreateWebChatRequest(
    address_sid=ADDRESS_SID, customer_friendly_name="Ada", pre_engagement_data='{"topic": "bench"}'
)
# The same create as a bare HTTP POST: what the facade and twilio-python send.
FORM = {
    "AddressSid": ADDRESS_SID,
    "CustomerFriendlyName": "Ada",
    "PreEngagementData": '{"topic": "bench"}',
}
HEADERS = {"Accept": "application/json", "Accept-Charset": "utf-8"}
FACADE_1, TWILIO, BARE_HTTPX = (
    "facade gRPC, 1 at a time",
    "twilio-python direct (sync), 1 at a time",
    "bare httpx POST, 1 at a time",
)
Row = dict[str, Any]


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


@dataclass
class Sample:
    """One round of one row: per-call latencies, wall seconds, CPU ms per call."""

    latencies: list[float]
    wall: float
    cpu_ms: float


def row(name: str, samples: list[Sample]) -> Row:
    """All rounds of a row: latencies pooled, CPU the median round (robust to a noisy neighbour)."""
    ms = [v * 1000 for sample in samples for v in sample.latencies]
    return {
        "name": name,
        "calls": len(ms),
        "rounds": len(samples),
        "calls_per_s": round(len(ms) / sum(sample.wall for sample in samples), 1),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "cpu_ms_per_call": round(statistics.median(sample.cpu_ms for sample in samples), 3),
        "cpu_ms_per_call_rounds": [round(sample.cpu_ms, 3) for sample in samples],
    }


def format_row(r: Row) -> str:
    return (
        f"{r['name']:<44} {r['calls_per_s']:8.0f} {r['p50_ms']:8.2f} "
        f"{r['p99_ms']:8.2f} {r['cpu_ms_per_call']:8.2f}"
    )


def run_async(main: Coroutine[Any, Any, Sample]) -> Sample:
    """On uvloop when installed, as the facade runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def one_at_a_time(post: Callable[[], Awaitable[None]]) -> Sample:
    """CALLS posts one after the other, after a warm-up; CPU of this process."""
    await post()
    latencies = []
    cpu_before, started = time.process_time(), time.perf_counter()
    for _ in range(CALLS):
        t0 = time.perf_counter()
        await post()
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return Sample(latencies, wall, (time.process_time() - cpu_before) * 1000 / CALLS)


async def bare_httpx(http: httpx.AsyncClient, url: str) -> Sample:
    async with http:

        async def post() -> None:
            response = await http.post(url, data=FORM, headers=HEADERS)
            response.raise_for_status()
            response.json()

        return await one_at_a_time(post)


async def bare_aiohttp(emulator: EmulatorProcess) -> Sample:
    headers = {**HEADERS, "Authorization": aiohttp.encode_basic_auth(ACCOUNT_SID, AUTH_TOKEN)}
    async with aiohttp.ClientSession(emulator.url) as session:

        async def post() -> None:
            async with session.post("/v2/WebChats", data=FORM, headers=headers) as response:
                response.raise_for_status()
                await response.json()

        return await one_at_a_time(post)


def bare_samples(emulator: EmulatorProcess) -> dict[str, Sample]:
    url = emulator.url + "/v2/WebChats"
    # The facade's own httpx client (aiohttp transport, no cookies), without the facade.
    config = Settings(username=ACCOUNT_SID, password=Secret(AUTH_TOKEN), base_url=emulator.url)
    auth = httpx.BasicAuth(ACCOUNT_SID, AUTH_TOKEN)
    return {
        BARE_HTTPX: run_async(bare_httpx(httpx.AsyncClient(auth=auth), url)),
        "facade's httpx client alone, 1 at a time": run_async(
            bare_httpx(new_http_client(config), url)
        ),
        "bare aiohttp POST, 1 at a time": run_async(bare_aiohttp(emulator)),
    }


def facade_sample(facade: FacadeProcess, concurrency: int) -> Sample:
    before, started = cpu_seconds(facade.proc.pid), time.perf_counter()
    latencies = asyncio.run(facade_calls(facade.target, CALLS, concurrency))
    wall = time.perf_counter() - started
    return Sample(latencies, wall, (cpu_seconds(facade.proc.pid) - before) * 1000 / (CALLS + 1))


def twilio_sample(client: Client) -> Sample:
    twilio_create(client)  # warm-up
    latencies = []
    cpu_before, started = time.process_time(), time.perf_counter()
    for _ in range(CALLS):
        t0 = time.perf_counter()
        twilio_create(client)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return Sample(latencies, wall, (time.process_time() - cpu_before) * 1000 / CALLS)


def cost_and_latency(workdir: Path) -> list[Row]:
    """ROUNDS rounds, each measuring every row once, so that a busy moment hits all rows alike."""
    emulator = start_emulator(rate_limit=0)
    facade = start_facade(
        facade_env(emulator.url, FLEX_RATE_LIMIT_RPS="0", LOG_LEVEL="WARNING"), workdir / "f.log"
    )
    samples: dict[str, list[Sample]] = {}
    try:
        client = twilio_client(emulator)
        for _ in range(ROUNDS):
            for concurrency in (1, 50):
                name = f"facade gRPC, {concurrency} at a time"
                samples.setdefault(name, []).append(facade_sample(facade, concurrency))
            for name, sample in bare_samples(emulator).items():
                samples.setdefault(name, []).append(sample)
            samples.setdefault(TWILIO, []).append(twilio_sample(client))
    finally:
        facade.stop()
        stop_process(emulator.proc)
    return [row(name, rounds) for name, rounds in samples.items()]


def account_limit(workdir: Path) -> list[Row]:
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


def burst_row(name: str, outcomes: list[str], wall: float, emulator: EmulatorProcess) -> Row:
    return {
        "name": name,
        "created": outcomes.count("ok"),
        "callers": len(outcomes),
        "429s_sent": sum(1 for r in emulator.requests() if r["status"] == 429),
        "wall_s": round(wall, 3),
        "max_per_1s": emulator.busiest_second(),
    }


def format_burst_row(r: Row) -> str:
    return (
        f"{r['name']:<44} {r['created']:>5}/{r['callers']} {r['429s_sent']:>10} "
        f"{r['wall_s']:9.2f} {r['max_per_1s']:>9}"
    )


def targets(rows: list[Row]) -> Row:
    """The cost ratios, from rows of the same run."""
    by_name = {r["name"]: r for r in rows}
    facade, twilio, bare = by_name[FACADE_1], by_name[TWILIO], by_name[BARE_HTTPX]
    return {
        "facade_cpu_over_twilio_python_cpu": round(
            facade["cpu_ms_per_call"] / twilio["cpu_ms_per_call"], 2
        ),
        "facade_p50_minus_bare_httpx_p50_ms": round(facade["p50_ms"] - bare["p50_ms"], 3),
    }


def format_short_deadlines(r: Row) -> str:
    refused = ", ".join(f"{code} {n}" for code, n in r["refused"].items()) or "-"
    return (
        f"{r['name']:<44} {r['callers']:>7} {r['creates_received']:>8} {r['delivered']:>10} "
        f"{r['orphans']:>8}   {refused}"
    )


def format_fault_mix(r: Row) -> str:
    return (
        f"{r['name']:<44} {r['creates']:>7} {r['max_creates_per_id']:>8} "
        f"{r['ids_with_more_than_one']:>8} {r['ids_delivered']:>5}/{r['ids']} {r['calls']:>6} "
        f"{r['wall_s']:>7.1f}"
    )


def facade_name(checkout: Path | None) -> str:
    if checkout is None:
        return "facade"
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return f"facade at {commit}"


SECTIONS = (  # --only
    "one_create",
    "account_limit",
    "short_deadlines",
    "fault_mix",
    "burst",
    "waiting",
    "cheap_calls",
    "fairness",
    "new_ids",
)


def print_one_create(rows: list[Row]) -> None:
    print(
        f"1. One CreateWebChat, {ROUNDS} rounds of {CALLS} calls after warm-up "
        "(emulator on loopback, limits off)"
    )
    print(f"{'':<44} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>8}")
    for r in rows:
        print(format_row(r))
    print("   CPU ms: per call, of the facade process (facade rows) or of the calling process;")
    print("   the median round (all rounds in the JSON); p50/p99 over all rounds' calls")
    print("   bare/alone rows: the same form POST from this process, on uvloop as the facade")
    print()


def print_account_limit(rows: list[Row]) -> None:
    print("2. 30 simultaneous chats against Twilio's limit of 5 requests/second")
    print(f"{'':<44} {'created':>9} {'429s sent':>10} {'wall s':>9} {'max/1s':>9}")
    for r in rows:
        print(format_burst_row(r))
    print("   max/1s: requests the emulator saw in the busiest second, refused included")
    print()


def print_targets(ratios: Row) -> None:
    print("3. Cost against twilio-python and bare httpx, from 1 (this run)")
    print(
        f"{'facade CPU / twilio-python CPU, per create':<52} "
        f"{ratios['facade_cpu_over_twilio_python_cpu']:8.2f}   (target <= 1.0)"
    )
    print(
        f"{'facade p50 - bare httpx POST p50, 1 at a time':<52} "
        f"{ratios['facade_p50_minus_bare_httpx_p50_ms']:8.2f} ms (target <= 1.0 ms)"
    )
    print()


def print_short_deadlines_header() -> None:
    oc = one_conversation
    print(
        f"4. Burst with short deadlines, no request_id: {oc.BURST_ROUNDS} rounds of "
        f"{oc.BURST_CALLERS} callers at once, {oc.BURST_DEADLINE} s deadlines,"
    )
    print(
        f"   upstream answering in {oc.UPSTREAM_LATENCY} s, 5/s in the facade and Twilio, "
        f"latency estimate warmed by {oc.WARM_CREATES} creates"
    )
    print(f"{'':<44} {'callers':>7} {'created':>8} {'delivered':>10} {'orphans':>8}   refused")


def print_fault_mix_header() -> None:
    oc = one_conversation
    print(
        f"5. Fault mix with request_ids: {oc.IDS} ids at once, each retried with its id "
        f"(<= {oc.CALLS_PER_ID} calls, {oc.ID_DEADLINE} s"
    )
    print(
        f"   deadlines), {oc.FAULT_SHARE:.0%} of Twilio's answers faulty, half of them "
        f"ambiguous; {oc.ATTEMPT_TIMEOUT} s attempt timeout"
    )
    print(
        f"{'':<44} {'creates':>7} {'max/id':>8} {'ids >1':>8} {'delivered':>9} "
        f"{'calls':>6} {'wall s':>7}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="run only these sections"
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="CHECKOUT",
        help="in sections 4 and 5, also measure the facade of this checkout (an older commit, "
        "with its own .venv), as a row below this one's",
    )
    args = parser.parse_args()
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        # make bench: the runtime-only install, as in the image
        "facade_command": " ".join(facade_command()),
    }
    facades: list[Path | None] = [None] if args.before is None else [None, args.before]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "one_create" in args.only:
            results["one_create"] = cost_and_latency(workdir)
            print_one_create(results["one_create"])
            results["targets"] = targets(results["one_create"])
        if "account_limit" in args.only:
            results["account_limit"] = account_limit(workdir)
            print_account_limit(results["account_limit"])
        if "targets" in results:
            print_targets(results["targets"])
        if "short_deadlines" in args.only:
            print_short_deadlines_header()
            results["short_deadlines"] = []
            for checkout in facades:
                r = one_conversation.short_deadline_burst(workdir, facade_name(checkout), checkout)
                results["short_deadlines"].append(r)
                print(format_short_deadlines(r), flush=True)
            print("   created: creates Twilio received; orphans: created but never delivered")
            print()
        if "fault_mix" in args.only:
            print_fault_mix_header()
            results["fault_mix"] = []
            for checkout in facades:
                r = one_conversation.fault_mix(workdir, facade_name(checkout), checkout)
                results["fault_mix"].append(r)
                print(format_fault_mix(r), flush=True)
            print("   max/id: most conversations Twilio created for one id; ids >1: ids with more")
            print("   than one; calls: every call the callers made, retries included")
            print()
        starts: list[float] = []
        if "burst" in args.only:
            results["burst"] = capacity.burst_rows(workdir, starts)
            capacity.print_burst(results["burst"])
        if "waiting" in args.only:
            results["waiting"] = capacity.waiting_rows(workdir, starts)
            capacity.print_waiting(results["waiting"])
        if "cheap_calls" in args.only:
            results["cheap_calls"] = capacity.cheap_rows(workdir, starts, ROUNDS)
            capacity.print_cheap(results["cheap_calls"], ROUNDS)
        if starts:
            results["start_to_serving_s"] = [round(s, 3) for s in starts]
            capacity.print_start(starts)
        results["targets"] = capacity.targets(results)
        capacity.print_targets(results["targets"])
        if "fairness" in args.only:
            fairness.print_header()
            results["fairness"] = fairness.rows(workdir)
            fairness.print_footer()
        if "new_ids" in args.only:
            results["new_ids"] = new_ids.rows(workdir, ROUNDS, CALLS)
            new_ids.print_rows(results["new_ids"], ROUNDS)
    results["load_average_after"] = os.getloadavg()
    load = " ".join(f"{v:.2f}" for v in results["load_average_before"])
    print(f"   load average before the run: {load} ({results['cpus']} CPUs)")
    print(f"   the facade ran as: {results['facade_command']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"   results as JSON: {args.json}")


if __name__ == "__main__":
    main()
