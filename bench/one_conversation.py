"""``make bench`` sections 4 and 5: what Twilio created against what callers were told.

4. Burst with short deadlines, no request_id: after the facade's latency estimate is warm (25
   observed creates; it needs 20), BURST_ROUNDS (3) rounds of 30 callers at once, 1.5 s deadlines,
   the upstream answering in 0.3 s, 5/s in the facade and in the emulator. Counts creates Twilio
   received, conversations delivered (OK replies), orphans (created, never delivered).
5. Fault mix with request_ids: 40 ids at once, each retried by its caller with the same id on a
   retryable error (at most 6 calls, 4 s deadlines, waiting what RetryInfo asks), while the
   emulator answers its coming requests from a mixed queue: ambiguous faults (created, then
   500 / 502 / 504 / connection dropped; or answered after the 0.5 s attempt timeout) and plain
   ones (502, 503, 429, dropped, all before creating anything). Counts creates per id.

Creates are counted from the emulator's request log, each request with the conversation it created
and the form it carried (which names the id): that works for any facade, including one that lets
Twilio pick every identity. ``checkout`` runs another checkout's facade against this emulator
(``python -m bench --before CHECKOUT``), for a row beside this one.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from emulator.harness import (
    EmulatorProcess,
    FacadeProcess,
    facade_env,
    guest_env,
    start_emulator,
    start_facade,
    stop_process,
)

Row = dict[str, Any]

BURST_CALLERS = 30
BURST_DEADLINE = 1.5
BURST_ROUNDS = 3
UPSTREAM_LATENCY = 0.3
WARM_CREATES = 25  # the estimate is a p95 once 20 successful attempts are observed
SETTLE = 1.0  # after the callers return, requests still in flight land

IDS = 40
CALLS_PER_ID = 6
ID_DEADLINE = 4.0
ATTEMPT_TIMEOUT = 0.5
FAULTS_QUEUED = 120
FAULT_SHARE = 0.4
AMBIGUOUS = [
    {"status": 500, "after": True},
    {"status": 502, "after": True},
    {"status": 504, "after": True},
    {"drop": True, "after": True},
    {"latency": 2 * ATTEMPT_TIMEOUT},  # created, answered after the attempt timeout
]
PLAIN = [{"status": 502}, {"status": 503}, {"status": 429}, {"drop": True}]
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


def metric(facade: FacadeProcess, name: str) -> float | None:
    """A sample of the facade's /metrics (the first, whatever its labels); None if it has none."""
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", facade.metrics(), re.M)
    return float(match.group(1)) if match else None


def short_deadline_burst(workdir: Path, name: str, checkout: Path | None = None) -> Row:
    emulator = start_emulator(rate_limit=5)
    try:
        facade = start_facade(
            facade_env(emulator.url, LOG_LEVEL="WARNING"), workdir / "burst.log", checkout
        )
        try:
            emulator.fault(latency=UPSTREAM_LATENCY)
            with ThreadPoolExecutor(5) as pool:
                list(pool.map(lambda _: facade.create(timeout=10), range(WARM_CREATES)))
            estimate = metric(facade, "flexwebchat_upstream_latency_estimate_seconds")
            rounds = [burst_round(facade, emulator) for _ in range(BURST_ROUNDS)]
            orphans_counted = metric(facade, "flexwebchat_orphaned_conversations_total")
        finally:
            facade.stop()
    finally:
        stop_process(emulator.proc)
    refused: Counter[str] = Counter()
    for r in rounds:
        refused.update(r["refused"])
    return {
        "name": name,
        "callers": sum(r["callers"] for r in rounds),
        "creates_received": sum(r["creates_received"] for r in rounds),
        "delivered": sum(r["delivered"] for r in rounds),
        "orphans": sum(r["orphans"] for r in rounds),
        "orphans_counted_by_facade": orphans_counted,
        "refused": dict(sorted(refused.items())),
        "latency_estimate_s": estimate,
        "rounds": rounds,
    }


