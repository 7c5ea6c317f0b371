"""Caller authentication, off unless configured: TLS / mutual TLS, and bearer tokens.

* ``TLS_CERT_FILE`` + ``TLS_KEY_FILE`` serve the gRPC port over TLS; ``TLS_CLIENT_CA_FILE`` also
  requires a client certificate signed by that CA (mutual TLS). The files are re-read when they
  change (checked at each new connection), so rotated certificates apply without a restart.
* ``AUTH_TOKENS_FILE`` holds one ``name:token`` line per calling service. Calls must send
  ``authorization: Bearer <token>``; the token is compared in constant time with every known one,
  and the matching name becomes the caller in logs and metrics. The file is re-read when it changes.

Health and reflection need no token, so the kubelet and grpcurl keep working.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

import grpc

from service.config import ConfigError, Settings
from service.errors import Unauthenticated

log = logging.getLogger("flexwebchat.auth")

RELOAD_CHECK_SECONDS = 1.0


class CallerTokens:
    """The allowed bearer tokens, by calling service name."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._tokens: list[tuple[str, bytes]] = []
        self._mtime = 0.0
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        try:
            stat = self._path.stat()
            text = self._path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"AUTH_TOKENS_FILE={self._path} cannot be read: {exc.strerror}"
            ) from None
        tokens = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, token = line.partition(":")
            if not sep or not name.strip() or len(token.strip()) < 16:
                raise ConfigError(
                    f"AUTH_TOKENS_FILE line {number}: expected 'name:token' "
                    "with a token of at least 16 characters"
                )
            tokens.append((name.strip(), token.strip().encode()))
        if not tokens:
            raise ConfigError(f"AUTH_TOKENS_FILE={self._path} holds no tokens")
        self._tokens, self._mtime = tokens, stat.st_mtime

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        try:
            changed = self._path.stat().st_mtime != self._mtime
            if changed:
                self._load()
                log.info("reloaded caller tokens", extra={"fields": {"callers": len(self._tokens)}})
        except (OSError, ConfigError) as exc:
            log.warning("keeping the previous caller tokens", extra={"fields": {"error": str(exc)}})

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


class ReloadingCertificates:
    """Server certificate (and client CA) files, re-read when any of them changes."""

    def __init__(self, settings: Settings) -> None:
        self._paths = [settings.tls_key_file, settings.tls_cert_file]
        if settings.tls_client_ca_file:
            self._paths.append(settings.tls_client_ca_file)
        self._stamp = self._mtimes()
        self.initial = self._configuration()

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(os.stat(path).st_mtime for path in self._paths)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        try:
            key, cert, *ca = (Path(path).read_bytes() for path in self._paths)
        except OSError as exc:
            raise ConfigError(f"TLS file {exc.filename} cannot be read: {exc.strerror}") from None
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca[0] if ca else None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each new connection: a new configuration when the files changed."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except (OSError, ConfigError) as exc:
            log.warning("keeping the previous certificates", extra={"fields": {"error": str(exc)}})
            return None
        self._stamp = stamp
        log.info("reloaded TLS certificates")
        return configuration


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext."""
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
