"""Caller authentication, off unless configured: TLS / mutual TLS, and bearer tokens.

* ``TLS_CERT_FILE`` + ``TLS_KEY_FILE`` serve the gRPC port over TLS; ``TLS_CLIENT_CA_FILE`` also
  requires a client certificate signed by that CA (mutual TLS). The files are re-read when they
  change (checked at each new connection), so rotated certificates apply without a restart.
* ``AUTH_TOKENS_FILE`` holds one ``name:token`` line per calling service. Calls must send
  ``authorization: Bearer <token>``; the token is compared in constant time with every known one,
  and the matching name becomes the caller in logs and metrics. The file is re-read when it changes.
* ``TLS_CLIENT_NAMES`` (with mutual TLS): the client certificate common names allowed; any other
  certificate from the CA is UNAUTHENTICATED, with or without a valid bearer token (with
  ``AUTH_TOKENS_FILE`` as well, both must hold; the token names the caller).

Health and reflection need no token, so the kubelet and grpcurl keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
import time
from pathlib import Path

import grpc

from . import observability as obs
from .config import ConfigError, Settings
from .errors import Unauthenticated

log = logging.getLogger("flexwebchat.auth")
# The caller when callers are not authenticated. Reserved: a token or certificate by this name
# would share the idempotency records of every unauthenticated caller (webchat.record_key).
ANONYMOUS = "anonymous"
CALLER_NAME = re.compile(rb"[A-Za-z0-9._-]{1,64}")

RELOAD_CHECK_SECONDS = 1.0


class CallerTokens:
    """The allowed bearer tokens, by calling service name.

    The file is re-read when its content changes (checked at most once a second; not by mtime,
    which a replacement can keep). A reload applies every valid line and drops every name no
    longer present, so a revocation takes effect even beside a bad line; an empty, unreadable or
    deleted file denies every call. Each such problem is logged at error and counted. At start,
    any problem refuses to start instead.
    """

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._checked = 0.0
        try:
            raw = self._path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"AUTH_TOKENS_FILE={self._path} cannot be read: {exc.strerror}"
            ) from None
        tokens, problems = _parse_tokens(raw)
        if problems:
            raise ConfigError(f"AUTH_TOKENS_FILE {problems[0]}")
        if not tokens:
            raise ConfigError(f"AUTH_TOKENS_FILE={self._path} holds no tokens")
        self._tokens, self._digest = tokens, hashlib.sha256(raw).digest()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        try:
            raw = self._path.read_bytes()
        except OSError as exc:
            if self._digest != b"":
                self._tokens, self._digest = [], b""
                _reload_failed(
                    "AUTH_TOKENS_FILE",
                    "caller tokens cannot be read: every call is refused until they can",
                    exc.strerror or type(exc).__name__,
                )
            return
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return
        self._digest = digest
        self._tokens, problems = _parse_tokens(raw)
        for problem in problems:
            _reload_failed("AUTH_TOKENS_FILE", "ignoring a caller token line", problem)
        if not self._tokens:
            _reload_failed(
                "AUTH_TOKENS_FILE", "no caller tokens left: every call is refused", "empty"
            )
            return
        if not problems:
            obs.reload_applied("AUTH_TOKENS_FILE")
        log.info("reloaded caller tokens", extra={"fields": {"callers": len(self._tokens)}})

    def names(self) -> frozenset[str]:
        """The callers allowed now."""
        self._maybe_reload()
        return frozenset(name for name, _ in self._tokens)

    def caller(self, metadata: dict[str, str]) -> str:
        """The calling service's name, or Unauthenticated."""
        self._maybe_reload()
        scheme, _, presented = metadata.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated("missing bearer token: send 'authorization: Bearer <token>'")
        candidate = presented.strip().encode()
        found = ""
        for name, token in self._tokens:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(candidate, token):
                found = name
        if not found:
            raise Unauthenticated("invalid bearer token")
        return found


def is_reserved(name: str) -> bool:
    """``anonymous`` in any case: no token, certificate or allowed name may claim it."""
    return name.lower() == ANONYMOUS


