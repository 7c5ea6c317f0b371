"""Fixtures: real processes on loopback (emulator, facade, Redis), every one stopped at teardown."""

from __future__ import annotations

import os
import shutil
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

# The tools `make test` installs from Debian's packages (as root), each with its package.
# `make check` (FLEXWEBCHAT_CHECK=1) runs without them: it skips what needs one, as does a run
# where one is missing, with one summary line per tool.
SYSTEM_TOOLS = {
    "redis-server": "redis-server",
    "podman": "podman, runc and debootstrap",
    "promtool": "prometheus",
    "go": "golang-go and Debian's grpc-go packages",
    "javac": "default-jdk-headless and libgrpc-java",
}
QUICK = os.environ.get("FLEXWEBCHAT_CHECK") == "1"


def needs(tool: str) -> None:
    """Skips the calling test when ``tool`` is absent, or under ``make check``."""
    if QUICK or shutil.which(tool) is None:
        pytest.skip(f"needs {tool}: `make test` installs it (Debian: {SYSTEM_TOOLS[tool]})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(tool): runs a tool that `make test` installs")


# Under `make check`, of the tests that run the facade against the emulator only these files'
# run: the API end to end, grpcurl, and make run with the README's commands. The rest (about ten
# minutes on 2 cores) is for `make test`.
QUICK_END_TO_END = {"test_e2e.py", "test_grpcurl.py", "test_make_run.py"}
END_TO_END_FIXTURES = {"make_facade", "facade", "emulator", "fast_emulator"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not QUICK:
        return
    kept, left = [], []
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        slow = uses & END_TO_END_FIXTURES and item.path.name not in QUICK_END_TO_END
        # test_client_package builds and installs wheels: minutes on its own.
        (left if slow or item.path.name == "test_client_package.py" else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)  # "N deselected": `make test` runs them
        items[:] = kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        for tool in mark.args:
            needs(tool)


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
    needs("redis-server")
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
