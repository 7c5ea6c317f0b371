"""Redis over TLS with a certificate from a private CA (REDIS_CA_FILE), as managed Redis services
and in-cluster Redis with cert-manager serve it: a real redis-server with a TLS port only."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import EmulatorProcess, free_port, stop_process
from test_caller_auth import Pem, issue

from service.config import ConfigError, Settings


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """rediss:// URL of a redis-server that speaks TLS only, and its private CA's file."""
    ca = issue("private-redis-ca", ca=True)
    server: Pem = issue("localhost", ca, server=True)
    for name, data in {
        "ca.pem": ca.cert,
        "redis.pem": server.cert,
        "redis.key": server.key,
    }.items():
        (tmp_path / name).write_bytes(data)
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary, "redis-server is installed by `make system-deps`"
    command = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    command += ["--tls-cert-file", str(tmp_path / "redis.pem")]
    command += ["--tls-key-file", str(tmp_path / "redis.key")]
    command += ["--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no"]
    command += ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url, ssl_ca_certs=str(tmp_path / "ca.pem")).ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline and proc.poll() is None, "no TLS redis-server"
                time.sleep(0.05)
        yield url, tmp_path / "ca.pem"
    finally:
        stop_process(proc)


def test_redis_tls_from_a_private_ca(
    tls_redis: tuple[str, Path], make_facade: Any, upstream: EmulatorProcess
) -> None:
    url, ca_file = tls_redis
    facade = make_facade(upstream.url, REDIS_URL=url, REDIS_CA_FILE=str(ca_file))
    request_id = str(uuid.uuid4())
    first = facade.create(request_id=request_id)
    assert facade.create(request_id=request_id).conversation_sid == first.conversation_sid
    # The record is in that Redis, over TLS.
    stored = redis.Redis.from_url(url, ssl_ca_certs=str(ca_file)).keys("flexwebchat:*")
    assert stored
    assert len(upstream.requests()) == 1


def test_redis_ca_file_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    credentials = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "token"}
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    plain = {**credentials, "REDIS_URL": "redis://redis:6379/0"}
    with pytest.raises(ConfigError, match=r"^REDIS_CA_FILE is for a rediss:// \(TLS\) REDIS_URL"):
        Settings.from_env({**plain, "REDIS_CA_FILE": str(tmp_path / "ca.pem")})
    tls = {**credentials, "REDIS_URL": "rediss://redis:6380/0"}
    with pytest.raises(ConfigError, match=r"^REDIS_CA_FILE=\S+ cannot be read"):
        Settings.from_env({**tls, "REDIS_CA_FILE": str(tmp_path / "missing.pem")})
    settings = Settings.from_env({**tls, "REDIS_CA_FILE": str(tmp_path / "ca.pem")})
    assert settings.redis_ca_file == str(tmp_path / "ca.pem")
