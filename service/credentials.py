"""The one holder of the facade's Twilio credentials, current and previous, and of every key
derived from them. Whoever needs a key asks here, each time, so a reload changes them all at once.

* Upstream requests are sent with the current credential only (``auth_header``).
* Guest tokens are signed with the current API key (``signing_key``) and verified with it or a
  previous one (``verification_keys``).
* Idempotency records carry an HMAC under the current secret's record key; records written
  under a previous secret still verify (``record_mac_keys``, current first).
* The identity the facade chooses for a request_id is an HMAC keyed with the current secret,
  which no caller sees (``identity_keys``); the previous secrets' keys only serve to find the
  conversation of a request_id that was pending when the secret changed.

The previous credentials are the configured ones (``TWILIO_PREVIOUS_API_KEY`` +
``TWILIO_PREVIOUS_API_SECRET``, ``TWILIO_PREVIOUS_AUTH_TOKEN``) and every credential a reload
replaced, until the process restarts. Secrets given as ``NAME_FILE`` (how Kubernetes mounts a
Secret, and swaps it on an update) are re-read when their content changes, as
``service.auth.CallerTokens`` re-reads its file: a valid new set applies atomically, an invalid
one is logged at error, counted in ``flexwebchat_config_reload_failures_total{file=VARIABLE}`` and
the set in use is kept. ``REDIS_URL_FILE`` is watched the same way; its listeners reconnect.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from . import observability as obs
from .config import (
    CREDENTIAL_VARIABLES,
    ConfigError,
    Credential,
    CredentialSet,
    Secret,
    Settings,
    read_credentials,
    redis_url,
)
from .tokens import SigningKey

log = logging.getLogger("flexwebchat.credentials")

RELOAD_CHECK_SECONDS = 1.0
_RECORD_KEY_LABEL = b"flexwebchat idempotency records v1"
_IDENTITY_KEY_LABEL = b"flexwebchat identities v1"


@dataclass(frozen=True)
class _Keys:
    """Everything derived from one credential set: replaced as a whole, never in part."""

    credentials: CredentialSet
    auth_header: str
    record_mac_keys: tuple[bytes, ...]
    identity_keys: tuple[bytes, ...]
    verification_keys: tuple[SigningKey, ...]

    @classmethod
    def of(cls, credentials: CredentialSet) -> _Keys:
        every = (credentials.current, *credentials.previous)
        current = credentials.current
        basic = f"{current.user}:{current.secret.reveal()}".encode()
        return cls(
            credentials,
            "Basic " + base64.b64encode(basic).decode(),
            tuple(_derive(c.secret, _RECORD_KEY_LABEL) for c in every),
            tuple(dict.fromkeys(_derive(c.secret, _IDENTITY_KEY_LABEL) for c in every)),
            tuple(SigningKey(c.user, c.secret) for c in every if c.is_api_key),
        )

    def __repr__(self) -> str:
        return f"_Keys(current={self.credentials.current.user!r})"


def _derive(secret: Secret, label: bytes) -> bytes:
    return hmac.new(secret.reveal().encode(), label, hashlib.sha256).digest()


class Credentials:
    """The current and previous Twilio credentials; see the module's description."""

    def __init__(self, settings: Settings) -> None:
        initial = settings.credentials or CredentialSet(
            settings.account_sid, Credential(settings.username, settings.password)
        )
        self._keys = _Keys.of(initial)
        self._tokens_required = bool(settings.conversations_service_sid)
        self._sources = dict(settings.secret_sources)
        self._files = {name: path for name, path in self._sources.items() if name.endswith("_FILE")}
        self._digests = self._read_digests()
        self._redis_listeners: list[Callable[[str], Awaitable[str]]] = []
        self._verify: Callable[[Credential], Awaitable[str]] | None = None
        self._replaced: list[Credential] = []  # sent with before a reload, most recent first
        watched = [
            name for name in self._files if name.removesuffix("_FILE") in CREDENTIAL_VARIABLES
        ]
        if watched and self._changed_since_read(initial):
            # Swapped between the settings' read and now: apply what the files hold.
            # Not verified with Twilio here: the start-up check that follows checks it.
            if not self._apply_credentials(watched, self._digests, self._load()):
                self._digests = {}  # swapped again meanwhile: the first check applies it

    def __repr__(self) -> str:
        return repr(self._keys)

    @property
    def account_sid(self) -> str:
        return self._keys.credentials.account_sid

    @property
    def current(self) -> Credential:
        """The credential requests are sent with."""
        return self._keys.credentials.current

    @property
    def previous(self) -> tuple[Credential, ...]:
        return self._keys.credentials.previous

    def auth_header(self) -> str:
        """The ``Authorization`` header value for upstream requests (current credential)."""
        return self._keys.auth_header

    def signing_key(self) -> SigningKey:
        """The API key that signs guest tokens (tokens are on only with an API key, and a reload
        that would take it away is refused)."""
        current = self._keys.credentials.current
        return SigningKey(current.user, current.secret)

    def verification_keys(self) -> tuple[SigningKey, ...]:
        """The API keys whose tokens are accepted for refresh: the current one first."""
        return self._keys.verification_keys

    def record_mac_keys(self) -> tuple[bytes, ...]:
        """HMAC keys of idempotency records: the first signs, every one verifies."""
        return self._keys.record_mac_keys

    def identity_keys(self) -> tuple[bytes, ...]:
        """Keys of the identities the facade chooses: the first for new requests, the others
        only to find a pending request's conversation."""
        return self._keys.identity_keys

    # Reloading

    def on_redis_url(self, listener: Callable[[str], Awaitable[str]]) -> None:
        """``await listener(url)`` is called with a new, well-formed REDIS_URL from
        REDIS_URL_FILE; it switches to it, or returns why it kept the one in use."""
        self._redis_listeners.append(listener)

    def verify_with(self, verify: Callable[[Credential], Awaitable[str]]) -> None:
        """``await verify(credential)`` is asked before a reloaded current credential applies:
        why Twilio refuses it, or '' (accepted, or Twilio could not tell)."""
        self._verify = verify

    async def watch(self, interval: float = RELOAD_CHECK_SECONDS) -> None:
        """Re-reads the secret files every ``interval`` seconds, for as long as it runs."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_files()
            except Exception:  # a bug here must not end the reloads for good
                log.exception("checking the secret files failed")

    async def check_files(self) -> None:
        """Applies the secret files' new content, if any changed since they were last read."""
        digests = self._read_digests()
        changed = [name for name, digest in digests.items() if digest != self._digests.get(name)]
        if not changed:
            return
        credentials = [n for n in changed if n.removesuffix("_FILE") in CREDENTIAL_VARIABLES]
        if credentials:
            loaded = self._load()
            if isinstance(loaded, CredentialSet) and self._verify is not None:
                if loaded.current != self.current:
                    refused = await self._verify(loaded.current)
                    loaded = (self._secret_variable(loaded.current), refused) if refused else loaded
            if not self._apply_credentials(credentials, digests, loaded):
                return  # the files changed while being read: look again at the next check
        if "REDIS_URL_FILE" in changed:
            await self._reload_redis_url()
        self._digests = digests

    def _changed_since_read(self, initial: CredentialSet) -> bool:
        try:
            return read_credentials(self._sources) != initial
        except ConfigError:
            return True  # the reload logs and counts why

    def _read_digests(self) -> dict[str, bytes]:
        digests = {}
        for name, path in self._files.items():
            try:
                digests[name] = hashlib.sha256(Path(path).read_bytes()).digest()
            except OSError:
                digests[name] = b""
        return digests

    def _load(self) -> CredentialSet | tuple[str, str]:
        """The files' credential set, or (the wrong variable, why) when it cannot apply."""
        try:
            loaded = read_credentials(self._sources)
        except ConfigError as exc:
            return self._wrong_variable(str(exc)), str(exc)
        problem = self._incompatibility(loaded)
        return (self._wrong_variable(problem), problem) if problem else loaded

    def _apply_credentials(
        self, changed: list[str], digests: dict[str, bytes], loaded: CredentialSet | tuple[str, str]
    ) -> bool:
        """Applies the loaded credentials, or keeps those in use when they are refused; False
        when the files changed while being read (a half-swapped set is never applied)."""
        if self._read_digests() != digests:
            return False
        if not isinstance(loaded, CredentialSet):
            variable, problem = loaded
            obs.reload_failed(
                variable, "new Twilio credentials refused; kept those in use", problem
            )
            return True
        old = self._keys.credentials
        if loaded.current != old.current:
            self._replaced.insert(0, old.current)  # until restart: what it signed still verifies
        previous = (*loaded.previous, *self._replaced)
        unique = tuple(c for c in dict.fromkeys(previous) if c != loaded.current)
        self._keys = _Keys.of(CredentialSet(loaded.account_sid, loaded.current, unique))
        obs.reload_applied(*CREDENTIAL_VARIABLES, *(f"{v}_FILE" for v in CREDENTIAL_VARIABLES))
        log.info(
            "reloaded Twilio credentials",
            extra={
                "fields": {
                    "files": changed,
                    "sends_with": loaded.current.user,
                    "previous_accepted": len(unique),
                }
            },
        )
        return True

    def _variable(self, name: str) -> str:
        """How ``name`` is given: ``NAME_FILE`` when read from a file."""
        return f"{name}_FILE" if f"{name}_FILE" in self._files else name

    def _secret_variable(self, credential: Credential) -> str:
        return self._variable("TWILIO_API_SECRET" if credential.is_api_key else "TWILIO_AUTH_TOKEN")

    def _wrong_variable(self, problem: str) -> str:
        """The variable to fix: the missing one of "X is set without Y", else the first named."""
        missing = re.search(r"is set without (TWILIO_\w+)", problem)
        if missing:
            return self._variable(missing.group(1))
        named = [v for v in CREDENTIAL_VARIABLES if problem.find(v) >= 0]
        if not named:
            return self._variable("TWILIO_ACCOUNT_SID")
        return self._variable(min(named, key=lambda v: (problem.find(v), -len(v))))

    def _incompatibility(self, loaded: CredentialSet) -> str:
        """What a running facade cannot change, or '': the account (its rate budget and records
        are keyed by it), and signing tokens when guest tokens are on."""
        if loaded.account_sid != self.account_sid:
            return "TWILIO_ACCOUNT_SID changed: another account needs a restart, not a reload"
        if self._tokens_required and not loaded.current.is_api_key:
            return (
                "guest tokens are on (TWILIO_CONVERSATIONS_SERVICE_SID) and need "
                "TWILIO_API_KEY and TWILIO_API_SECRET"
            )
        return ""

    async def _reload_redis_url(self) -> None:
        url = self._read_redis_url()
        for listener in self._redis_listeners if url else ():
            problem = await listener(url)
            if problem:
                obs.reload_failed("REDIS_URL_FILE", _REDIS_URL_REFUSED, problem)
                return
        if url:
            obs.reload_applied("REDIS_URL_FILE")

    def _read_redis_url(self) -> str:
        """REDIS_URL_FILE's URL, or '' when it is not one (logged and counted)."""
        try:
            url = redis_url(Path(self._files["REDIS_URL_FILE"]).read_text(encoding="utf-8").strip())
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        except ConfigError as exc:
            problem = str(exc)
        else:
            if url is not None:
                return url.reveal()
            problem = "empty"
        obs.reload_failed("REDIS_URL_FILE", _REDIS_URL_REFUSED, problem)
        return ""


_REDIS_URL_REFUSED = "new REDIS_URL refused; kept the one in use"
