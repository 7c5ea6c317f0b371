"""One holder of the Twilio credentials: identities keyed by the secret, and rotations (current +
previous) that lose no record, pending request or guest session."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from conftest import EmulatorProcess, RedisProcess, rich_status

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET, AUTH_TOKEN
from emulator.harness import guest_env

NEW_KEY = "SK" + "1" * 32
NEW_SECRET = "the-rotated-api-secret-0123456789abcdef"
FAST = {"FLEX_ATTEMPT_TIMEOUT_SECONDS": "0.5", "IDEMPOTENCY_LOCK_SECONDS": "1"}


def rotated(upstream: EmulatorProcess, *, old_too: bool = True) -> dict[str, str]:
    """The emulator accepts the new API key (and the old one while ``old_too``); the facade
    overrides that send with the new key."""
    accepted = {ACCOUNT_SID: AUTH_TOKEN, NEW_KEY: NEW_SECRET}
    if old_too:
        accepted[API_KEY] = API_SECRET
    upstream.accept_credentials(accepted)
    return {**guest_env(upstream.url), "TWILIO_API_KEY": NEW_KEY, "TWILIO_API_SECRET": NEW_SECRET}


PREVIOUS = {"TWILIO_PREVIOUS_API_KEY": API_KEY, "TWILIO_PREVIOUS_API_SECRET": API_SECRET}


def test_the_chosen_identity_is_keyed_by_the_secret_never_the_public_account_sid(
    make_facade: Any, upstream: EmulatorProcess
) -> None:
    request_id = str(uuid.uuid4())
    old = make_facade(upstream.url, **guest_env(upstream.url))
    first = old.create(request_id=request_id).identity
    old.stop()
    # Anyone can compute an HMAC keyed with the account SID (a token's `sub`) of a request_id.
    public = hmac.new(ACCOUNT_SID.encode(), request_id.encode(), hashlib.sha256).digest()
    assert first != str(uuid.UUID(bytes=public[:16], version=4))

    other_secret = make_facade(upstream.url, **rotated(upstream))
    assert other_secret.create(request_id=request_id).identity != first
    other_secret.stop()
    same_secret = make_facade(upstream.url, **guest_env(upstream.url))
    assert same_secret.create(request_id=request_id).identity == first


def test_a_request_pending_across_a_rotation_finds_its_conversation(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    env = {**guest_env(upstream.url), **FAST, "REDIS_URL": redis_server.url}
    doomed = make_facade(upstream.url, **env)
    upstream.fault(latency=0.3)
    request_id = str(uuid.uuid4())
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(doomed.create, request_id=request_id, timeout=5)
        time.sleep(0.15)  # the create is at Twilio now, under the old secret's identity
        doomed.proc.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError):
            call.result()
    upstream.fault(latency=0.0)
    time.sleep(1.1)  # the dead replica's lock expires
    survivor = make_facade(upstream.url, **{**env, **rotated(upstream), **PREVIOUS})
    reply = survivor.create(request_id=request_id, timeout=5)
    assert upstream.conversations() == {reply.conversation_sid: reply.identity}


def test_records_and_guest_sessions_of_the_previous_key_survive_a_restart_rotation(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    env = {**guest_env(upstream.url), "REDIS_URL": redis_server.url}
    old = make_facade(upstream.url, **env)
    request_id = str(uuid.uuid4())
    chat = old.create(request_id=request_id, issue_token=True)
    old.stop()

    new = make_facade(upstream.url, **{**env, **rotated(upstream, old_too=False), **PREVIOUS})
    replay = new.create(request_id=request_id, issue_token=True)
    assert (replay.conversation_sid, replay.identity) == (chat.conversation_sid, chat.identity)
    assert new.refresh(chat.access_token).identity == chat.identity  # signed by the old key
    fresh = new.refresh(replay.access_token)
    assert fresh.identity == chat.identity
    assert len(upstream.conversations()) == 1
    new.stop()

    # Once the operator removes the previous key, its tokens are refused; the new ones are not.
    after = make_facade(upstream.url, **{**env, **rotated(upstream, old_too=False)})
    with pytest.raises(grpc.RpcError) as caught:
        after.refresh(chat.access_token)
    assert rich_status(caught.value)["ErrorInfo"].reason == "TOKEN_INVALID"
    assert after.refresh(fresh.access_token).identity == chat.identity


def start_refusal(upstream: EmulatorProcess, **overrides: str) -> str:
    """Runs the facade against the emulator, expects exit 2; returns its one line."""
    from test_config_and_secrets import refusal

    from emulator.harness import facade_env

    return refusal(facade_env(upstream.url, **overrides))


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"TWILIO_AUTH_TOKEN": "a-garbage-auth-token-7f3a"}, "check TWILIO_AUTH_TOKEN"),
        ({"TWILIO_API_KEY": API_KEY, "TWILIO_API_SECRET": "garbage-7f3a"}, "TWILIO_API_SECRET"),
    ],
)
def test_credentials_twilio_refuses_stop_the_start_naming_the_variable(
    upstream: EmulatorProcess, overrides: dict[str, str], names: str
) -> None:
    line = start_refusal(upstream, **overrides)
    assert "Twilio refused the credentials (HTTP 401" in line and names in line
    assert "7f3a" not in line  # the secret itself never
    assert upstream.requests() == []  # a read only: nothing was created
    assert [c["path"] for c in upstream.checks()] == ["/v1/Configuration"]


def test_an_unknown_conversations_service_stops_the_start_naming_it(
    upstream: EmulatorProcess,
) -> None:
    env = {**guest_env(upstream.url), "TWILIO_CONVERSATIONS_SERVICE_SID": "IS" + "9" * 32}
    line = start_refusal(upstream, **env)
    assert "TWILIO_CONVERSATIONS_SERVICE_SID=IS99" in line and "404" in line


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 500}, {"status": 429}])
def test_twilio_unavailable_at_start_serves_and_checks_again(
    make_facade: Any, upstream: EmulatorProcess, fault: dict[str, Any]
) -> None:
    upstream.fault({**fault, "path": "/v1/Configuration"})
    facade = make_facade(upstream.url)
    assert facade.create().conversation_sid.startswith("CH")
    [warning] = [line for line in facade.log_lines() if line["level"] == "warning"]
    assert warning["msg"].startswith("could not check the Twilio credentials at start")
    deadline = time.monotonic() + 10
    while "Twilio accepted the credentials" not in facade.logs():
        assert time.monotonic() < deadline, facade.logs()
        time.sleep(0.1)
    assert [c["status"] for c in upstream.checks()][-1] == 200


# Reloading: the holder on its own, then a rotation under load through real processes.

KEY_2 = "SK" + "2" * 32
KEY_3 = "SK" + "3" * 32


class SecretVolume:
    """A Secret mounted as Kubernetes mounts it: each file is a symlink into ``..data``, itself a
    symlink to a fresh directory per version, swapped in one rename, so readers never see half
    an update."""

    def __init__(self, root: Any, **values: str) -> None:
        self.root, self.version = root, 0
        self.names = list(values)
        self.update(**values)
        for name in self.names:
            (root / name).symlink_to(f"..data/{name}")

    def update(self, **values: str) -> None:
        self.version += 1
        version = self.root / f"..v{self.version}"
        version.mkdir()
        for name in self.names:
            (version / name).write_text(values.get(name, ""))
        (self.root / "..data_tmp").symlink_to(version.name)
        (self.root / "..data_tmp").rename(self.root / "..data")

    def env(self) -> dict[str, str]:
        return {f"{name}_FILE": str(self.root / name) for name in self.names}


API_FILES = (
    "TWILIO_API_KEY",
    "TWILIO_API_SECRET",
    "TWILIO_PREVIOUS_API_KEY",
    "TWILIO_PREVIOUS_API_SECRET",
)


def api_volume(root: Any, key: str, secret: str, previous: tuple[str, str] = ("", "")) -> Any:
    values = dict(zip(API_FILES, (key, secret, *previous), strict=True))
    return SecretVolume(root, **values)


def holder(volume: SecretVolume) -> Any:
    from service.config import Settings
    from service.credentials import Credentials

    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, **volume.env()}
    return Credentials(Settings.from_env(env))


def test_a_reloaded_credential_sends_and_the_replaced_one_still_verifies(tmp_path: Any) -> None:
    volume = api_volume(tmp_path, API_KEY, API_SECRET)
    credentials = holder(volume)
    before = credentials.auth_header(), credentials.record_mac_keys(), credentials.identity_keys()
    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET=NEW_SECRET)
    asyncio.run(credentials.check_files())
    assert credentials.current.user == KEY_2 and credentials.auth_header() != before[0]
    assert [key.sid for key in credentials.verification_keys()] == [KEY_2, API_KEY]
    assert credentials.record_mac_keys()[1:] == before[1] != credentials.record_mac_keys()[:1]
    assert credentials.identity_keys()[1:] == before[2]

    # A second swap: both earlier keys stay accepted until restart.
    volume.update(TWILIO_API_KEY=KEY_3, TWILIO_API_SECRET="third-secret-0123456789abcdef")
    asyncio.run(credentials.check_files())
    assert [key.sid for key in credentials.verification_keys()] == [KEY_3, KEY_2, API_KEY]


def test_a_swap_while_the_facade_starts_is_not_missed(tmp_path: Any) -> None:
    from service.config import Settings
    from service.credentials import Credentials

    volume = api_volume(tmp_path, API_KEY, API_SECRET)
    settings = Settings.from_env({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, **volume.env()})
    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET=NEW_SECRET)  # before the holder exists
    credentials = Credentials(settings)
    assert credentials.current.user == KEY_2
    assert [key.sid for key in credentials.verification_keys()] == [KEY_2, API_KEY]


def test_an_invalid_new_set_keeps_the_one_in_use_logged_and_counted(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from service import observability as obs

    volume = api_volume(tmp_path, API_KEY, API_SECRET)
    credentials = holder(volume)
    failures = obs.CONFIG_RELOAD_FAILURES.labels(file="TWILIO_API_SECRET_FILE")
    counted = failures._value.get()
    volume.update(TWILIO_API_KEY=API_KEY, TWILIO_API_SECRET="")  # the secret is missing
    asyncio.run(credentials.check_files())
    assert credentials.current.user == API_KEY
    assert credentials.auth_header().startswith("Basic ")
    assert failures._value.get() == counted + 1
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "TWILIO_API_KEY is set without TWILIO_API_SECRET" in record.fields["error"]
    assert API_SECRET not in caplog.text

    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET=NEW_SECRET)  # fixed: applies
    asyncio.run(credentials.check_files())
    assert credentials.current.user == KEY_2


def test_a_previous_key_removed_by_the_operator_is_no_longer_accepted(tmp_path: Any) -> None:
    volume = api_volume(tmp_path, KEY_2, NEW_SECRET, previous=(API_KEY, API_SECRET))
    credentials = holder(volume)
    assert [key.sid for key in credentials.verification_keys()] == [KEY_2, API_KEY]
    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET=NEW_SECRET)
    asyncio.run(credentials.check_files())
    assert [key.sid for key in credentials.verification_keys()] == [KEY_2]
    assert len(credentials.record_mac_keys()) == 1


def test_two_rotations_under_load_lose_no_call_record_or_session(
    make_facade: Any, unlimited_upstream: EmulatorProcess, redis_server: RedisProcess, tmp_path: Any
) -> None:
    """The procedure of docs/operations.md, on two replicas sharing Redis, each with its own
    mounted Secret (the kubelet updates pods one by one), while callers create, replay on the
    other replica and refresh tokens minted before each rotation."""
    import random
    import threading

    upstream = unlimited_upstream
    secrets = {API_KEY: API_SECRET, KEY_2: NEW_SECRET, KEY_3: "third-secret-0123456789abcdef"}
    upstream.accept_credentials({ACCOUNT_SID: AUTH_TOKEN, **secrets})
    tokens_on = {
        k: v for k, v in guest_env(upstream.url).items() if not k.startswith("TWILIO_API_")
    }
    volumes, replicas = [], []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        volume = api_volume(tmp_path / name, API_KEY, API_SECRET)
        env = {**tokens_on, **volume.env(), "REDIS_URL": redis_server.url}
        volumes.append(volume)
        replicas.append(make_facade(upstream.url, FLEX_RATE_LIMIT_RPS="0", **env))

    failures: list[BaseException] = []
    created: dict[str, str] = {}  # request_id -> conversation
    sessions: list[tuple[str, str]] = []  # (access token, identity), from every phase
    stop = threading.Event()

    def caller(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - picks replicas, not secrets
        while not stop.is_set():
            try:
                first, other = rng.sample(replicas, 2)
                request_id = str(uuid.uuid4())
                chat = first.create(request_id=request_id, issue_token=True)
                replay = other.create(request_id=request_id, issue_token=True)
                assert replay.conversation_sid == chat.conversation_sid
                created[request_id] = chat.conversation_sid
                sessions.append((chat.access_token, chat.identity))
                token, identity = rng.choice(sessions)
                assert rng.choice(replicas).refresh(token).identity == identity
            except BaseException as exc:  # every failure is the test's result
                failures.append(exc)

    def reloads() -> int:
        return sum(r.logs().count("reloaded Twilio credentials") for r in replicas)

    def roll_out(**values: str) -> None:
        """Updates each replica's Secret in turn; returns once both applied it."""
        for volume in volumes:
            before = reloads()
            volume.update(**values)
            deadline = time.monotonic() + 10
            while reloads() == before:
                assert time.monotonic() < deadline, "not reloaded within 10 s"
                time.sleep(0.1)
            time.sleep(0.5)  # under load, one replica ahead of the other

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        current = (API_KEY, API_SECRET)
        for new_key in (KEY_2, KEY_3):
            new = (new_key, secrets[new_key])
            # 1. Every replica accepts the new key; 2. every replica sends with it.
            roll_out(**dict(zip(API_FILES, (*current, *new), strict=True)))
            roll_out(**dict(zip(API_FILES, (*new, *current), strict=True)))
            current = new
            time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert failures == []
    assert len(created) > 20 and len(set(created.values())) == len(created)
    assert sorted(upstream.conversations()) == sorted(created.values())
    senders = [r["headers"]["Authorization"] for r in upstream.requests()]
    keys_used = {httpx_user(header) for header in senders}
    assert keys_used == {API_KEY, KEY_2, KEY_3}
    assert httpx_user(senders[-1]) == KEY_3
    # Sessions begun under the first key still refresh, until restart.
    assert replicas[0].refresh(sessions[0][0]).identity == sessions[0][1]


