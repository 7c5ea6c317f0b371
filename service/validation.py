"""Checks a CreateWebChatRequest before anything leaves the facade.

Every bad field gets its own violation, so a caller fixes all of them in one go.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

from flexwebchat.v1 import webchat_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .errors import InvalidRequest
from .params import WebChatParams

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
    if value.isascii() and value.isprintable():  # most names: no character needs looking up
        return None
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        return "must not contain control characters (such as newlines or NUL)"
    return _invisible_problem(value)


# Characters that change what a Flex agent sees without being seen themselves: format characters
# (zero-width, bidi overrides: Cf), line and paragraph separators (Zl, Zp), surrogates (Cs),
# private-use (Co) and unassigned code points, noncharacters included (Cn).
_INVISIBLE = frozenset({"Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _invisible_problem(value: str) -> str | None:
    for ch in value:
        if unicodedata.category(ch) in _INVISIBLE:
            return (
                f"must not contain invisible, bidi-control or unassigned characters "
                f"(found U+{ord(ch):04X})"
            )
    return None


def _message_problem(value: str) -> str | None:
    """What people type passes (newlines, tabs, emoji joined by ZWJ, variation selectors, ZWNJ,
    code points newer than this runtime's Unicode); what can make an agent see something other
    than what was sent does not."""
    if not value:
        return None
    size = len(value.encode("utf-8"))
    if size > MAX_MESSAGE_BYTES:
        return f"must be at most {MAX_MESSAGE_BYTES} bytes of UTF-8, got {size}"
    if value.isascii():  # most messages: no character needs looking up
        if any((ch < " " and ch not in "\r\n\t") or ch == "\x7f" for ch in value):
            return "must not contain control characters other than newlines and tabs"
        if value.isspace():
            return _NOTHING_VISIBLE
        return None
    visible = False
    for ch in value:
        code = ord(ch)
        if unicodedata.category(ch) == "Cc" and ch not in "\r\n\t":
            return "must not contain control characters other than newlines and tabs"
        if ch in _BIDI_CONTROLS:
            return (
                "must not contain bidi embedding, override or isolate characters "
                f"(U+202A-U+202E, U+2066-U+2069; found U+{code:04X}): they reorder what the "
                "agent sees"
            )
        if ch in "\u2028\u2029":
            return (
                f"must not contain line or paragraph separators (found U+{code:04X}); use a newline"
            )
        if 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE:
            return f"must not contain noncharacters (found U+{code:04X})"
        if 0x206A <= code <= 0x206F or 0xFFF9 <= code <= 0xFFFB:
            return (
                f"must not contain deprecated shaping or interlinear annotation characters "
                f"(found U+{code:04X}): they change or hide text the agent sees"
            )
        visible = visible or _is_visible(ch)
    if _TAG.search(value) and not _only_flag_tags(value):
        return (
            "must not contain tag characters (U+E0000-U+E007F) outside an emoji flag sequence: "
            "they carry text the agent does not see"
        )
    return None if visible else _NOTHING_VISIBLE


# Tag characters spell hidden ASCII. The one use people type is a subdivision flag: a black flag,
# a few tags, a cancel tag (England is U+1F3F4 g b e n g U+E007F).
_TAG = re.compile("[\U000e0000-\U000e007f]")
_FLAG_TAGS = re.compile("\U0001f3f4[\U000e0020-\U000e007e]{1,7}\U000e007f")


def _only_flag_tags(value: str) -> bool:
    return not _TAG.search(_FLAG_TAGS.sub("", value))


_NOTHING_VISIBLE = (
    "must contain a visible character, not only whitespace, zero-width or format characters: "
    "the agent would see an empty message"
)
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Unicode's Default_Ignorable_Code_Point ranges (shown as nothing: zero-width characters,
# variation selectors, tags, Hangul fillers), and the blank braille pattern, which shows as a
# space.
_IGNORABLE = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x2800, 0x2800),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)


def _is_visible(ch: str) -> bool:
    """Whether ``ch`` shows as something. Unassigned code points count: they are most likely
    characters newer than this runtime's Unicode (new emoji), which the agent's browser shows."""
    if unicodedata.category(ch) in ("Zs", "Zl", "Zp", "Cc", "Cf"):
        return False
    code = ord(ch)
    return not any(low <= code <= high for low, high in _IGNORABLE)


def _pre_engagement_problem(value: str) -> str | None:
    if not value:
        return None
    size = len(value.encode("utf-8"))
    if size > MAX_PRE_ENGAGEMENT_BYTES:
        return f"must be at most {MAX_PRE_ENGAGEMENT_BYTES} bytes of UTF-8, got {size}"
    try:
        parsed = json.loads(
            value,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as exc:
        return f"must be a JSON object: {_short(exc)}"
    if not isinstance(parsed, dict):
        return f"must be a JSON object ({{...}}), got a JSON {_JSON_KINDS[type(parsed)]}"
    return _lone_surrogate_problem(parsed)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):  # 1e400: other parsers disagree on what it means
        raise ValueError(f"the number {text[:20]} is out of range")
    return number


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins: what the facade checked and what an
    # agent sees could differ.
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:40]!r}")
        result[key] = item
    return result


def _lone_surrogate_problem(parsed: Any) -> str | None:
    """JSON escapes can spell a lone surrogate (\\ud800), which is no character at all."""
    pending = [parsed]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and any("\ud800" <= ch <= "\udfff" for ch in item):
            return "must be a JSON object: a string holds a lone surrogate (\\uD800-\\uDFFF)"
    return None


def _short(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0][:200]


def wire_problems(raw: bytes, descriptor: Descriptor | None) -> list[tuple[str, str]]:
    """Field violations for a message that protobuf refused to decode: the string fields that
    are not UTF-8 when that is the cause, else one violation on the whole request."""
    problems: list[tuple[str, str]] = []
    fields = descriptor.fields_by_number if descriptor is not None else {}
    for number, chunk in _length_delimited(raw):
        field = fields.get(number)
        if field is None or field.type != FieldDescriptor.TYPE_STRING:
            continue
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            problems.append((field.name, "must be valid UTF-8"))
    return problems or [("request", "is not a valid protobuf message of the method's type")]


def _length_delimited(raw: bytes) -> list[tuple[int, bytes]]:
    """The top-level length-delimited fields of a protobuf message, as far as it parses."""
    found, at = [], 0
    try:
        while at < len(raw):
            key, at = _varint(raw, at)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, at = _varint(raw, at)
            elif wire_type == 1:
                at += 8
            elif wire_type == 5:
                at += 4
            elif wire_type == 2:
                size, at = _varint(raw, at)
                found.append((number, raw[at : at + size]))
                at += size
            else:
                break
    except IndexError:
        pass
    return found


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80 or shift > 63:
            return value, at
        shift += 7
