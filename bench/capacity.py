"""``make bench`` sections 6 to 9: capacity that section 1 does not cover.

6. 1000 creates at once, the upstream answering in 250 ms, rate limits off: wall time and errors,
   with the facade's upstream pool at 100 connections (the default) and at 1000
   (``FLEX_MAX_CONNECTIONS``); the facade's RSS idle and after the burst.
7. 1000 callers queued behind the 5/s limit (300 s deadlines, cancelled once measured): memory
   per waiting call (the facade's VmRSS delta / 1000) and the facade's CPU while they wait (% of
   one core over WAIT_CPU_SECONDS), beside the floor (``bench/floor_servicer.py``) measured alike.
8. CPU per call of the cheap calls: a replay of a stored request_id, a refused invalid request
   (INVALID_ARGUMENT), RefreshGuestToken; one at a time, BENCH_ROUNDS rounds, the median round.
9. Start to SERVING: from spawning ``python -m service`` to its health check answering SERVING,
   for every facade started in 6 to 8 (the wait polls every 50 ms).

The callers are this process's grpc.aio clients, spread over CHANNELS connections: the facade
lets one connection hold 100 streams at once and more would wait in the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc

from bench.cpu import cpu_seconds
from emulator.harness import (
    ADDRESS_SID,
    ROOT,
    FacadeProcess,
    facade_command,
    facade_env,
    guest_env,
    start_emulator,
    start_facade,
    stop_process,
)

Row = dict[str, Any]

CALLERS = 1000
CHANNELS = 20  # 50 streams each, under the facade's 100 per connection
UPSTREAM_LATENCY = 0.25
WAIT_DEADLINE = 300.0  # long enough that the last of 1000 callers at 5/s is still admitted
WAIT_CPU_SECONDS = 3.0
CHEAP_CALLS = 1000  # the CPU clock ticks at 10 ms: 0.01 ms per call of resolution
# Room for 1000 callers from this one process (one caller, as far as the facade can tell).
WIDE_OPEN = {"GRPC_MAX_CONCURRENT_RPCS": "2000", "FLEX_MAX_PENDING_PER_CALLER": "2000"}
REQUEST = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID, customer_friendly_name="Ada")
INVALID = webchat_pb2.CreateWebChatRequest(address_sid="IS" + "0" * 32)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def timed_start(env: dict[str, str], log: Path, starts: list[float]) -> FacadeProcess:
    started = time.perf_counter()
    facade = start_facade(env, log)
    starts.append(time.perf_counter() - started)
    return facade


def channels(target: str) -> list[grpc.aio.Channel]:
    # A local subchannel pool each: otherwise channels to one target share one connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(CHANNELS)]


def stubs(chans: list[grpc.aio.Channel]) -> list[webchat_pb2_grpc.WebChatServiceStub]:
    return [webchat_pb2_grpc.WebChatServiceStub(channel) for channel in chans]


async def close(chans: list[grpc.aio.Channel]) -> None:
    await asyncio.gather(*[channel.close() for channel in chans])


# -- 6. 1000 creates at once -------------------------------------------------------------------


async def burst(target: str) -> tuple[float, Counter[str]]:
    chans = channels(target)
    try:
        all_stubs = stubs(chans)
        await asyncio.gather(*[stub.CreateWebChat(REQUEST, timeout=10) for stub in all_stubs])

        async def call(i: int) -> str:
            try:
                await all_stubs[i % CHANNELS].CreateWebChat(REQUEST, timeout=30)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        started = time.perf_counter()
        outcomes = await asyncio.gather(*[call(i) for i in range(CALLERS)])
        return time.perf_counter() - started, Counter(outcomes)
    finally:
        await close(chans)


def burst_rows(workdir: Path, starts: list[float]) -> list[Row]:
    emulator = start_emulator(rate_limit=0)
    rows = []
    try:
        emulator.fault(latency=UPSTREAM_LATENCY)
        for pool in (100, 1000):
            env = facade_env(
                emulator.url,
                FLEX_RATE_LIMIT_RPS="0",
                FLEX_MAX_CONNECTIONS=str(pool),
                LOG_LEVEL="WARNING",
                **WIDE_OPEN,
            )
            facade = timed_start(env, workdir / f"burst-{pool}.log", starts)
            try:
                idle = rss_kb(facade.proc.pid)
                cpu_before = cpu_seconds(facade.proc.pid)
                wall, outcomes = asyncio.run(burst(facade.target))
                cpu = cpu_seconds(facade.proc.pid) - cpu_before
                after = rss_kb(facade.proc.pid)
            finally:
                facade.stop()
            rows.append(
                {
                    "name": f"facade, FLEX_MAX_CONNECTIONS={pool}",
                    "calls": CALLERS,
                    "wall_s": round(wall, 3),
                    "errors": CALLERS - outcomes["OK"],
                    "outcomes": dict(outcomes),
                    "facade_cpu_ms_per_call": round(cpu * 1000 / (CALLERS + CHANNELS), 3),
                    "rss_idle_mb": round(idle / 1024, 1),
                    "rss_after_burst_mb": round(after / 1024, 1),
                }
            )
    finally:
        stop_process(emulator.proc)
    return rows


# -- 7. 1000 callers waiting -------------------------------------------------------------------


async def settle(pid: int, at_most: float = 10.0) -> None:
    """Until the process's RSS has not moved for a second: every call has arrived and is held."""
    deadline = time.monotonic() + at_most
    last, still_since = rss_kb(pid), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = rss_kb(pid)
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 1.0:
            return


