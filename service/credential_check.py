"""The start-up credential check: one authenticated read that creates nothing, so that wrong
credentials stop the facade at start instead of failing every caller's call.

It reads Flex's configuration (``GET {flex-api}/v1/Configuration``) with the current credential,
and, when guest tokens are on, the conversations service (``GET {conversations}/v1/Services/
{IS}``). Twilio's answer decides:

* 2xx: the credentials work; serve.
* 401 or 403: ConfigError naming the credential variables (the facade exits 2).
* 404 of the conversations service: ConfigError naming ``TWILIO_CONVERSATIONS_SERVICE_SID``.
* no answer, 5xx, 429 or any other answer: inconclusive. The facade serves (Twilio down must not
  make every replica unready) and checks again in the background until an answer is conclusive;
  a refusal found then is logged at error, naming the variables.

A credential swapped in by a reload of its ``*_FILE`` is checked the same way before it applies
(``refusal``): 401 or 403 keeps the credentials in use; an inconclusive answer applies it with a
warning, as Twilio down must not block a rotation. The previous credentials are not checked:
once revoked, as a rotation ends, Twilio refuses them, yet they still verify what they signed.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from .config import ConfigError, Credential, Settings
from .credentials import Credentials

log = logging.getLogger("flexwebchat.credential_check")

CHECK_TIMEOUT_SECONDS = 5.0
RECHECK_FIRST_SECONDS = 1.0
RECHECK_MAX_SECONDS = 60.0


class Inconclusive(Exception):
    """Twilio's answer (or its absence) says nothing about the credentials."""


class CredentialCheck:
    def __init__(
        self, http: httpx.AsyncClient, settings: Settings, credentials: Credentials
    ) -> None:
        self._http = http
        self._settings = settings
        self._credentials = credentials

    async def at_start(self) -> bool:
        """True when Twilio accepted the credentials; False when it could not tell (check
        again with ``until_conclusive``); ConfigError when it refused them."""
        try:
            await self._check()
        except Inconclusive as exc:
            log.warning(
                "could not check the Twilio credentials at start; serving, and checking again "
                "in the background",
                extra={"fields": {"error": str(exc)}},
            )
            return False
        return True

    async def until_conclusive(self) -> None:
        """Checks again, backing off, until Twilio answers; a refusal is logged at error."""
        wait = RECHECK_FIRST_SECONDS
        while True:
            await asyncio.sleep(wait)
            try:
                await self._check()
            except Inconclusive:
                wait = min(wait * 2, RECHECK_MAX_SECONDS)
                continue
            except ConfigError as exc:
                log.error(
                    "Twilio refused the facade's credentials", extra={"fields": {"error": str(exc)}}
                )
                return
            log.info("Twilio accepted the credentials")
            return

    async def refusal(self, credential: Credential) -> str:
        """Why Twilio refuses ``credential`` (about to become current on a reload), or ''."""
        auth = httpx.BasicAuth(credential.user, credential.secret.reveal())
        try:
            await self._read(self._settings.base_url + "/v1/Configuration", auth=auth)
        except Inconclusive as exc:
            log.warning(
                "could not check the reloaded Twilio credential; applying it",
                extra={"fields": {"error": str(exc), "sends_with": credential.user}},
            )
        except ConfigError as exc:
            return str(exc).replace(self._variables(), self._variables(credential))
        return ""

    async def _check(self) -> None:
        await self._read(self._settings.base_url + "/v1/Configuration")
        if self._settings.tokens_enabled:
            sid = self._settings.conversations_service_sid
            await self._read(f"{self._settings.conversations_url}/v1/Services/{sid}", service=True)

    async def _read(
        self, url: str, *, service: bool = False, auth: httpx.Auth | None = None
    ) -> None:
        """One GET, with the holder's current credential unless ``auth`` is given."""
        try:
            response = await self._http.get(
                url,
                headers={"Accept": "application/json"},
                timeout=CHECK_TIMEOUT_SECONDS,
                auth=httpx.USE_CLIENT_DEFAULT if auth is None else auth,
            )
        except httpx.HTTPError as exc:
            raise Inconclusive(f"{type(exc).__name__} from {httpx.URL(url).host}") from None
        if response.is_success:
            return
        status = response.status_code
        if status in (401, 403):
            raise ConfigError(
                f"Twilio refused the credentials (HTTP {status} from {response.url.host}): "
                f"{self._variables()}"
            )
        if status == 404 and service:
            raise ConfigError(
                f"TWILIO_CONVERSATIONS_SERVICE_SID={self._settings.conversations_service_sid} "
                "is not a conversations service of this account (Twilio answered 404): set it "
                "to the Flex conversations service (Console: Conversations > Services)"
            )
        raise Inconclusive(f"HTTP {status} from {response.url.host}")

    def _variables(self, credential: Credential | None = None) -> str:
        current = credential or self._credentials.current
        if current.is_api_key:
            return (
                f"check TWILIO_API_SECRET and TWILIO_API_KEY={current.user} (a key of this "
                "account and region, not revoked)"
            )
        return (
            f"check TWILIO_AUTH_TOKEN, the auth token of TWILIO_ACCOUNT_SID={current.user} "
            "(the token in use, not a rotated-out one)"
        )
