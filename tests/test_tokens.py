"""Guest tokens: twilio-python's AccessToken + ChatGrant claim for claim, plus the session claim,
and a refresh that accepts only genuine tokens of this facade, from their session's creator,
within the session."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import ChatGrant

from service.config import Secret
from service.errors import TokenRejected, TokenWrongCaller
from service.tokens import SESSION_CLAIM, GuestTokens, Session, SigningKey

ACCOUNT = "AC" + "a1" * 16
KEY = "SK" + "b2" * 16
SECRET = "guest-token-signing-secret-0123456789"
SERVICE = "IS" + "c3" * 16
IDENTITY = "0f83ef42-accc-432f-8fc4-e892482f62f1"
NOW = 1_800_000_000


@dataclass(frozen=True)
class FixedKeys:
    """Keys as the credentials holder supplies them: the current signs, both verify."""

    current: SigningKey
    previous: SigningKey | None = None

    def signing_key(self) -> SigningKey:
        return self.current

    def verification_keys(self) -> Sequence[SigningKey]:
        return [self.current] if self.previous is None else [self.current, self.previous]


CHAT = "CH" + "d4" * 16
CALLER = "web-frontend"
SESSION = Session(IDENTITY, CHAT, NOW)


def tokens(**overrides: Any) -> GuestTokens:
    values: dict[str, Any] = {
        "keys": FixedKeys(SigningKey(KEY, Secret(SECRET))),
        "account_sid": ACCOUNT,
        "service_sid": SERVICE,
        "ttl_seconds": 3600,
        "session_max_seconds": 86400,
    }
    values.update(overrides)
    return GuestTokens(**values)


def session_now() -> Session:
    return Session(IDENTITY, CHAT, int(time.time()))


def decoded(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    claims = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False}
    )
    return jwt.get_unverified_header(token), claims


@pytest.mark.parametrize("region", ["", "ie1"])
def test_token_matches_twilio_python_claim_by_claim(
    region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW + 0.25)
    theirs = AccessToken(
        ACCOUNT,
        KEY,
        SECRET,
        identity=IDENTITY,
        ttl=900,
        region=region or None,
        grants=[ChatGrant(service_sid=SERVICE)],
    ).to_jwt()
    ours = tokens(ttl_seconds=900, region=region).mint(SESSION, CALLER)

    their_header, their_claims = decoded(theirs)
    our_header, our_claims = decoded(ours.jwt)
    assert our_header == their_header
    session = our_claims.pop(SESSION_CLAIM)  # the one claim Twilio does not read
    assert our_claims == their_claims
    assert session["start"] == NOW and session["conversation_sid"] == CHAT
    assert CALLER not in json.dumps(session)  # the creator is an opaque tag, not its name
    assert our_claims["grants"] == {"identity": IDENTITY, "chat": {"service_sid": SERVICE}}
    assert ("twr" in our_header) == bool(region)
    assert ours.expires_at == our_claims["exp"] == NOW + 900


def test_a_genuine_token_refreshes_to_its_session() -> None:
    session = session_now()
    presented = tokens().verify(tokens().mint(session, CALLER).jwt, CALLER)
    assert presented.session == session and not presented.expired


def test_only_the_creating_caller_may_refresh() -> None:
    token = tokens().mint(session_now(), CALLER).jwt
    with pytest.raises(TokenWrongCaller):
        tokens().verify(token, "another-team")


def test_no_token_outlives_its_session() -> None:
    late = tokens(ttl_seconds=3600, session_max_seconds=600).mint(SESSION, CALLER, now=NOW + 300)
    assert late.expires_at == late.session_expires_at == NOW + 600
    short = tokens(ttl_seconds=180, session_max_seconds=600)
    minted = short.mint(SESSION, CALLER, now=NOW + 300)
    assert (minted.expires_at, minted.session_expires_at) == (NOW + 480, NOW + 600)
    # Within the session an expired token is presented for a resume; past it, refused.
    assert short.verify(minted.jwt, CALLER, now=NOW + 479).expired is False
    assert short.verify(minted.jwt, CALLER, now=NOW + 599).expired
    with pytest.raises(TokenRejected) as ended:
        short.verify(minted.jwt, CALLER, now=NOW + 600)
    assert ended.value.reason == "TOKEN_EXPIRED"
    with pytest.raises(TokenRejected):
        short.mint(SESSION, CALLER, now=NOW + 600)


def test_the_previous_key_verifies_during_a_rotation_and_the_current_one_signs() -> None:
    old = SigningKey("SK" + "e5" * 16, Secret("the-previous-api-secret-0123456789ab"))
    before = tokens(keys=FixedKeys(old)).mint(session_now(), CALLER).jwt
    rotated = tokens(keys=FixedKeys(SigningKey(KEY, Secret(SECRET)), previous=old))
    presented = rotated.verify(before, CALLER)
    renewed = rotated.mint(presented.session, CALLER)
    assert decoded(renewed.jwt)[1]["iss"] == KEY
    with pytest.raises(TokenWrongCaller):
        rotated.verify(before, "another-team")
    with pytest.raises(TokenRejected):
        tokens().verify(before, CALLER)  # the previous key retired: no longer ours


def forge(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    base = {
        "jti": f"{KEY}-{NOW}",
        "iss": KEY,
        "sub": ACCOUNT,
        "exp": int(time.time()) + 600,
        "grants": {"identity": IDENTITY, "chat": {"service_sid": SERVICE}},
    }
    return jwt.encode(base | claims, key, algorithm=algorithm, headers={"cty": "twilio-fpa;v=1"})


def tampered() -> str:
    header, _, signature = tokens().mint(session_now(), CALLER).jwt.split(".")
    other = forge({"grants": {"identity": "someone-else", "chat": {"service_sid": SERVICE}}})
    return ".".join((header, other.split(".")[1], signature))


def unsigned() -> str:
    token = jwt.encode(
        {"iss": KEY, "sub": ACCOUNT, "exp": NOW * 2, "grants": {"identity": IDENTITY}},
        key=None,
        algorithm="none",
    )
    return str(token)


@pytest.mark.parametrize(
    ("name", "token", "reason"),
    [
        (
            "wrong secret",
            lambda: forge({}, key="not-our-secret-at-all-0123456789"),
            "TOKEN_INVALID",
        ),
        ("payload swapped", tampered, "TOKEN_INVALID"),
        ("alg none", unsigned, "TOKEN_INVALID"),
        ("HS512", lambda: forge({}, algorithm="HS512"), "TOKEN_INVALID"),
        ("foreign key", lambda: forge({"iss": "SK" + "d4" * 16}), "TOKEN_INVALID"),
        ("foreign account", lambda: forge({"sub": "AC" + "e5" * 16}), "TOKEN_INVALID"),
        (
            "foreign service",
            lambda: forge(
                {"grants": {"identity": IDENTITY, "chat": {"service_sid": "IS" + "f" * 32}}}
            ),
            "TOKEN_INVALID",
        ),
        (
            "no identity",
            lambda: forge({"grants": {"chat": {"service_sid": SERVICE}}}),
            "TOKEN_INVALID",
        ),
        ("not a JWT", lambda: "not.a.token", "TOKEN_INVALID"),
        ("expired", lambda: forge({"exp": int(time.time()) - 5}), "TOKEN_EXPIRED"),
        (
            "expired and forged",
            lambda: forge({"exp": int(time.time()) - 5}, key="another-secret-0123456789abcdef-x"),
            "TOKEN_INVALID",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512, our key
def test_refresh_refuses_what_this_facade_did_not_issue(name: str, token: Any, reason: str) -> None:
    with pytest.raises(TokenRejected) as refused:
        tokens().verify(token(), CALLER)
    assert refused.value.reason == reason
    assert SECRET not in str(refused.value) and IDENTITY not in str(refused.value)


def test_reprs_hide_the_secret_and_the_token() -> None:
    minted = tokens().mint(session_now(), CALLER)
    assert SECRET not in repr(tokens())
    assert minted.jwt not in repr(minted) and IDENTITY not in repr(minted)
