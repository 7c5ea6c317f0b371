"""Guest tokens: exactly twilio-python's AccessToken + ChatGrant, and a refresh that accepts only
genuine, unexpired tokens of this facade."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import ChatGrant

from service.config import Secret
from service.errors import TokenRejected
from service.tokens import GuestTokens

ACCOUNT = "AC" + "a1" * 16
KEY = "SK" + "b2" * 16
SECRET = "guest-token-signing-secret-0123456789"
SERVICE = "IS" + "c3" * 16
IDENTITY = "0f83ef42-accc-432f-8fc4-e892482f62f1"
NOW = 1_800_000_000


def tokens(**overrides: Any) -> GuestTokens:
    values: dict[str, Any] = {
        "api_key": KEY,
        "api_secret": Secret(SECRET),
        "account_sid": ACCOUNT,
        "service_sid": SERVICE,
        "ttl_seconds": 3600,
    }
    values.update(overrides)
    return GuestTokens(**values)


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
    ours = tokens(ttl_seconds=900, region=region).mint(IDENTITY)

    their_header, their_claims = decoded(theirs)
    our_header, our_claims = decoded(ours.jwt)
    assert our_header == their_header
    assert our_claims == their_claims
    assert our_claims["grants"] == {"identity": IDENTITY, "chat": {"service_sid": SERVICE}}
    assert ("twr" in our_header) == bool(region)
    assert ours.expires_at == our_claims["exp"] == NOW + 900


def test_a_genuine_token_refreshes_to_its_identity() -> None:
    assert tokens().verify(tokens().mint(IDENTITY).jwt) == IDENTITY


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
    header, _, signature = tokens().mint(IDENTITY).jwt.split(".")
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
        tokens().verify(token())
    assert refused.value.reason == reason
    assert SECRET not in str(refused.value) and IDENTITY not in str(refused.value)


def test_reprs_hide_the_secret_and_the_token() -> None:
    minted = tokens().mint(IDENTITY)
    assert SECRET not in repr(tokens())
    assert minted.jwt not in repr(minted) and IDENTITY not in repr(minted)
