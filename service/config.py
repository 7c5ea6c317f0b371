"""The facade's settings: one frozen, validated object built from the environment.

Every secret may also be given as ``NAME_FILE``, a path to a file holding it (how Kubernetes
mounts Secrets). Secrets are wrapped in :class:`Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .identities import FACADE_IDENTITY_PREFIX


class ConfigError(Exception):
    """The environment does not describe a runnable facade; the message is one line."""


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Credential:
    """One Twilio credential: the HTTP Basic user (an API key or account SID) and its secret
    (the API key secret or the auth token)."""

    user: str
    secret: Secret

    @property
    def is_api_key(self) -> bool:
        return self.user.startswith("SK")


@dataclass(frozen=True)
class CredentialSet:
    """The credential the facade sends with, and the previous ones it still accepts (records,
    refresh tokens and pending identities made with them verify; nothing is sent with them)."""

    account_sid: str
    current: Credential
    previous: tuple[Credential, ...] = ()


# Every secret the facade re-reads when its *_FILE changes (service.credentials).
CREDENTIAL_VARIABLES = (
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_API_KEY",
    "TWILIO_API_SECRET",
    "TWILIO_PREVIOUS_API_KEY",
    "TWILIO_PREVIOUS_API_SECRET",
    "TWILIO_PREVIOUS_AUTH_TOKEN",
)
RELOADED_VARIABLES = (*CREDENTIAL_VARIABLES, "REDIS_URL")


@dataclass(frozen=True)
class Settings:
    # Upstream
    username: str  # account SID or API key SID: the HTTP Basic user
    password: Secret  # auth token or API key secret
    base_url: str
    account_sid: str = ""  # TWILIO_ACCOUNT_SID, when set (a guest token's subject)
    api_key: str = ""  # TWILIO_API_KEY, when set (signs guest tokens)
    api_secret: Secret | None = None
    region: str = ""
    ui_version: str = ""
    attempt_timeout: float = 10.0
    latency_estimate: float = 0.5  # expected attempt duration until enough are observed
    max_attempts: int = 4
    upstream_max_connections: int = 100  # HTTP requests to Twilio in flight at once
    retry_ambiguous: bool = False
    default_deadline: float = 30.0
    max_deadline: float = 60.0
    # Guest sessions: access tokens, and the guest's first message (Conversations API)
    conversations_url: str = "https://conversations.twilio.com"
    conversations_service_sid: str = ""  # set: guest tokens are on
    guest_token_ttl: int = 3600
    guest_session_max: int = 86400  # no token outlives its session's start plus this
    # Account-wide rate limit
    rate_limit_rps: float = 5.0
    rate_limit_burst: int = 1
    max_pending_per_caller: int = 100
    # Idempotency records
    idempotency_ttl: float = 24 * 3600.0
    idempotency_lock: float = 10.0
    idempotency_max_local_records: int = 100_000
    redis_url: Secret | None = None
    redis_ca_file: str = ""  # the CA that signed a rediss:// server's certificate, if private
    # Server
    grpc_host: str = "[::]"
    grpc_port: int = 50051
    metrics_host: str = "[::]"  # METRICS_HOST, else GRPC_HOST
    metrics_port: int = 9464
    health_port: int = 0
    log_level: str = "INFO"
    log_format: str = "json"
    shutdown_delay: float = 5.0
    shutdown_grace: float = 20.0
    max_concurrent_rpcs: int = 256
    max_concurrent_rpcs_per_caller: int = 64  # with caller auth on: one caller's share of them
    max_message_bytes: int = 64 * 1024
    max_connection_age: float = 300.0
    max_connections: int = 1000
    max_connections_per_caller: int = 100  # with caller auth on
    max_connection_idle: float = 120.0
    unauthenticated_connection_grace: float = 10.0
    max_unauthenticated_per_peer: int = 16
    request_message_timeout: float = 10.0
    # Caller authentication (off unless configured)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_client_names: frozenset[str] = frozenset()
    auth_tokens_file: str = ""
    # caller -> the prefix of the identities it may choose (none: it may not choose)
    caller_identity_prefixes: Mapping[str, str] = field(default_factory=dict)
    # The start-time credentials (the sending one is username/password above), and where the
    # reloadable secrets come from: service.credentials re-reads them.
    credentials: CredentialSet | None = None
    secret_sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _EnvReader(env)
        credentials = read_credentials(env)
        api_secret = reader.secret("TWILIO_API_SECRET")
        max_rpcs = reader.integer("GRPC_MAX_CONCURRENT_RPCS", 256, minimum=1)
        settings = cls(
            username=credentials.current.user,
            password=credentials.current.secret,
            base_url=_base_url(reader, "flex-api", "FLEX_API_BASE_URL"),
            account_sid=reader.secret("TWILIO_ACCOUNT_SID"),
            api_key=reader.secret("TWILIO_API_KEY"),
            api_secret=Secret(api_secret) if api_secret else None,
            region=_region(reader),
            conversations_url=_base_url(reader, "conversations", "CONVERSATIONS_API_BASE_URL"),
            conversations_service_sid=_service_sid(reader.text("TWILIO_CONVERSATIONS_SERVICE_SID")),
            guest_token_ttl=_token_ttl(reader),
            guest_session_max=_session_max(reader),
            ui_version=_ui_version(reader.text("FLEX_UI_VERSION")),
            attempt_timeout=reader.number("FLEX_ATTEMPT_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            latency_estimate=reader.number("FLEX_LATENCY_ESTIMATE_SECONDS", 0.5, minimum=0.0),
            max_attempts=reader.integer("FLEX_MAX_ATTEMPTS", 4, minimum=1),
            upstream_max_connections=reader.integer("FLEX_MAX_CONNECTIONS", 100, minimum=1),
            retry_ambiguous=reader.flag("FLEX_RETRY_AMBIGUOUS"),
            default_deadline=reader.number("FLEX_DEFAULT_DEADLINE_SECONDS", 30.0, minimum=0.1),
            max_deadline=reader.number("FLEX_MAX_DEADLINE_SECONDS", 60.0, minimum=0.1),
            rate_limit_rps=reader.number("FLEX_RATE_LIMIT_RPS", 5.0, minimum=0.0),
            rate_limit_burst=reader.integer("FLEX_RATE_LIMIT_BURST", 1, minimum=1),
            max_pending_per_caller=reader.integer("FLEX_MAX_PENDING_PER_CALLER", 100, minimum=1),
            idempotency_ttl=reader.number("IDEMPOTENCY_TTL_SECONDS", 86400.0, minimum=1.0),
            idempotency_lock=reader.number("IDEMPOTENCY_LOCK_SECONDS", 10.0, minimum=0.5),
            idempotency_max_local_records=reader.integer(
                "IDEMPOTENCY_MAX_LOCAL_RECORDS", 100_000, minimum=100
            ),
            redis_url=redis_url(reader.secret("REDIS_URL")),
            redis_ca_file=reader.text("REDIS_CA_FILE"),
            grpc_host=_bracketed(reader.text("GRPC_HOST") or "[::]"),
            grpc_port=reader.port("GRPC_PORT", 50051),
            metrics_host=_bracketed(
                reader.text("METRICS_HOST") or reader.text("GRPC_HOST") or "[::]"
            ),
            metrics_port=reader.port("METRICS_PORT", 9464),
            health_port=reader.port("HEALTH_PORT", 0),
            log_level=reader.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_format=reader.choice("LOG_FORMAT", "json", ("json", "console")),
            shutdown_delay=reader.number("SHUTDOWN_DELAY_SECONDS", 5.0, minimum=0.0),
            shutdown_grace=reader.number("SHUTDOWN_GRACE_SECONDS", 20.0, minimum=0.0),
            max_concurrent_rpcs=max_rpcs,
            max_concurrent_rpcs_per_caller=reader.integer(
                "GRPC_MAX_CONCURRENT_RPCS_PER_CALLER", max(max_rpcs // 4, 1), minimum=1
            ),
            max_message_bytes=reader.integer("GRPC_MAX_MESSAGE_BYTES", 65536, minimum=1024),
            max_connection_age=reader.number("GRPC_MAX_CONNECTION_AGE_SECONDS", 300.0, minimum=0),
            max_connections=reader.integer("GRPC_MAX_CONNECTIONS", 1000, minimum=1),
            max_connections_per_caller=reader.integer(
                "GRPC_MAX_CONNECTIONS_PER_CALLER", 100, minimum=1
            ),
            max_connection_idle=reader.number(
                "GRPC_MAX_CONNECTION_IDLE_SECONDS", 120.0, minimum=1.0
            ),
            unauthenticated_connection_grace=reader.number(
                "GRPC_UNAUTHENTICATED_CONNECTION_SECONDS", 10.0, minimum=1.0
            ),
            max_unauthenticated_per_peer=reader.integer(
                "GRPC_MAX_UNAUTHENTICATED_CONNECTIONS_PER_PEER", 16, minimum=1
            ),
            request_message_timeout=reader.number(
                "GRPC_REQUEST_MESSAGE_TIMEOUT_SECONDS", 10.0, minimum=0.1
            ),
            tls_cert_file=reader.text("TLS_CERT_FILE"),
            tls_key_file=reader.text("TLS_KEY_FILE"),
            tls_client_ca_file=reader.text("TLS_CLIENT_CA_FILE"),
            tls_client_names=frozenset(
                name.strip() for name in reader.text("TLS_CLIENT_NAMES").split(",") if name.strip()
            ),
            auth_tokens_file=reader.text("AUTH_TOKENS_FILE"),
            caller_identity_prefixes=_identity_prefixes(reader.text("CALLER_IDENTITY_PREFIXES")),
            credentials=credentials,
            secret_sources={
                name: env[name]
                for variable in RELOADED_VARIABLES
                for name in (variable, f"{variable}_FILE")
                if env.get(name)
            },
        )
        if settings.default_deadline > settings.max_deadline:
            raise ConfigError(
                f"FLEX_DEFAULT_DEADLINE_SECONDS ({settings.default_deadline:g}) is above "
                f"FLEX_MAX_DEADLINE_SECONDS ({settings.max_deadline:g}): lower it, or raise "
                "FLEX_MAX_DEADLINE_SECONDS"
            )
        if settings.idempotency_lock > settings.idempotency_ttl:
            raise ConfigError(
                f"IDEMPOTENCY_LOCK_SECONDS ({settings.idempotency_lock:g}) is above "
                f"IDEMPOTENCY_TTL_SECONDS ({settings.idempotency_ttl:g}): a record would expire "
                "while its request is still running; lower the lock or raise the TTL"
            )
        if settings.redis_url is not None and not settings.account_sid:
            # The shared rate budget is keyed by account (Twilio's limit is per account); an API
            # key alone does not say which account it belongs to.
            raise ConfigError(
                "TWILIO_ACCOUNT_SID is required with TWILIO_API_KEY when REDIS_URL is set: "
                "the shared rate budget is the account's, whichever credential a replica uses"
            )
        _check_redis_ca_file(settings)
        missing = settings.missing_for_tokens()
        if settings.conversations_service_sid and missing:
            raise ConfigError(
                "TWILIO_CONVERSATIONS_SERVICE_SID turns guest access tokens on, which also need "
                + ", ".join(missing)
                + " (an auth token cannot sign access tokens)"
            )
        return settings

    @property
    def caller_auth(self) -> bool:
        """Whether callers are told apart (bearer tokens or client certificates); without it
        every call is one caller's, ``anonymous``, and per-caller shares do not apply."""
        return bool(self.auth_tokens_file or self.tls_client_ca_file)

    @property
    def tokens_enabled(self) -> bool:
        return not self.missing_for_tokens()

    def missing_for_tokens(self) -> list[str]:
        """The settings guest access tokens still need; empty when tokens are on."""
        wanted = {
            "TWILIO_CONVERSATIONS_SERVICE_SID": self.conversations_service_sid,
            "TWILIO_API_KEY": self.api_key,
            "TWILIO_API_SECRET": self.api_secret,
            "TWILIO_ACCOUNT_SID": self.account_sid,
        }
        return [name for name, value in wanted.items() if not value]


