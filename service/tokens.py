"""Guest access tokens: mint them and verify them. No HTTP, no gRPC.

A token is what twilio-python's ``AccessToken`` with a ``ChatGrant`` produces: a JWT signed
HS256 with the API key secret, header ``cty: twilio-fpa;v=1`` (and ``twr`` with a region), claims
``jti``, ``iss`` (the API key), ``sub`` (the account), ``nbf``, ``exp`` and ``grants``
(``identity`` and ``chat.service_sid``), all exactly as twilio-python writes them. The browser
hands it to ``new Client(token)``.

Beside those, one claim of the facade's own, ``fwc_session``, which Twilio does not read (a JWT
claim its reader does not understand is ignored, RFC 7519 section 4): the guest session the token
belongs to. ``caller`` is an HMAC of the creating caller's name keyed with the signing secret (so
the name is not readable in the browser, and no caller can compute another's tag), ``start`` is
the session's start (unix seconds: the conversation's creation) and ``conversation_sid`` the
guest's conversation. No token's ``exp`` passes ``start`` + ``GUEST_SESSION_MAX_SECONDS``, and a
refresh copies the session claims unchanged, so refreshing never extends a session.

Verification (for refresh) accepts only tokens this facade could have minted: HS256 and nothing
else, one of our keys as issuer (the current one or, during a rotation, the previous one), our
account as subject, our conversations service in the chat grant, a valid signature. Its errors
say which of a few things went wrong and nothing more, so they cannot guide a forgery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import jwt

from .config import Secret
from .errors import TokenRejected, TokenWrongCaller

ALGORITHM = "HS256"
MAX_TOKEN_CHARS = 8 * 1024  # ours are under 1 KB; anything far larger is not worth parsing
SESSION_CLAIM = "fwc_session"
NBF_LEEWAY_SECONDS = 30  # replicas' clocks may differ a little: a token minted "later" is fine
_CONVERSATION_SID = re.compile(r"CH[0-9a-fA-F]{32}")


@dataclass(frozen=True)
class SigningKey:
    """An API key: its SID (the token's issuer) and secret (the HS256 key)."""

    sid: str
    secret: Secret


class TokenKeys(Protocol):
    """Who holds the keys. Asked at every mint and every verification, so a rotation applies at
    once: the current key signs; the current, then the previous, key verify."""

    def signing_key(self) -> SigningKey: ...

    def verification_keys(self) -> Sequence[SigningKey]: ...


@dataclass(frozen=True)
class Session:
    """A guest session: who created it, for which guest and conversation, and when it began."""

    identity: str
    conversation_sid: str  # "" for a token minted without session claims
    start: int  # unix seconds


@dataclass(frozen=True)
class Presented:
    """A genuine token of ours, presented for refresh by its session's creator."""

    session: Session
    expired: bool  # its own exp has passed (the session has not): a resume


@dataclass(frozen=True)
class GuestToken:
    jwt: str
    identity: str
    expires_at: int  # unix seconds
    session_expires_at: int  # unix seconds: no token of the session outlives it

    def __repr__(self) -> str:
        return f"GuestToken(identity=<redacted>, expires_at={self.expires_at})"


class GuestTokens:
    """Mints and verifies guest tokens for one account and conversations service."""

    def __init__(
        self,
        *,
        keys: TokenKeys,
        account_sid: str,
        service_sid: str,
        ttl_seconds: int,
        session_max_seconds: int,
        region: str = "",
    ) -> None:
        self._keys = keys
        self._account_sid = account_sid
        self._service_sid = service_sid
        self._ttl = ttl_seconds
        self.session_max = session_max_seconds
        self._headers = {"cty": "twilio-fpa;v=1"} | ({"twr": region} if region else {})

    def __repr__(self) -> str:
        return f"GuestTokens(service_sid={self._service_sid!r})"

    def session_end(self, session: Session) -> int:
        return session.start + self.session_max

    def mint(self, session: Session, caller: str, now: float | None = None) -> GuestToken:
        """A token for ``session``'s guest, bound to ``caller``; TokenRejected("TOKEN_EXPIRED")
        when the session has ended."""
        issued = int(time.time() if now is None else now)
        session_end = self.session_end(session)
        expires = min(issued + self._ttl, session_end)
        if expires <= issued:
            raise TokenRejected("TOKEN_EXPIRED")
        key = self._keys.signing_key()
        claims = {
            "jti": f"{key.sid}-{issued}",
            "grants": {"chat": {"service_sid": self._service_sid}, "identity": session.identity},
            "iss": key.sid,
            "exp": expires,
            "nbf": issued,
            "sub": self._account_sid,
            SESSION_CLAIM: {
                "caller": _caller_tag(key, caller),
                "start": session.start,
                "conversation_sid": session.conversation_sid,
            },
        }
        token = jwt.encode(claims, key.secret.reveal(), algorithm=ALGORITHM, headers=self._headers)
        return GuestToken(
            jwt=token,
            identity=session.identity,
            expires_at=expires,
            session_expires_at=session_end,
        )

    def verify(self, token: str, caller: str, now: float | None = None) -> Presented:
        """The session of a genuine token of ours presented by its creator, within the session.

        TokenRejected: TOKEN_INVALID (not ours), TOKEN_EXPIRED (the session has ended, or an
        expired token without session claims); TokenWrongCaller: another caller's session."""
        at = time.time() if now is None else now
        claims, key = self._decode(token, at)
        identity = _identity(claims, self._service_sid)
        if claims.get("sub") != self._account_sid or identity is None:
            raise TokenRejected("TOKEN_INVALID")
        expired = claims["exp"] <= at
        claimed = claims.get(SESSION_CLAIM)
        if claimed is None:
            # Minted without session claims: refreshable while unexpired by any caller, once;
            # the new token's session starts at this token's issue and belongs to that caller.
            if expired:
                raise TokenRejected("TOKEN_EXPIRED")
            start = claims.get("nbf")
            session = Session(identity, "", start if _is_int(start) else int(at))
            return Presented(session, expired=False)
        bound = _session(claimed, identity)
        if bound is None:
            raise TokenRejected("TOKEN_INVALID")
        if not hmac.compare_digest(str(claimed["caller"]), _caller_tag(key, caller)):
            raise TokenWrongCaller()
        if self.session_end(bound) <= at:
            raise TokenRejected("TOKEN_EXPIRED")
        return Presented(bound, expired=expired)

    def _decode(self, token: str, at: float) -> tuple[dict[str, Any], SigningKey]:
        """The signature-checked claims, and the key that signed them."""
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise TokenRejected("TOKEN_INVALID")
        for key in self._keys.verification_keys():  # current first: one decode but mid-rotation
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.secret.reveal(),
                    algorithms=[ALGORITHM],
                    issuer=key.sid,
                    options={
                        "require": ["exp", "iss", "sub", "grants"],
                        "verify_exp": False,  # an expired token may be resumed: verify() decides
                        "verify_nbf": False,  # checked against ``at`` below
                    },
                )
            except jwt.PyJWTError:
                continue
            break
        else:
            raise TokenRejected("TOKEN_INVALID")
        nbf = claims.get("nbf", 0)
        if not _is_int(claims["exp"]) or not _is_int(nbf) or nbf > at + NBF_LEEWAY_SECONDS:
            raise TokenRejected("TOKEN_INVALID")
        return claims, key


def _caller_tag(key: SigningKey, caller: str) -> str:
    digest = hmac.new(
        key.secret.reveal().encode(),
        b"flexwebchat guest session caller\x00" + caller.encode(),
        hashlib.sha256,
    ).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def _identity(claims: dict[str, Any], service_sid: str) -> str | None:
    grants = claims.get("grants")
    if not isinstance(grants, dict):
        return None
    chat, identity = grants.get("chat"), grants.get("identity")
    if not isinstance(chat, dict) or chat.get("service_sid") != service_sid:
        return None
    return identity if isinstance(identity, str) and identity else None


def _session(claimed: Any, identity: str) -> Session | None:
    if not isinstance(claimed, dict):
        return None
    start, sid = claimed.get("start"), claimed.get("conversation_sid")
    caller = claimed.get("caller")
    if not (_is_int(start) and isinstance(caller, str) and isinstance(sid, str)):
        return None
    if sid and not _CONVERSATION_SID.fullmatch(sid):
        return None
    return Session(identity, sid, start)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
