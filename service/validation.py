"""Checks a CreateWebChatRequest before anything leaves the facade.

Every bad field gets its own violation, so a caller fixes all of them in one go.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from flexwebchat.v1 import webchat_pb2

from service.errors import InvalidRequest
from service.params import WebChatParams

ADDRESS_SID = re.compile(r"IG[0-9a-fA-F]{32}")
REQUEST_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
UI_VERSION = re.compile(r"[\x21-\x7e]{1,64}")  # a header value: visible ASCII, no spaces
MAX_NAME_CHARS = 256
MAX_PRE_ENGAGEMENT_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 32 * 1024  # Conversations' limit on a chat message body
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_JSON_KINDS[type(None)] = "null"

# Other SID kinds people paste into address_sid, by prefix.
_WRONG_SID_KINDS = {
    "AD": "a regulatory address (AD…)",
    "IS": "a Conversations service (IS…)",
    "CH": "a conversation (CH…)",
    "AC": "an account (AC…)",
    "FO": "a Flex flow (FO…)",
    "FW": "a Studio flow (FW…)",
}


def validate(request: webchat_pb2.CreateWebChatRequest) -> WebChatParams:
    """The upstream parameters for ``request``, or InvalidRequest naming every bad field."""
    violations: list[tuple[str, str]] = []

    def check(field: str, problem: str | None) -> None:
        if problem:
            violations.append((field, problem))

    check("address_sid", _address_sid_problem(request.address_sid))
    for field in ("chat_friendly_name", "customer_friendly_name", "identity"):
        check(field, _name_problem(getattr(request, field)))
    check("pre_engagement_data", _pre_engagement_problem(request.pre_engagement_data))
    if request.ui_version and not UI_VERSION.fullmatch(request.ui_version):
        check("ui_version", "must be 1-64 visible ASCII characters without spaces, e.g. 1.0.0")
    if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
        check("request_id", "must be a UUID such as 123e4567-e89b-12d3-a456-426614174000")
    check("initial_message", _message_problem(request.initial_message))
    if violations:
        raise InvalidRequest(violations)
    return WebChatParams(
        address_sid=request.address_sid,
        chat_friendly_name=request.chat_friendly_name,
        customer_friendly_name=request.customer_friendly_name,
        pre_engagement_data=request.pre_engagement_data,
        identity=request.identity,
        ui_version=request.ui_version,
        initial_message=request.initial_message,
    )


def validate_refresh(request: webchat_pb2.RefreshGuestTokenRequest) -> str:
    """The presented token, or InvalidRequest; whether it is genuine is for service.tokens."""
    if not request.access_token:
        raise InvalidRequest([("access_token", "is required: the guest's current access token")])
    return request.access_token


def _address_sid_problem(value: str) -> str | None:
    if ADDRESS_SID.fullmatch(value):
        return None
    expected = (
        "must be the SID of a Conversations address configuration: IG followed by "
        "32 hex digits (Console: Conversations > Addresses)"
    )
    if not value:
        return f"is required; it {expected}"
    wrong_kind = _WRONG_SID_KINDS.get(value[:2].upper())
    if wrong_kind:
        return f"{expected}; this looks like the SID of {wrong_kind}"
    return f"{expected}; got {len(value)} characters starting {value[:4]!r}"


def _name_problem(value: str) -> str | None:
    if len(value) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters, got {len(value)}"
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        return "must not contain control characters (such as newlines or NUL)"
    return None


def _message_problem(value: str) -> str | None:
    if not value:
        return None
    size = len(value.encode("utf-8"))
    if size > MAX_MESSAGE_BYTES:
        return f"must be at most {MAX_MESSAGE_BYTES} bytes of UTF-8, got {size}"
    if any(unicodedata.category(ch) == "Cc" and ch not in "\r\n\t" for ch in value):
        return "must not contain control characters other than newlines and tabs"
    if value.isspace():
        return "must not be only whitespace: the agent would see an empty message"
    return None


def _pre_engagement_problem(value: str) -> str | None:
    if not value:
        return None
    size = len(value.encode("utf-8"))
    if size > MAX_PRE_ENGAGEMENT_BYTES:
        return f"must be at most {MAX_PRE_ENGAGEMENT_BYTES} bytes of UTF-8, got {size}"
    try:
        parsed = json.loads(value, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return f"must be a JSON object: {_short(exc)}"
    if not isinstance(parsed, dict):
        return f"must be a JSON object ({{...}}), got a JSON {_JSON_KINDS[type(parsed)]}"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _short(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0][:200]