class _EnvReader:
    """Typed access to the environment; every failure names the variable."""

    def __init__(self, env: Mapping[str, str], missing_file_is_unset: tuple[str, ...] = ()) -> None:
        self.env = env
        self.optional = missing_file_is_unset

    def text(self, name: str) -> str:
        return self.env.get(name, "").strip()

    def secret(self, name: str) -> str:
        """NAME, or the content of the file NAME_FILE points at (never both)."""
        value, path = self.env.get(name, ""), self.env.get(f"{name}_FILE", "")
        if value and path:
            raise ConfigError(f"set {name} or {name}_FILE, not both")
        if not path:
            return value.strip()
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and name in self.optional:
                return ""
            raise ConfigError(f"{name}_FILE={path} cannot be read: {exc.strerror}") from None

    def number(self, name: str, default: float, *, minimum: float) -> float:
        raw = self.text(name)
        if not raw:
            return float(default)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not value >= minimum or value == float("inf"):
            raise ConfigError(f"{name} must be a finite number >= {minimum:g}, got {raw!r}")
        return value

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        value = self.number(name, default, minimum=minimum)
        if value != int(value):
            raise ConfigError(f"{name} must be a whole number, got {self.text(name)!r}")
        return int(value)

    def port(self, name: str, default: int) -> int:
        value = self.number(name, default, minimum=0)
        if value != int(value) or value > 65535:
            raise ConfigError(f"{name} must be a port number 0-65535, got {self.text(name)!r}")
        return int(value)

    def flag(self, name: str) -> bool:
        raw = self.text(name).lower()
        if raw in ("", "0", "false", "no", "off"):
            return False
        if raw in ("1", "true", "yes", "on"):
            return True
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self.text(name) or default
        for option in allowed:
            if raw.lower() == option.lower():
                return option
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")


