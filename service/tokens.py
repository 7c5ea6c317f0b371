"""Guest access tokens: mint them and verify them. No HTTP, no gRPC.

A token is exactly what twilio-python's ``AccessToken`` with a ``ChatGrant`` produces: a JWT
signed HS256 with the API key secret, header ``cty: twilio-fpa;v=1`` (and ``twr`` with a region),
claims ``jti``, ``iss`` (the API key), ``sub`` (the account), ``nbf``, ``exp`` and ``grants``
(``identity`` and ``chat.service_sid``). The browser hands it to ``new Client(token)``.

Verification (for refresh) accepts only tokens this facade could have minted: HS256 and nothing
else, our key as issuer, our account as subject, our conversations service in the chat grant, a
valid signature and an ``exp`` still ahead. Its errors say which of two things went wrong and
nothing more, so they cannot guide a forgery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from .config import Secret
from .errors import TokenRejected

ALGORITHM = "HS256"
MAX_TOKEN_CHARS = 8 * 1024  # ours are under 1 KB; anything far larger is not worth parsing


@dataclass(frozen=True)
class GuestToken:
    jwt: str
    identity: str
    expires_at: int  # unix seconds

    def __repr__(self) -> str:
        return f"GuestToken(identity=<redacted>, expires_at={self.expires_at})"


class GuestTokens:
    """Mints and verifies guest tokens for one API key, account and conversations service."""

    def __init__(
        self,
        *,
        api_key: str,
        api_secret: Secret,
        account_sid: str,
        service_sid: str,
        ttl_seconds: int,
        region: str = "",
    ) -> None:
        self._api_key = api_key
        self._secret = api_secret
        self._account_sid = account_sid
        self._service_sid = service_sid
        self._ttl = ttl_seconds
        self._headers = {"cty": "twilio-fpa;v=1"} | ({"twr": region} if region else {})

    def __repr__(self) -> str:
        return f"GuestTokens(api_key={self._api_key!r}, service_sid={self._service_sid!r})"

    def mint(self, identity: str, now: float | None = None) -> GuestToken:
        issued = int(time.time() if now is None else now)
        claims = {
            "jti": f"{self._api_key}-{issued}",
            "grants": {"chat": {"service_sid": self._service_sid}, "identity": identity},
            "iss": self._api_key,
            "exp": issued + self._ttl,
            "nbf": issued,
            "sub": self._account_sid,
        }
        token = jwt.encode(
            claims, self._secret.reveal(), algorithm=ALGORITHM, headers=self._headers
        )
        return GuestToken(jwt=token, identity=identity, expires_at=issued + self._ttl)

    def verify(self, token: str) -> str:
        """The identity inside a genuine, unexpired token of ours; else TokenRejected."""
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise TokenRejected("TOKEN_INVALID")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret.reveal(),
                algorithms=[ALGORITHM],
                issuer=self._api_key,
                options={"require": ["exp", "iss", "sub", "grants"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:  # raised only after the signature checked out
            raise TokenRejected("TOKEN_EXPIRED") from None
        except jwt.PyJWTError:
            raise TokenRejected("TOKEN_INVALID") from None
        grants = claims.get("grants")
        chat = grants.get("chat") if isinstance(grants, dict) else None
        identity = grants.get("identity") if isinstance(grants, dict) else None
        if (
            claims.get("sub") != self._account_sid
            or not isinstance(chat, dict)
            or chat.get("service_sid") != self._service_sid
            or not isinstance(identity, str)
            or not identity
        ):
            raise TokenRejected("TOKEN_INVALID")
        return identity
