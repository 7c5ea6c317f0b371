"""Request validation: every bad field gets a specific violation; good input passes through."""

from __future__ import annotations

import json

import pytest
from flexwebchat.v1.webchat_pb2 import CreateWebChatRequest

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