def httpx_user(authorization: str) -> str:
    import base64

    return base64.b64decode(authorization.split()[1]).decode().partition(":")[0]


def test_a_new_redis_password_from_redis_url_file_reconnects(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess, tmp_path: Any
) -> None:
    import redis

    admin = redis.Redis(port=redis_server.port)
    admin.config_set("requirepass", "old-pass-0123")
    url_file = tmp_path / "redis-url"
    url_file.write_text(f"redis://:old-pass-0123@127.0.0.1:{redis_server.port}/0")
    facade = make_facade(upstream.url, REDIS_URL_FILE=str(url_file))
    request_id = str(uuid.uuid4())
    chat = facade.create(request_id=request_id)

    admin = redis.Redis(port=redis_server.port, password="old-pass-0123")
    admin.config_set("requirepass", "new-pass-4567")  # connections made before stay in
    url_file.write_text(f"redis://:new-pass-4567@127.0.0.1:{redis_server.port}/0")
    deadline = time.monotonic() + 10
    while "reconnecting to Redis" not in facade.logs():
        assert time.monotonic() < deadline, "REDIS_URL_FILE not reloaded within 10 s"
        time.sleep(0.1)
    redis.Redis(port=redis_server.port, password="new-pass-4567").client_kill_filter(
        _type="normal", skipme=False
    )
    assert facade.create(request_id=request_id).conversation_sid == chat.conversation_sid
    assert facade.create(request_id=str(uuid.uuid4())).conversation_sid.startswith("CH")
    assert "new-pass" not in facade.logs() and "old-pass" not in facade.logs()