def burst_round(facade: FacadeProcess, emulator: EmulatorProcess) -> Row:
    time.sleep(1.5)  # the facade's schedule and the emulator's bucket are idle again
    emulator.reset()
    emulator.fault(latency=UPSTREAM_LATENCY)

    def call(_: int) -> str:
        try:
            return str(facade.create(timeout=BURST_DEADLINE).conversation_sid)
        except grpc.RpcError as exc:
            return str(exc.code().name)

    with ThreadPoolExecutor(BURST_CALLERS) as pool:
        outcomes = list(pool.map(call, range(BURST_CALLERS)))
    time.sleep(SETTLE)
    created = set(emulator.conversations())
    delivered = {o for o in outcomes if o.startswith("CH")}
    return {
        "callers": BURST_CALLERS,
        "creates_received": len(created),
        "delivered": len(delivered),
        "orphans": len(created - delivered),
        "refused": dict(Counter(o for o in outcomes if not o.startswith("CH"))),
    }


def fault_mix(workdir: Path, name: str, checkout: Path | None = None) -> Row:
    queue = fault_queue()
    emulator = start_emulator(rate_limit=5)
    try:
        env = facade_env(
            emulator.url,
            LOG_LEVEL="WARNING",
            FLEX_ATTEMPT_TIMEOUT_SECONDS=str(ATTEMPT_TIMEOUT),
            **guest_env(emulator.url),
        )
        facade = start_facade(env, workdir / "faults.log", checkout)
        try:
            emulator.fault(*queue)
            ids = [str(uuid.uuid4()) for _ in range(IDS)]
            started = time.perf_counter()
            with ThreadPoolExecutor(IDS) as pool:
                outcomes = list(pool.map(lambda request_id: keep_calling(facade, request_id), ids))
            wall = time.perf_counter() - started
            time.sleep(2 * ATTEMPT_TIMEOUT + SETTLE)  # requests whose callers left land
            requests = emulator.requests()
        finally:
            facade.stop()
    finally:
        stop_process(emulator.proc)
    creates = Counter(
        json.loads(r["form"]["PreEngagementData"])["request_id"]
        for r in requests
        if r["path"] == "/v2/WebChats" and r["conversation_sid"]
    )
    per_id = [creates[request_id] for request_id in ids]
    delivered = [sid for sid, _ in outcomes if sid.startswith("CH")]
    return {
        "name": name,
        "ids": IDS,
        "faults_queued": sum(1 for fault in queue if fault),
        # Each request, of any endpoint, took the next entry of the queue.
        "faults_used": sum(1 for fault in queue[: len(requests)] if fault),
        "creates": sum(per_id),
        "max_creates_per_id": max(per_id),
        "ids_with_more_than_one": sum(1 for n in per_id if n > 1),
        "ids_delivered": len(delivered),
        "delivered_but_never_created": len(
            set(delivered) - {r["conversation_sid"] for r in requests}
        ),
        "calls": sum(len(failed) + sid.startswith("CH") for sid, failed in outcomes),
        "failed_calls": dict(Counter(code for _, failed in outcomes for code in failed)),
        "wall_s": round(wall, 2),
        "not_delivered": dict(Counter(sid for sid, _ in outcomes if not sid.startswith("CH"))),
    }


def fault_queue() -> list[dict[str, Any]]:
    """FAULTS_QUEUED answers, FAULT_SHARE of them faults (half ambiguous): the same every run."""
    rng = random.Random(8)  # noqa: S311 (a reproducible fault queue, not a secret)
    queue: list[dict[str, Any]] = []
    for _ in range(FAULTS_QUEUED):
        if rng.random() >= FAULT_SHARE:
            queue.append({})  # answered normally
        else:
            queue.append(rng.choice(AMBIGUOUS if rng.random() < 0.5 else PLAIN))
    return queue


def keep_calling(facade: FacadeProcess, request_id: str) -> tuple[str, list[str]]:
    """A well-behaved client: the same id on every retry, waiting what RetryInfo asks (else a
    growing backoff), at most CALLS_PER_ID calls. Returns the SID (or the last code) and the
    codes of the calls that failed."""
    failed: list[str] = []
    for call in range(1, CALLS_PER_ID + 1):
        try:
            reply = facade.create(
                timeout=ID_DEADLINE,
                request_id=request_id,
                pre_engagement_data=json.dumps({"request_id": request_id}),
            )
            return str(reply.conversation_sid), failed
        except grpc.RpcError as exc:
            failed.append(exc.code().name)
            if exc.code() not in RETRYABLE or call == CALLS_PER_ID:
                break
            time.sleep(min(retry_delay(exc) or 0.25 * 2**call, 3.0))
    return failed[-1], failed


def retry_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a failed call, in seconds; None without one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for packed in status.details if status is not None else []:
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            packed.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None