def _parse_tokens(raw: bytes) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The valid (name, token) lines, and a description of each invalid one (never its text).

    Names are plain ASCII (``CALLER_NAME``), so two names never look alike or decode alike in
    logs, metrics and the records' keys; ``anonymous`` in any case is reserved."""
    tokens, problems = [], []
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        name, sep, token = line.partition(b":")
        name, token = name.strip(), token.strip()
        if not sep or len(token) < 16 or not CALLER_NAME.fullmatch(name):
            problems.append(
                f"line {number}: expected 'name:token', the name of 1 to 64 ASCII letters, "
                "digits, '.', '_' or '-', the token of at least 16 characters"
            )
        elif is_reserved(name.decode()):
            problems.append(f"line {number}: the name {ANONYMOUS!r} is reserved")
        else:
            tokens.append((name.decode(), token))
    return tokens, problems


_reload_failed = obs.reload_failed


class ReloadingCertificates:
    """Server certificate (and client CA) files, re-read when their content changes.

    New files are applied only once they are known to work (the key matches the certificate,
    every PEM parses): gRPC would otherwise refuse them at the next handshake while this log
    said the rotation worked. A refused rotation is logged at error and counted, and the
    previous certificates stay in use.
    """

    def __init__(self, settings: Settings) -> None:
        self._paths = [settings.tls_key_file, settings.tls_cert_file]
        if settings.tls_client_ca_file:
            self._paths.append(settings.tls_client_ca_file)
        contents = self._read()
        problem = self._problem()
        if problem:
            raise ConfigError(f"TLS files are unusable: {problem}")
        self._digest = _digest(contents)
        self.initial = _configuration(contents)

    def _read(self) -> list[bytes]:
        try:
            return [Path(path).read_bytes() for path in self._paths]
        except OSError as exc:
            raise ConfigError(f"TLS file {exc.filename} cannot be read: {exc.strerror}") from None

    def _problem(self) -> str:
        """Why the files on disk would not work, or ''."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self._paths[1], self._paths[0])
            if len(self._paths) > 2:
                context.load_verify_locations(cafile=self._paths[2])
        except (ssl.SSLError, OSError) as exc:
            return getattr(exc, "reason", None) or str(exc)
        return ""

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each new connection: a new configuration when the files changed."""
        try:
            contents = self._read()
        except ConfigError as exc:
            log.warning("keeping the previous certificates", extra={"fields": {"error": str(exc)}})
            return None
        digest = _digest(contents)
        if digest == self._digest:
            return None
        problem = self._problem()
        if not problem and _digest(self._read()) != digest:
            return None  # changed while being checked: look again at the next connection
        self._digest = digest
        if problem:
            _reload_failed(
                "TLS_CERT_FILE", "new TLS files refused; keeping the previous ones", problem
            )
            return None
        obs.reload_applied("TLS_CERT_FILE")
        log.info("reloaded TLS certificates")
        return _configuration(contents)


def _digest(contents: list[bytes]) -> bytes:
    return hashlib.sha256(b"\0".join(contents)).digest()


def _configuration(contents: list[bytes]) -> grpc.ServerCertificateConfiguration:
    key, cert, *ca = contents
    return grpc.ssl_server_certificate_configuration(
        [(key, cert)], root_certificates=ca[0] if ca else None
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext."""
    if any(is_reserved(name) for name in settings.tls_client_names):
        raise ConfigError(f"TLS_CLIENT_NAMES: the name {ANONYMOUS!r} is reserved")
    if settings.tls_client_names and not settings.tls_client_ca_file:
        raise ConfigError("TLS_CLIENT_NAMES needs TLS_CLIENT_CA_FILE (mutual TLS)")
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:
            raise ConfigError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
    try:
        certificates = ReloadingCertificates(settings)
    except OSError as exc:
        raise ConfigError(f"TLS file {exc.filename} cannot be read: {exc.strerror}") from None
    return grpc.dynamic_ssl_server_credentials(
        certificates.initial,
        certificates.fetch,  # type: ignore[arg-type]  # gRPC documents None as "unchanged"
        require_client_authentication=bool(settings.tls_client_ca_file),
    )