def wait_for_log(facade: Any, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while facade.logs().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} within 10 s: {facade.logs()}"
        time.sleep(0.1)


def test_a_reloaded_secret_twilio_refuses_is_not_applied(
    make_facade: Any, upstream: EmulatorProcess, tmp_path: Any
) -> None:
    upstream.accept_credentials({ACCOUNT_SID: AUTH_TOKEN, API_KEY: API_SECRET, KEY_2: NEW_SECRET})
    volume = api_volume(tmp_path, API_KEY, API_SECRET)
    facade = make_facade(upstream.url, **volume.env())
    refused = 'flexwebchat_config_reload_failures_total{file="TWILIO_API_SECRET_FILE"}'
    assert facade.metric(refused) == 0

    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET="well-formed-but-wrong-7f3a")
    wait_for_log(facade, "new Twilio credentials refused")
    [error] = [line for line in facade.log_lines() if line["level"] == "error"]
    assert error["file"] == "TWILIO_API_SECRET_FILE" and "HTTP 401" in error["error"]
    assert facade.metric(refused) == 1
    failing = 'flexwebchat_config_reload_failing{file="TWILIO_API_SECRET_FILE"}'
    assert facade.metric(failing) == 1  # for as long as the file stays wrong
    assert "reloaded Twilio credentials" not in facade.logs() and "7f3a" not in facade.logs()
    assert facade.create().conversation_sid.startswith("CH")  # still sent with the old key
    assert httpx_user(upstream.requests()[-1]["headers"]["Authorization"]) == API_KEY

    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET=NEW_SECRET)  # fixed: applies
    wait_for_log(facade, "reloaded Twilio credentials")
    assert facade.metric(failing) == 0 and facade.metric(refused) == 1
    assert facade.create().conversation_sid.startswith("CH")
    assert httpx_user(upstream.requests()[-1]["headers"]["Authorization"]) == KEY_2


