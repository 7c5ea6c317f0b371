"""The facade's upstream request matches twilio-python's, field for field and header for header.

Both send to the same emulator; the emulator records what arrived on the wire.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ADDRESS_SID, EmulatorProcess, FacadeProcess
from twilio.rest import Client

from emulator.app import ACCOUNT_SID, AUTH_TOKEN

# Headers that name the client library, so they differ by design: the facade sends its own
# honest User-Agent and no X-Twilio-Client (which identifies Twilio's SDK).
LIBRARY_HEADERS = {"user-agent", "x-twilio-client"}
# Transport details each HTTP library picks for itself.
TRANSPORT_HEADERS = {"host", "content-length", "accept-encoding", "connection"}

CASES = {
    "full": dict(
        chat_friendly_name="Support chat",
        customer_friendly_name="Ada Lovelace",
        pre_engagement_data=json.dumps({"friendlyName": "Ada", "question": "Où est ma commande ?"}),
        identity="guest-ada@example.com",
        ui_version="1.0.0",
    ),
    "minimal": {},
}


def twilio_python_request(upstream: EmulatorProcess, fields: dict[str, str]) -> dict:
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.flex_api.base_url = upstream.url
    client.flex_api.v2.web_channels.create(address_sid=ADDRESS_SID, **fields)
    return upstream.requests()[-1]


@pytest.fixture
def facade(make_facade, upstream: EmulatorProcess) -> FacadeProcess:
    """Callers (anonymous: caller auth is off) may choose identities starting guest-."""
    return make_facade(upstream.url, CALLER_IDENTITY_PREFIXES="anonymous=guest-")  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", CASES)
def test_same_request_as_twilio_python(
    facade: FacadeProcess, upstream: EmulatorProcess, case: str
) -> None:
    fields = CASES[case]
    reference = twilio_python_request(upstream, fields)
    facade.create(**fields)
    ours = upstream.requests()[-1]

    assert ours["method"] == reference["method"] == "POST"
    assert ours["path"] == reference["path"] == "/v2/WebChats"
    assert list(ours["form"].items()) == list(reference["form"].items())

    def comparable(headers: dict[str, str]) -> dict[str, str]:
        return {
            k.lower(): v
            for k, v in headers.items()
            if k.lower() not in LIBRARY_HEADERS | TRANSPORT_HEADERS
        }

    assert comparable(ours["headers"]) == comparable(reference["headers"])
    assert "x-twilio-client" in {k.lower() for k in reference["headers"]}
    assert ours["headers"]["User-Agent"].startswith("flexwebchat/")


def test_fields_are_those_of_the_openapi_contract(
    facade: FacadeProcess, upstream: EmulatorProcess
) -> None:
    spec_path = Path(__file__).resolve().parents[2] / "shared/reference/twilio_flex_v2.json"
    if not spec_path.exists():
        pytest.skip("shared/reference is not beside this checkout")
    spec = json.loads(spec_path.read_text())
    operation = spec["paths"]["/v2/WebChats"]["post"]
    body_schema = operation["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    header_names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
    response_ref = operation["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    response_schema = spec["components"]["schemas"][response_ref.rsplit("/", 1)[-1]]

    reply = facade.create(**CASES["full"])
    sent = upstream.requests()[-1]
    assert set(sent["form"]) <= set(body_schema["properties"])
    assert set(body_schema.get("required", [])) <= set(sent["form"])
    assert "Ui-Version" in header_names and "Ui-Version" in sent["headers"]
    assert {"conversation_sid", "identity"} <= set(response_schema["properties"])
    assert reply.conversation_sid and reply.identity