async def waiting(target: str, pid: int) -> Row:
    """CALLERS calls held open; memory and CPU of ``pid`` while they are, then cancelled."""
    chans = channels(target)
    try:
        all_stubs = stubs(chans)
        # Warm-up: every connection and the code paths of a call, before the baseline.
        await asyncio.gather(
            *[stub.CreateWebChat(REQUEST, timeout=0.5) for stub in all_stubs],
            return_exceptions=True,
        )
        await settle(pid)
        before = rss_kb(pid)
        tasks = [
            asyncio.ensure_future(
                all_stubs[i % CHANNELS].CreateWebChat(REQUEST, timeout=WAIT_DEADLINE)
            )
            for i in range(CALLERS)
        ]
        await settle(pid)
        held = rss_kb(pid)
        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(WAIT_CPU_SECONDS)
        cpu = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - started)
        finished = sum(1 for task in tasks if task.done())
        for task in tasks:
            task.cancel()  # cancels the call: the server sees its caller leave
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await close(chans)
    return {
        "callers": CALLERS,
        "finished_while_measured": finished,
        "rss_before_mb": round(before / 1024, 1),
        "rss_held_mb": round(held / 1024, 1),
        "kb_per_waiting_call": round((held - before) / CALLERS, 1),
        "cpu_percent_of_a_core": round(cpu * 100, 2),
    }


def waiting_rows(workdir: Path, starts: list[float]) -> list[Row]:
    emulator = start_emulator(rate_limit=5)
    try:
        env = facade_env(
            emulator.url,
            LOG_LEVEL="WARNING",
            FLEX_MAX_DEADLINE_SECONDS=str(WAIT_DEADLINE),
            FLEX_DEFAULT_DEADLINE_SECONDS=str(WAIT_DEADLINE),
            **WIDE_OPEN,
        )
        facade = timed_start(env, workdir / "waiting.log", starts)
        try:
            row = waiting_run(facade.target, facade.proc.pid)
        finally:
            facade.stop()
    finally:
        stop_process(emulator.proc)
    with floor_servicer() as (target, pid):
        floor_row = waiting_run(target, pid)
    return [
        {"name": "facade, 5/s limit, 1000 queued", **row},
        {"name": "floor: bare grpc.aio servicer, sleeping", **floor_row},
    ]


@contextlib.contextmanager
def floor_servicer() -> Iterator[tuple[str, int]]:
    """``bench/floor_servicer.py`` running: its target and pid."""
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench.floor_servicer"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert floor.stdout is not None
        port = floor.stdout.readline().split()[-1]
        yield f"127.0.0.1:{port}", floor.pid
    finally:
        stop_process(floor)


def waiting_run(target: str, pid: int) -> Row:
    return asyncio.run(waiting(target, pid))


# -- 8. the cheap calls ------------------------------------------------------------------------


