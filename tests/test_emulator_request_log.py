"""The emulator's request log names the conversation each request created, even when a fault hid
the answer: ``make bench`` counts creates per request_id from it, for any facade."""

from __future__ import annotations

import httpx
from conftest import ADDRESS_SID, EmulatorProcess

from emulator.app import ACCOUNT_SID, AUTH_TOKEN, SERVICE_SID


def post_web_chat(upstream: EmulatorProcess) -> int | None:
    """The HTTP status, or None when the emulator dropped the connection."""
    try:
        response = httpx.post(
            upstream.url + "/v2/WebChats",
            data={"AddressSid": ADDRESS_SID},
            auth=(ACCOUNT_SID, AUTH_TOKEN),
        )
    except httpx.TransportError:
        return None
    return response.status_code


def test_each_request_names_the_conversation_it_created(upstream: EmulatorProcess) -> None:
    upstream.fault({"status": 502, "after": True}, {"drop": True, "after": True}, {"status": 502})
    statuses = [post_web_chat(upstream) for _ in range(4)]
    assert statuses == [502, None, 502, 201]
    log = upstream.requests()
    created = [entry["conversation_sid"] for entry in log]
    # Created then failed, created then dropped, refused before creating, created.
    assert [sid is not None for sid in created] == [True, True, False, True]
    assert sorted(sid for sid in created if sid) == sorted(upstream.conversations())


def test_the_user_conversations_read_reports_each_conversations_state(
    upstream: EmulatorProcess,
) -> None:
    """As Twilio's, the emulator's user-conversations read says whether an agent ended the chat."""
    response = httpx.post(
        upstream.url + "/v2/WebChats",
        data={"AddressSid": ADDRESS_SID},
        auth=(ACCOUNT_SID, AUTH_TOKEN),
    )
    chat = response.json()

    def state() -> str:
        read = httpx.get(
            f"{upstream.url}/v1/Services/{SERVICE_SID}/Users/{chat['identity']}/Conversations",
            auth=(ACCOUNT_SID, AUTH_TOKEN),
        )
        (entry,) = read.json()["conversations"]
        assert entry["conversation_sid"] == chat["conversation_sid"]
        return str(entry["conversation_state"])

    assert state() == "active"
    upstream.set_state(chat["conversation_sid"], "closed")
    assert state() == "closed"
    upstream.reset()
    assert chat["conversation_sid"] not in upstream.conversations()