# The Ui-Version header: visible ASCII, no spaces (service.validation checks callers' values).
_UI_VERSION = re.compile(r"[\x21-\x7e]{1,64}")


def _identity_prefixes(raw: str) -> dict[str, str]:
    """``caller=prefix,...``: no two prefixes (the facade's own included) may overlap, or an
    identity would belong to two owners."""
    prefixes: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        caller, sep, prefix = (part.strip() for part in item.partition("="))
        if not sep or not caller or not prefix:
            raise ConfigError(
                "CALLER_IDENTITY_PREFIXES must be caller=prefix pairs separated by commas, each "
                f"caller and prefix non-empty; got {item.strip()!r}"
            )
        if caller in prefixes:
            raise ConfigError(f"CALLER_IDENTITY_PREFIXES lists the caller {caller!r} twice")
        prefixes[caller] = prefix
    owners = [(prefix, f"caller {caller!r}") for caller, prefix in prefixes.items()]
    owners.append((FACADE_IDENTITY_PREFIX, "the facade's own identities"))
    for index, (prefix, owner) in enumerate(owners):
        for other_prefix, other in owners[index + 1 :]:
            if prefix.startswith(other_prefix) or other_prefix.startswith(prefix):
                raise ConfigError(
                    f"CALLER_IDENTITY_PREFIXES: {prefix!r} ({owner}) and {other_prefix!r} "
                    f"({other}) overlap: an identity would belong to both"
                )
    return prefixes


