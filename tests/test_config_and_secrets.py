"""Settings from the environment, refusing to start, and secrets that never leak."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, EmulatorProcess, facade_env, rich_status

from service.config import ConfigError, Settings

ACCOUNT = "AC" + "a" * 32
KEY = "SK" + "b" * 32
CREDS = {"TWILIO_ACCOUNT_SID": ACCOUNT, "TWILIO_AUTH_TOKEN": "t"}


def test_account_credentials_and_default_host() -> None:
    s = Settings.from_env({"TWILIO_ACCOUNT_SID": ACCOUNT, "TWILIO_AUTH_TOKEN": "tok"})
    assert (s.username, s.password.reveal()) == (ACCOUNT, "tok")
    assert s.base_url == "https://flex-api.twilio.com"
    assert (s.rate_limit_rps, s.grpc_port, s.metrics_port, s.log_format) == (
        5.0,
        50051,
        9464,
        "json",
    )


def test_api_key_is_preferred_over_auth_token() -> None:
    env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT,
        "TWILIO_AUTH_TOKEN": "tok",
        "TWILIO_API_KEY": KEY,
        "TWILIO_API_SECRET": "sec",
    }
    s = Settings.from_env(env)
    assert (s.username, s.password.reveal()) == (KEY, "sec")


@pytest.mark.parametrize(
    ("region", "edge", "host"),
    [
        ("ie1", "dublin", "flex-api.dublin.ie1.twilio.com"),
        ("", "sydney", "flex-api.sydney.us1.twilio.com"),
        ("au1", "", "flex-api.au1.twilio.com"),
    ],
)
def test_region_and_edge_select_the_host_as_twilio_python_does(
    region: str, edge: str, host: str
) -> None:
    env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT,
        "TWILIO_AUTH_TOKEN": "t",
        "TWILIO_REGION": region,
        "TWILIO_EDGE": edge,
    }
    assert Settings.from_env(env).base_url == f"https://{host}"


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "sid").write_text(ACCOUNT + "\n")
    (tmp_path / "token").write_text("file-token\n")
    s = Settings.from_env(
        {
            "TWILIO_ACCOUNT_SID_FILE": str(tmp_path / "sid"),
            "TWILIO_AUTH_TOKEN_FILE": str(tmp_path / "token"),
        }
    )
    assert (s.username, s.password.reveal()) == (ACCOUNT, "file-token")


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "no Twilio credentials"),
        # Each names the variable that is missing, wrong or in conflict, and the fix.
        ({"TWILIO_ACCOUNT_SID": ACCOUNT}, "TWILIO_ACCOUNT_SID is set without a secret: set"),
        ({"TWILIO_AUTH_TOKEN": "t"}, "TWILIO_AUTH_TOKEN is set without TWILIO_ACCOUNT_SID: set"),
        ({"TWILIO_API_KEY": KEY}, "TWILIO_API_KEY is set without TWILIO_API_SECRET: set"),
        ({"TWILIO_API_SECRET": "s"}, "TWILIO_API_SECRET is set without TWILIO_API_KEY: set"),
        (
            {**CREDS, "TWILIO_PREVIOUS_API_KEY": KEY},
            "TWILIO_PREVIOUS_API_KEY is set without TWILIO_PREVIOUS_API_SECRET: set",
        ),
        (
            {"TWILIO_API_KEY": KEY, "TWILIO_API_SECRET": "s", "TWILIO_PREVIOUS_AUTH_TOKEN": "t"},
            "TWILIO_PREVIOUS_AUTH_TOKEN needs TWILIO_ACCOUNT_SID",
        ),
        ({**CREDS, "TWILIO_REGION": "ie-1"}, "TWILIO_REGION must be one of us1, ie1, au1"),
        (
            # Checked even when both hosts are overridden: tokens carry the region too.
            {**CREDS, "TWILIO_REGION": "eu1", "FLEX_API_BASE_URL": "http://127.0.0.1:1"},
            "TWILIO_REGION must be one of us1, ie1, au1",
        ),
        (
            {**CREDS, "FLEX_DEFAULT_DEADLINE_SECONDS": "90"},
            "FLEX_DEFAULT_DEADLINE_SECONDS (90) is above FLEX_MAX_DEADLINE_SECONDS (60)",
        ),
        (
            {**CREDS, "IDEMPOTENCY_LOCK_SECONDS": "120", "IDEMPOTENCY_TTL_SECONDS": "60"},
            "IDEMPOTENCY_LOCK_SECONDS (120) is above IDEMPOTENCY_TTL_SECONDS (60)",
        ),
        (
            {"TWILIO_ACCOUNT_SID": "ACnope", "TWILIO_AUTH_TOKEN": "t"},
            "TWILIO_ACCOUNT_SID must look like",
        ),
        (
            {"TWILIO_AUTH_TOKEN_FILE": "/nonexistent/token", "TWILIO_ACCOUNT_SID": ACCOUNT},
            "cannot be read",
        ),
        ({**CREDS, "FLEX_API_BASE_URL": "http://flex.example.com"}, "only to a loopback host"),
        ({**CREDS, "FLEX_API_BASE_URL": "ftp://127.0.0.1"}, "must be an http(s) URL"),
        ({**CREDS, "FLEX_RATE_LIMIT_RPS": "fast"}, "FLEX_RATE_LIMIT_RPS must be a number"),
        (
            {**CREDS, "FLEX_RATE_LIMIT_RPS": "-1"},
            "FLEX_RATE_LIMIT_RPS must be a finite number >= 0",
        ),
        ({**CREDS, "GRPC_PORT": "70000"}, "GRPC_PORT must be a port"),
        (
            {**CREDS, "GRPC_MAX_UNAUTHENTICATED_CONNECTIONS_PER_PEER": "2.7"},
            "GRPC_MAX_UNAUTHENTICATED_CONNECTIONS_PER_PEER must be a whole number, got '2.7'",
        ),
        ({**CREDS, "LOG_FORMAT": "xml"}, "LOG_FORMAT must be one of json, console"),
        ({**CREDS, "GUEST_SESSION_MAX_SECONDS": "59"}, "GUEST_SESSION_MAX_SECONDS must be"),
        ({**CREDS, "GUEST_SESSION_MAX_SECONDS": "2592001"}, "from 60 to 2592000, got '2592001'"),
        ({**CREDS, "GUEST_SESSION_MAX_SECONDS": "90.5"}, "from 60 to 2592000, got '90.5'"),
        ({**CREDS, "REDIS_URL": "http://:pw@h:6379"}, "REDIS_URL must be a redis://"),
        ({**CREDS, "REDIS_URL": "redis://:pw@h:port/0"}, "REDIS_URL is not a valid URL"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(env: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("host", "listens_on"), [("::", "[::]"), ("[::]", "[::]"), ("127.0.0.1", "127.0.0.1")]
)
def test_grpc_host_takes_an_ipv6_address_with_or_without_brackets(
    host: str, listens_on: str
) -> None:
    assert Settings.from_env({**CREDS, "GRPC_HOST": host}).grpc_host == listens_on


def test_flex_max_connections_bounds_the_upstream_pool() -> None:
    assert Settings.from_env(CREDS).upstream_max_connections == 100
    wide = Settings.from_env({**CREDS, "FLEX_MAX_CONNECTIONS": "1000"})
    assert wide.upstream_max_connections == 1000
    with pytest.raises(ConfigError, match="FLEX_MAX_CONNECTIONS"):
        Settings.from_env({**CREDS, "FLEX_MAX_CONNECTIONS": "0"})


def test_loopback_http_is_allowed_for_the_emulator() -> None:
    for url in ("http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9"):
        env = {"TWILIO_ACCOUNT_SID": ACCOUNT, "TWILIO_AUTH_TOKEN": "t", "FLEX_API_BASE_URL": url}
        assert Settings.from_env(env).base_url == url


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"TWILIO_ACCOUNT_SID": "", "TWILIO_AUTH_TOKEN": ""}, "no Twilio credentials"),
        ({"FLEX_API_BASE_URL": "http://10.1.2.3"}, "http:// only to a loopback host"),
        (
            # Guest tokens on, but the facade runs on an auth token, which cannot sign them.
            {"TWILIO_CONVERSATIONS_SERVICE_SID": "IS" + "0" * 32},
            "also need TWILIO_API_KEY, TWILIO_API_SECRET",
        ),
        (
            # The shared budget is the account's; an API key alone does not say which account.
            {
                "TWILIO_ACCOUNT_SID": "",
                "TWILIO_AUTH_TOKEN": "",
                "TWILIO_API_KEY": KEY,
                "TWILIO_API_SECRET": "s",
                "REDIS_URL": "redis://127.0.0.1:1/0",
            },
            "TWILIO_ACCOUNT_SID is required with TWILIO_API_KEY when REDIS_URL is set",
        ),
        # Unauthenticated callers' records are filed under "anonymous".
        ({"TLS_CLIENT_NAMES": "billing,anonymous"}, "TLS_CLIENT_NAMES: the name 'anonymous'"),
        ({"TLS_CLIENT_NAMES": "Anonymous"}, "TLS_CLIENT_NAMES: the name 'anonymous'"),
    ],
)
def test_startup_refuses_with_one_line_and_nonzero_exit(env: dict[str, str], reason: str) -> None:
    assert reason in refusal(facade_env("http://127.0.0.1:1", **env))


def refusal(env: dict[str, str]) -> str:
    """Runs `python -m service`, expects it to refuse to start; returns its one-line reason."""
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    # gRPC's C core may log its own bind error first; ours is one line, the last.
    [line] = [x for x in result.stderr.splitlines() if x.startswith("flexwebchat:")]
    assert line.startswith("flexwebchat: refusing to start: ")
    assert result.stderr.strip().endswith(line) and "Traceback" not in result.stderr
    assert "Unclosed" not in result.stdout + result.stderr  # nothing left open behind it
    return line


def test_settings_repr_hides_secrets() -> None:
    env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT,
        "TWILIO_API_KEY": KEY,
        "TWILIO_API_SECRET": "api-secret-value",
        "REDIS_URL": "redis://:redis-pass@h:6379",
    }
    text = repr(Settings.from_env(env)) + str(Settings.from_env(env))
    assert "api-secret-value" not in text and "redis-pass" not in text
    assert "Secret('********')" in text


@pytest.mark.parametrize("kind", ["auth_token", "api_key"])
def test_secrets_never_appear_in_logs_or_errors_on_upstream_401(
    make_facade, upstream: EmulatorProcess, kind: str
) -> None:
    from emulator.app import ACCOUNT_SID

    secret = "SECRET-" + kind + "-7f3a9c"
    creds = (
        {"TWILIO_AUTH_TOKEN": secret}
        if kind == "auth_token"
        else {"TWILIO_API_KEY": KEY, "TWILIO_API_SECRET": secret}
    )
    upstream.accept_credentials({KEY if kind == "api_key" else ACCOUNT_SID: secret})
    facade = make_facade(upstream.url, LOG_LEVEL="DEBUG", **creds)
    upstream.accept_credentials({})  # revoked at Twilio after the start-up check
    with pytest.raises(grpc.RpcError) as caught:
        facade.create()

    status = rich_status(caught.value)
    assert (
        status["code"] == grpc.StatusCode.INTERNAL
    )  # the facade's credentials, not the caller's fault
    assert status["ErrorInfo"].metadata["twilio_code"] == "20003"
    assert upstream.requests()[0]["status"] == 401  # the secret did go out, to the upstream only
    facade.stop()
    everything_said = facade.logs() + str(status) + caught.value.debug_error_string()
    assert secret not in everything_said
    authorization = upstream.requests()[0]["headers"]["Authorization"]
    assert authorization.split()[1] not in everything_said
    assert "20003" in facade.logs()  # the failure itself is logged


def test_a_port_in_use_is_a_one_line_refusal() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for variable in ("GRPC_PORT", "METRICS_PORT"):
            env = facade_env("http://127.0.0.1:1", **{variable: str(port)})
            assert variable in refusal(env)


def test_a_grpc_port_held_by_another_facade_is_refused(
    make_facade, unlimited_upstream: EmulatorProcess
) -> None:
    # gRPC's default SO_REUSEPORT would let a second facade share the port, each with its own
    # records and rate budget: two conversations for one request_id.
    first = make_facade(unlimited_upstream.url, FLEX_RATE_LIMIT_RPS="0")
    env = facade_env(unlimited_upstream.url, GRPC_PORT=str(first.port))
    assert "GRPC_PORT" in refusal(env)
    assert first.create().conversation_sid.startswith("CH")  # the first one is untouched


def test_a_bad_flex_ui_version_refuses_to_start(upstream) -> None:
    env = facade_env(upstream.url, FLEX_UI_VERSION="2.0 beta")
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "flexwebchat: refusing to start: FLEX_UI_VERSION must be 1-64 visible ASCII "
        "characters, e.g. 2.0.0"
    )


@pytest.mark.parametrize(("soft", "hard", "warned"), [(256, 8192, False), (256, 512, True)])
def test_the_open_file_limit_is_raised_to_what_the_connection_cap_needs(
    soft: int, hard: int, warned: bool
) -> None:
    """A runtime's soft limit of 1024 is below GRPC_MAX_CONNECTIONS' default: past it, accepts
    and upstream requests fail. The facade lifts it to the hard limit, and says when even that
    is short."""
    import resource

    script = (
        "import logging, resource, sys; logging.basicConfig(stream=sys.stdout);"
        "from service.config import Settings; from service.server import raise_file_limit;"
        "s = Settings.from_env({'TWILIO_ACCOUNT_SID': 'AC' + '0' * 32, 'TWILIO_AUTH_TOKEN': 't',"
        " 'GRPC_MAX_CONNECTIONS': '1000'});"
        "print('limit', raise_file_limit(s), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert f"limit {hard} {hard}" in result.stdout, result.stderr
    assert ("open-file limit is below" in result.stdout) == warned


def test_a_redis_password_refused_is_a_one_line_refusal_naming_redis_url(redis_server) -> None:
    import redis

    redis.Redis(port=redis_server.port).config_set("requirepass", "the-right-password")
    for url in (
        redis_server.url,  # no password at all
        f"redis://:wrong-pass-9e2b@127.0.0.1:{redis_server.port}/0",
    ):
        line = refusal(facade_env("http://127.0.0.1:1", REDIS_URL=url))
        assert "REDIS_URL: Redis refused its user or password" in line, line
        assert "wrong-pass" not in line