def test_a_reloaded_secret_applies_when_twilio_cannot_tell(
    make_facade: Any, upstream: EmulatorProcess, tmp_path: Any
) -> None:
    upstream.accept_credentials({ACCOUNT_SID: AUTH_TOKEN, API_KEY: API_SECRET, KEY_2: NEW_SECRET})
    volume = api_volume(tmp_path, API_KEY, API_SECRET)
    facade = make_facade(upstream.url, **volume.env())
    upstream.fault({"status": 503, "path": "/v1/Configuration"})
    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET=NEW_SECRET)
    wait_for_log(facade, "reloaded Twilio credentials")
    assert "could not check the reloaded Twilio credential; applying it" in facade.logs()
    assert facade.create().conversation_sid.startswith("CH")
    assert httpx_user(upstream.requests()[-1]["headers"]["Authorization"]) == KEY_2


def test_a_refused_reload_is_counted_under_the_variable_to_fix(tmp_path: Any) -> None:
    from service import observability as obs

    volume = api_volume(tmp_path, API_KEY, API_SECRET)
    credentials = holder(volume)
    failures = obs.CONFIG_RELOAD_FAILURES.labels(file="TWILIO_PREVIOUS_API_SECRET_FILE")
    counted = failures._value.get()
    volume.update(TWILIO_API_KEY=KEY_2, TWILIO_API_SECRET=NEW_SECRET, TWILIO_PREVIOUS_API_KEY=KEY_3)
    asyncio.run(credentials.check_files())
    assert failures._value.get() == counted + 1
    assert credentials.current.user == API_KEY