def _ui_version(value: str) -> str:
    if value and not _UI_VERSION.fullmatch(value):
        # A bad default would fail every call that relies on it, even as an "ambiguous" retry.
        raise ConfigError("FLEX_UI_VERSION must be 1-64 visible ASCII characters, e.g. 2.0.0")
    return value


def redis_url(value: str) -> Secret | None:
    if not value:
        return None
    # Never echo the value: it may hold a password.
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number 0-65535
    except ValueError:
        raise ConfigError("REDIS_URL is not a valid URL (check its port)") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("REDIS_URL must be a redis://, rediss:// or unix:// URL")
    return Secret(value)


def _check_redis_ca_file(settings: Settings) -> None:
    if not settings.redis_ca_file:
        return
    url = settings.redis_url.reveal() if settings.redis_url else ""
    if not url.startswith("rediss://"):
        raise ConfigError("REDIS_CA_FILE is for a rediss:// (TLS) REDIS_URL; set both, or neither")
    try:
        Path(settings.redis_ca_file).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"REDIS_CA_FILE={settings.redis_ca_file} cannot be read: {exc.strerror}"
        ) from None


_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_API_KEY = re.compile(r"^SK[0-9a-fA-F]{32}$")


def read_credentials(env: Mapping[str, str]) -> CredentialSet:
    """The Twilio credentials in ``env`` (their *_FILE variants read now): the API key and
    secret when set (preferred, revocable), else the account SID and auth token; and the
    previous ones, accepted during a rotation. ConfigError names the variable to fix."""
    reader = _EnvReader(env)
    account_sid = reader.secret("TWILIO_ACCOUNT_SID")
    auth_token = reader.secret("TWILIO_AUTH_TOKEN")
    if account_sid and not _ACCOUNT_SID.match(account_sid):
        raise ConfigError("TWILIO_ACCOUNT_SID must look like AC followed by 32 hex digits")
    api_key = _api_key(reader, "TWILIO_API_KEY", "TWILIO_API_SECRET")
    if auth_token and not account_sid:
        raise ConfigError(
            "TWILIO_AUTH_TOKEN is set without TWILIO_ACCOUNT_SID: set TWILIO_ACCOUNT_SID to the "
            "account's SID (AC followed by 32 hex digits), whose auth token it is"
        )
    if api_key is not None:
        current = api_key
    elif account_sid and auth_token:
        current = Credential(account_sid, Secret(auth_token))
    elif account_sid:
        raise ConfigError(
            "TWILIO_ACCOUNT_SID is set without a secret: set TWILIO_AUTH_TOKEN, or "
            "TWILIO_API_KEY and TWILIO_API_SECRET (or their *_FILE variants)"
        )
    else:
        raise ConfigError(
            "no Twilio credentials: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN, or "
            "TWILIO_API_KEY and TWILIO_API_SECRET (or their *_FILE variants); "
            "'make run' starts the local emulator instead"
        )
    previous = []
    # A Secret mounted as files has no file for a key it does not hold: no previous credential.
    reader = _EnvReader(env, missing_file_is_unset=_PREVIOUS)
    previous_key = _api_key(reader, "TWILIO_PREVIOUS_API_KEY", "TWILIO_PREVIOUS_API_SECRET")
    if previous_key is not None:
        previous.append(previous_key)
    previous_token = reader.secret("TWILIO_PREVIOUS_AUTH_TOKEN")
    if previous_token:
        if not account_sid:
            raise ConfigError(
                "TWILIO_PREVIOUS_AUTH_TOKEN needs TWILIO_ACCOUNT_SID (the account it belongs to)"
            )
        previous.append(Credential(account_sid, Secret(previous_token)))
    return CredentialSet(
        account_sid, current, tuple(c for c in dict.fromkeys(previous) if c != current)
    )


