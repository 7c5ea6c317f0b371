"""Request validation: every bad field gets a specific violation; good input passes through."""

from __future__ import annotations

import json

import pytest
from flexwebchat.v1.webchat_pb2 import CreateWebChatRequest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import InvalidRequest
from service.validation import validate

SID = "IG" + "0a" * 16


def violations(**fields: str) -> dict[str, str]:
    fields.setdefault("address_sid", SID)
    with pytest.raises(InvalidRequest) as caught:
        validate(CreateWebChatRequest(**fields))
    return dict(caught.value.violations)


def test_valid_request_passes_through_unchanged() -> None:
    params = validate(
        CreateWebChatRequest(
            address_sid=SID,
            chat_friendly_name="Chat",
            customer_friendly_name="Zoë",
            pre_engagement_data='{"a": [1, 2]}',
            ui_version="1.0.0",
            identity="z",
            request_id="123E4567-E89B-12D3-A456-426614174000",
        )
    )
    assert (params.address_sid, params.customer_friendly_name, params.ui_version) == (
        SID,
        "Zoë",
        "1.0.0",
    )


@pytest.mark.parametrize(
    ("sid", "hint"),
    [
        ("", "is required"),
        ("AD" + "0" * 32, "regulatory address (AD"),
        ("IS" + "0" * 32, "Conversations service (IS"),
        ("IG" + "0" * 31, "got 33 characters"),
        ("IG" + "g" * 32, "32 hex digits"),
    ],
)
def test_address_sid(sid: str, hint: str) -> None:
    text = violations(address_sid=sid)["address_sid"]
    assert "Conversations address configuration" in text and hint in text


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        ("[1]", "got a JSON array"),
        ('"text"', "got a JSON string"),
        ("null", "got a JSON null"),
        ("{", "must be a JSON object"),
        ('{"x": NaN}', "NaN is not valid JSON"),
        ("[" * 5000 + "]" * 5000, "must be a JSON object"),
        (json.dumps({"x": "é" * 9000}), "at most 16384 bytes"),
    ],
)
def test_pre_engagement_data(data: str, hint: str) -> None:
    assert hint in violations(pre_engagement_data=data)["pre_engagement_data"]


def test_pre_engagement_data_up_to_16_kb_is_accepted() -> None:
    data = json.dumps({"x": "a" * (16 * 1024 - 9)})
    assert len(data.encode()) == 16 * 1024
    validate(CreateWebChatRequest(address_sid=SID, pre_engagement_data=data))


@pytest.mark.parametrize("field", ["chat_friendly_name", "customer_friendly_name", "identity"])
def test_names_have_sane_limits(field: str) -> None:
    assert "at most 256 characters" in violations(**{field: "x" * 257})[field]
    assert "control characters" in violations(**{field: "a\nb"})[field]
    validate(CreateWebChatRequest(address_sid=SID, **{field: "名" * 256}))


@pytest.mark.parametrize("value", ["1.0 beta", "x" * 65, "é"])
def test_ui_version_must_be_a_header_value(value: str) -> None:
    assert "ui_version" in violations(ui_version=value)


@pytest.mark.parametrize(
    "value", ["abc", "123e4567e89b12d3a456426614174000", "{123e4567-e89b-12d3-a456-426614174000}"]
)
def test_request_id_must_be_a_uuid(value: str) -> None:
    assert "UUID" in violations(request_id=value)["request_id"]


def test_all_bad_fields_are_reported_together() -> None:
    found = violations(address_sid="x", identity="\x00", ui_version=" ", request_id="r")
    assert set(found) == {"address_sid", "identity", "ui_version", "request_id"}


# What people type in a first message, and must get through.
TYPED_MESSAGES = [
    "Hello,\n\tI was charged twice.\r\nThanks",
    "👨\u200d👩\u200d👧\u200d👦 family, 🏳\ufe0f\u200d🌈 flag, ❤\ufe0f, 👍🏽",  # ZWJ, VS16
    "می\u200cخواهم سفارش بدهم",  # noqa: RUF001 - Persian: ZWNJ inside a word
    "\U0001fae8 \U0001fae9",  # emoji from Unicode 15 and 16, newer than Python 3.11's tables
    "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",  # England: tag sequence
    "שלום \u200fעולם",  # noqa: RUF001 - a right-to-left mark is ordinary in Hebrew
    "e\u0301",  # a combining accent
]


@pytest.mark.parametrize("message", TYPED_MESSAGES)
def test_typed_first_messages_pass(message: str) -> None:
    assert validate(CreateWebChatRequest(address_sid=SID, initial_message=message)).initial_message


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ("pay \u202eevil\u202c now", "bidi embedding, override or isolate"),
        ("\u2066isolated\u2069", "found U+2066"),
        ("a\u202ab", "found U+202A"),
        ("line\u2028separator", "line or paragraph separators"),
        ("para\u2029graph", "found U+2029"),
        ("non\ufffecharacter", "noncharacters (found U+FFFE)"),
        ("\ufdd0", "noncharacters"),
        ("x\U0010ffff", "found U+10FFFF"),
        ("\u200b\u200d\u2060", "visible character"),
        ("\ufe0f\ufeff ", "visible character"),
        (" \u3000\u00a0\n", "visible character"),
        ("\u2800\u3164", "visible character"),
        ("\U000e0067\U000e007f", "tag characters"),
        ("Hi" + "".join(chr(0xE0000 + ord(c)) for c in "refund $500"), "tag characters"),
        ("🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067", "tag characters"),  # no end
        ("Hi\u206a\u206b", "found U+206A"),
        ("Hi\ufff9hidden\ufffaann\ufffb", "interlinear annotation"),
        ("é\x07", "control characters other than newlines and tabs"),
    ],
)
def test_first_messages_that_spoof_an_agents_view_are_refused(message: str, problem: str) -> None:
    assert problem in violations(initial_message=message)["initial_message"]


visible_text = st.text(
    st.characters(categories=["L", "M", "N", "P", "S", "Zs"])
    | st.sampled_from("\n\t\u200d\u200c\ufe0f"),
    max_size=40,
)
visible_char = st.characters(categories=["L", "N", "P", "So"]).filter(lambda ch: ch not in "\u2800")
forbidden_char = st.sampled_from(
    [*"\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029", "\ufdd0", "\uffff"]
    + [chr(plane * 0x10000 + 0xFFFE) for plane in range(1, 17)]
)
invisible_text = st.text(
    st.sampled_from(" \t\n\r\u00a0\u3000\u200b\u200c\u200d\u200e\u2060\ufe0f\ufeff\u2800"),
    min_size=1,
)


@given(before=visible_text, middle=visible_char, after=visible_text)
def test_text_with_a_visible_character_passes(before: str, middle: str, after: str) -> None:
    message = before + middle + after
    validate(CreateWebChatRequest(address_sid=SID, initial_message=message))


@given(before=visible_text, bad=forbidden_char, after=visible_text)
def test_a_forbidden_character_anywhere_is_refused(before: str, bad: str, after: str) -> None:
    problem = violations(initial_message=before + "x" + bad + after)["initial_message"]
    assert f"U+{ord(bad):04X}" in problem


@given(message=invisible_text)
def test_text_without_a_visible_character_is_refused(message: str) -> None:
    assert "visible character" in violations(initial_message=message)["initial_message"]
