"""Fixtures: real processes on loopback (emulator, facade, Redis), every one stopped at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from emulator.harness import (  # noqa: F401 - re-exported for the tests
    ADDRESS_SID,
    ROOT,
    EmulatorProcess,
    FacadeProcess,
    RedisProcess,
    facade_env,
    free_port,
    start_emulator,
    start_facade,
    start_redis,
    stop_process,
)


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorProcess]:
    """One emulator (5 requests/second, as Twilio) for the session; reset before each use."""
    process = start_emulator()
    yield process
    stop_process(process.proc)


@pytest.fixture(scope="session")
def fast_emulator() -> Iterator[EmulatorProcess]:
    """An emulator without a rate limit, for tests that make many calls."""
    process = start_emulator(rate_limit=0)
    yield process
    stop_process(process.proc)


@pytest.fixture
def unlimited_upstream(fast_emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The unlimited emulator, reset before and after (its latency must not leak to others)."""
    fast_emulator.reset()
    yield fast_emulator
    fast_emulator.reset()


@pytest.fixture
def upstream(emulator: EmulatorProcess) -> EmulatorProcess:
    emulator.reset()
    return emulator


@pytest.fixture
def make_facade(tmp_path: Path) -> Iterator[Any]:
    """Starts facades with the given environment overrides; stops them all at teardown."""
    started: list[FacadeProcess] = []

    def make(emulator_url: str, **overrides: str) -> FacadeProcess:
        log_path = tmp_path / f"facade-{len(started)}.log"
        facade = start_facade(facade_env(emulator_url, **overrides), log_path)
        started.append(facade)
        return facade

    yield make
    for facade in started:
        facade.stop()


@pytest.fixture
def facade(make_facade: Any, upstream: EmulatorProcess) -> FacadeProcess:
    """A facade with default settings in front of a freshly reset emulator."""
    return make_facade(upstream.url)  # type: ignore[no-any-return]


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    server = start_redis()
    yield server
    stop_process(server.proc)


def rich_status(error: grpc.RpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call, unpacked by type name."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    details: dict[str, Any] = {"code": error.code(), "message": error.details()}  # type: ignore[attr-defined]
    if status is None:
        return details
    for packed in status.details:
        for kind in (
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
        ):
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                details[kind.__name__] = detail
    return details