_PREVIOUS = ("TWILIO_PREVIOUS_API_KEY", "TWILIO_PREVIOUS_API_SECRET", "TWILIO_PREVIOUS_AUTH_TOKEN")


def _api_key(reader: _EnvReader, key_variable: str, secret_variable: str) -> Credential | None:
    api_key, api_secret = reader.secret(key_variable), reader.secret(secret_variable)
    if api_key and not api_secret:
        raise ConfigError(
            f"{key_variable} is set without {secret_variable}: set {secret_variable} (or "
            f"{secret_variable}_FILE) to the key's secret, or unset {key_variable}"
        )
    if api_secret and not api_key:
        raise ConfigError(
            f"{secret_variable} is set without {key_variable}: set {key_variable} to the "
            "key's SID (SK followed by 32 hex digits)"
        )
    if not api_key:
        return None
    if not _API_KEY.match(api_key):
        raise ConfigError(f"{key_variable} must look like SK followed by 32 hex digits")
    return Credential(api_key, Secret(api_secret))


REGIONS = ("us1", "ie1", "au1")  # Twilio's regions


def _region(reader: _EnvReader) -> str:
    region = reader.text("TWILIO_REGION")
    if region and region not in REGIONS:
        raise ConfigError(
            f"TWILIO_REGION must be one of {', '.join(REGIONS)} (Twilio's regions), got {region!r}"
        )
    return region