@pytest.mark.parametrize("wrong", ["password", "port"])
def test_a_redis_url_file_that_cannot_work_keeps_the_url_in_use(
    make_facade: Any,
    upstream: EmulatorProcess,
    redis_server: RedisProcess,
    tmp_path: Any,
    wrong: str,
) -> None:
    import redis

    from emulator.harness import free_port

    redis.Redis(port=redis_server.port).config_set("requirepass", "the-pass-0123")
    url_file = tmp_path / "redis-url"
    url_file.write_text(f"redis://:the-pass-0123@127.0.0.1:{redis_server.port}/0")
    facade = make_facade(upstream.url, REDIS_URL_FILE=str(url_file))
    request_id = str(uuid.uuid4())
    chat = facade.create(request_id=request_id)

    port = redis_server.port if wrong == "password" else free_port()
    password = "wrong-pass-7f3a" if wrong == "password" else "the-pass-0123"
    url_file.write_text(f"redis://:{password}@127.0.0.1:{port}/0")
    wait_for_log(facade, "new REDIS_URL refused")
    [error] = [line for line in facade.log_lines() if line["level"] == "error"]
    assert error["file"] == "REDIS_URL_FILE"
    assert (
        "refused its user or password" if wrong == "password" else "cannot be reached"
    ) in error["error"]
    assert facade.metric('flexwebchat_config_reload_failures_total{file="REDIS_URL_FILE"}') == 1
    assert facade.metric('flexwebchat_config_reload_failing{file="REDIS_URL_FILE"}') == 1
    assert "reconnecting to Redis" not in facade.logs() and "pass-" not in facade.logs()
    assert facade.create(request_id=request_id).conversation_sid == chat.conversation_sid
    assert facade.create(request_id=str(uuid.uuid4())).conversation_sid.startswith("CH")