async def cpu_per_call(pid: int, call: Callable[[], Awaitable[Any]]) -> float:
    await call()
    before = cpu_seconds(pid)
    for _ in range(CHEAP_CALLS):
        await call()
    return (cpu_seconds(pid) - before) * 1000 / CHEAP_CALLS


async def cheap_samples(target: str, pid: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = webchat_pb2_grpc.WebChatServiceStub(channel)
        stored = webchat_pb2.CreateWebChatRequest(
            address_sid=ADDRESS_SID, customer_friendly_name="Ada", request_id=str(uuid.uuid4())
        )
        first = await stub.CreateWebChat(
            webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID, issue_token=True),
            timeout=10,
        )
        refresh = webchat_pb2.RefreshGuestTokenRequest(access_token=first.access_token)

        async def replay() -> None:
            await stub.CreateWebChat(stored, timeout=10)

        async def invalid() -> None:
            try:
                await stub.CreateWebChat(INVALID, timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            else:
                raise AssertionError("an invalid request was answered")

        async def refreshed() -> None:
            await stub.RefreshGuestToken(refresh, timeout=10)

        return {
            "replay of a stored request_id": await cpu_per_call(pid, replay),
            "refused invalid request (INVALID_ARGUMENT)": await cpu_per_call(pid, invalid),
            "RefreshGuestToken": await cpu_per_call(pid, refreshed),
        }


async def floor_sample(target: str, pid: int) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = webchat_pb2_grpc.WebChatServiceStub(channel)
        request = webchat_pb2.RefreshGuestTokenRequest(access_token="x")

        async def constant() -> None:
            await stub.RefreshGuestToken(request, timeout=10)

        return await cpu_per_call(pid, constant)


def cheap_rows(workdir: Path, starts: list[float], rounds: int) -> list[Row]:
    emulator = start_emulator(rate_limit=0)
    samples: dict[str, list[float]] = {}
    floor = "floor: bare grpc.aio servicer, constant answer"
    with floor_servicer() as (target, pid):
        samples[floor] = [asyncio.run(floor_sample(target, pid)) for _ in range(rounds)]
    try:
        env = facade_env(
            emulator.url, FLEX_RATE_LIMIT_RPS="0", LOG_LEVEL="WARNING", **guest_env(emulator.url)
        )
        facade = timed_start(env, workdir / "cheap.log", starts)
        try:
            for _ in range(rounds):
                for name, ms in asyncio.run(cheap_samples(facade.target, facade.proc.pid)).items():
                    samples.setdefault(name, []).append(ms)
        finally:
            facade.stop()
    finally:
        stop_process(emulator.proc)
    return [
        {
            "name": name,
            "calls": CHEAP_CALLS * len(ms),
            "cpu_ms_per_call": round(statistics.median(ms), 3),
            "cpu_ms_per_call_rounds": [round(v, 3) for v in ms],
        }
        for name, ms in samples.items()
    ]


# -- tables -------------------------------------------------------------------------------------


def print_burst(rows: list[Row]) -> None:
    print(
        f"6. {CALLERS} creates at once over {CHANNELS} connections, upstream answering in "
        f"{UPSTREAM_LATENCY * 1000:.0f} ms, limits off"
    )
    print(f"{'':<44} {'wall s':>7} {'errors':>7} {'CPU ms':>7} {'RSS idle':>9} {'after':>7}")
    for r in rows:
        print(
            f"{r['name']:<44} {r['wall_s']:7.2f} {r['errors']:>7} "
            f"{r['facade_cpu_ms_per_call']:7.2f} {r['rss_idle_mb']:7.1f}MB "
            f"{r['rss_after_burst_mb']:5.1f}MB"
        )
    print("   CPU ms: the facade's, per call; RSS: the facade's VmRSS before and after the burst")
    print()


def print_waiting(rows: list[Row]) -> None:
    print(
        f"7. {CALLERS} callers held waiting ({WAIT_DEADLINE:.0f} s deadlines, then cancelled): "
        f"the server's memory and CPU"
    )
    print(f"{'':<44} {'KB/call':>8} {'CPU %':>7} {'RSS before':>11} {'held':>8}")
    for r in rows:
        print(
            f"{r['name']:<44} {r['kb_per_waiting_call']:8.1f} {r['cpu_percent_of_a_core']:7.2f} "
            f"{r['rss_before_mb']:9.1f}MB {r['rss_held_mb']:6.1f}MB"
        )
    print(
        f"   KB/call: VmRSS delta / {CALLERS}; CPU %: of one core over {WAIT_CPU_SECONDS:.0f} s "
        "while they wait (the facade's includes the 5 creates/s it sends)"
    )
    print()


def print_cheap(rows: list[Row], rounds: int) -> None:
    print(f"8. The cheap calls, {rounds} rounds of {CHEAP_CALLS} one at a time after warm-up")
    print(f"{'':<44} {'CPU ms':>8}")
    for r in rows:
        print(f"{r['name']:<44} {r['cpu_ms_per_call']:8.3f}")
    print("   CPU ms: of the facade process per call, the median round")
    print()


def print_start(starts: list[float]) -> None:
    command = " ".join(facade_command()[1:])
    print(f"9. Start to SERVING (spawn `python {command}` to health SERVING, polled every 50 ms)")
    values = " ".join(f"{s:.2f}" for s in starts)
    print(
        f"{'median of ' + str(len(starts)) + ' starts':<44} {statistics.median(starts):7.2f} s"
        f"   ({values})"
    )
    print()


# -- 10. every target beside its value --------------------------------------------------------


def targets(results: dict[str, Any]) -> list[Row]:
    """The targets' table, filled from the sections this run measured (a missing one is skipped)."""
    rows: list[Row] = []

    def add(metric: str, value: str, target: str, met: bool) -> None:
        rows.append({"metric": metric, "value": value, "target": target, "met": met})

    if "targets" in results:
        ratio = results["targets"]["facade_cpu_over_twilio_python_cpu"]
        add("facade CPU / twilio-python CPU, per create", f"{ratio:.2f}", "<= 1.0", ratio <= 1.0)
        added = results["targets"]["facade_p50_minus_bare_httpx_p50_ms"]
        add(
            "added p50 vs bare httpx POST, 1 at a time",
            f"{added:.2f} ms",
            "<= 1.0 ms",
            added <= 1.0,
        )
    for r in results.get("burst", []):
        add(
            f"1000 at once, 250 ms upstream, {r['name'].split(', ')[1]}",
            f"{r['wall_s']:.2f} s, {r['errors']} errors",
            "<= 1.0 s, 0",
            r["wall_s"] <= 1.0 and r["errors"] == 0,
        )
    if results.get("waiting"):
        facade, floor = results["waiting"]
        kb = facade["kb_per_waiting_call"]
        add(
            "memory per waiting call (1000 queued)",
            f"{kb:.1f} KB (floor {floor['kb_per_waiting_call']:.1f})",
            "<= 25 KB",
            kb <= 25,
        )
        cpu = facade["cpu_percent_of_a_core"]
        add(
            "facade CPU while 1000 wait",
            f"{cpu:.2f}% (floor {floor['cpu_percent_of_a_core']:.2f}%)",
            "<= 5% of a core",
            cpu <= 5,
        )
    for r in results.get("cheap_calls", []):
        if r["name"].startswith("floor"):
            continue
        ms = r["cpu_ms_per_call"]
        add(f"CPU per call: {r['name']}", f"{ms:.3f} ms", "<= 0.5 ms", ms <= 0.5)
    if results.get("start_to_serving_s"):
        start = statistics.median(results["start_to_serving_s"])
        add("start to SERVING (median)", f"{start:.2f} s", "<= 1 s", start <= 1.0)
    for r in results.get("burst", []):
        worst = max(r["rss_idle_mb"], r["rss_after_burst_mb"])
        add(
            f"RSS idle / after the burst, {r['name'].split(', ')[1]}",
            f"{r['rss_idle_mb']:.0f} / {r['rss_after_burst_mb']:.0f} MB",
            "<= 100 MB",
            worst <= 100,
        )
    return rows


def print_targets(rows: list[Row]) -> None:
    if not rows:
        return
    print("10. Performance targets, this run")
    print(f"{'':<58} {'measured':<26} {'target':<16} met")
    for r in rows:
        met = "yes" if r["met"] else "no"
        print(f"{r['metric']:<58} {r['value']:<26} {r['target']:<16} {met}")
    print()