_SERVICE_SID = re.compile(r"^IS[0-9a-fA-F]{32}$")
MIN_TOKEN_TTL, MAX_TOKEN_TTL = 180, 86400  # Twilio's bounds (longer is error 20157)


def _service_sid(value: str) -> str:
    if value and not _SERVICE_SID.match(value):
        raise ConfigError(
            "TWILIO_CONVERSATIONS_SERVICE_SID must look like IS followed by 32 hex digits "
            "(the Flex conversations service, Console: Conversations > Services)"
        )
    return value


def _token_ttl(reader: _EnvReader) -> int:
    ttl = reader.number("GUEST_TOKEN_TTL_SECONDS", 3600, minimum=MIN_TOKEN_TTL)
    if ttl > MAX_TOKEN_TTL or ttl != int(ttl):
        raise ConfigError(
            f"GUEST_TOKEN_TTL_SECONDS must be whole seconds from {MIN_TOKEN_TTL} to "
            f"{MAX_TOKEN_TTL} (Twilio's bounds), got {reader.text('GUEST_TOKEN_TTL_SECONDS')!r}"
        )
    return int(ttl)


MIN_SESSION, MAX_SESSION = 60, 30 * 86400


def _session_max(reader: _EnvReader) -> int:
    seconds = reader.number("GUEST_SESSION_MAX_SECONDS", 86400, minimum=MIN_SESSION)
    if seconds > MAX_SESSION or seconds != int(seconds):
        raise ConfigError(
            f"GUEST_SESSION_MAX_SECONDS must be whole seconds from {MIN_SESSION} to "
            f"{MAX_SESSION}, got {reader.text('GUEST_SESSION_MAX_SECONDS')!r}"
        )
    return int(seconds)


def _base_url(reader: _EnvReader, product: str, variable: str) -> str:
    """``variable``, else the host twilio-python derives from TWILIO_REGION/TWILIO_EDGE."""
    override = reader.text(variable)
    if not override:
        edge, region = reader.text("TWILIO_EDGE"), _region(reader)
        region = region or ("us1" if edge else "")
        host = ".".join(part for part in (product, edge, region, "twilio.com") if part)
        return f"https://{host}"
    parts = urlsplit(override)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{variable} must be an http(s) URL, got {override!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{variable} must not carry credentials, a query or a fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"{variable} may use http:// only to a loopback host, got {parts.hostname!r}: "
            "credentials would cross the network in clear text"
        )
    return override.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bracketed(host: str) -> str:
    """``::`` or ``::1`` as gRPC needs an IPv6 address in ``host:port``: ``[::]``."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
