"""Twilio Conversations: posting the guest's first message into its new conversation, and asking
which conversations a guest is in (to find a chat whose create may or may not have happened, and
whether a returning guest's chat is still open).

``POST {conversations}/v1/Conversations/{CH}/Messages`` with ``Author`` = the guest identity and
``X-Twilio-Webhook-Enabled: true``, so the post fires the conversation's webhooks (what starts the
Flex task) as if the guest had typed it. Like WebChats it has no idempotency key, and a duplicate
message would sit in front of the agent, so only failures Twilio never processed are retried. It
does not draw on the WebChats rate budget: that limit is the webchat orchestrator's.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from urllib.parse import quote

from .config import Settings
from .deadline import Deadline
from .errors import UnusableRead, UpstreamBadResponse, UpstreamError
from .flex import CONVERSATION_SID, WebChat
from .upstream import TwilioHttp, UpstreamRequest, json_object

MESSAGE_SID = re.compile(r"IM[0-9a-fA-F]{32}")
TWILIO_NOT_FOUND = 20404  # the code of Twilio's own 404 body
CONVERSATION_STATES = frozenset({"active", "inactive", "closed"})


class ConversationsClient:
    def __init__(self, twilio: TwilioHttp, settings: Settings) -> None:
        self._twilio = twilio
        self._base = settings.conversations_url
        self._service_sid = settings.conversations_service_sid

    async def find_conversation(self, identity: str, deadline: Deadline) -> WebChat | None:
        """A conversation the guest ``identity`` is in (with its creation time when Twilio says),
        or None when Twilio knows no such guest (its 404) or the guest is in none. A GET: every
        failure class may be retried. UnusableRead when the answer says neither: unknown is
        never "not found", which would let a second chat be created."""
        listed = await self._user_conversations(identity, deadline)
        if listed is None:
            raise UnusableRead("the user conversations are not a list")
        sids = [
            entry.get("conversation_sid") if isinstance(entry, dict) else None for entry in listed
        ]
        if not all(isinstance(sid, str) and CONVERSATION_SID.fullmatch(sid) for sid in sids):
            raise UnusableRead("a user conversation without a conversation_sid")
        if not sids:
            return None
        return WebChat(str(sids[0]), identity, _unix_time(listed[0].get("date_created")))

    async def conversation_state(
        self, identity: str, conversation_sid: str, deadline: Deadline
    ) -> str:
        """``active``, ``inactive`` or ``closed``: the state of the guest's conversation
        ``conversation_sid`` (or, when "", of the first the guest is in). A conversation the guest
        is no longer in, or a guest Twilio no longer knows, reads as ``closed``: there is nothing
        to return to. UnusableRead when the answer does not say."""
        listed = await self._user_conversations(identity, deadline)
        if listed is None:
            raise UnusableRead("the user conversations are not a list")
        for entry in listed:
            sid = entry.get("conversation_sid") if isinstance(entry, dict) else None
            if not isinstance(sid, str) or not CONVERSATION_SID.fullmatch(sid):
                raise UnusableRead("a user conversation without a conversation_sid")
            if conversation_sid in ("", sid):
                state = entry.get("conversation_state")
                if state not in CONVERSATION_STATES:
                    raise UnusableRead("a user conversation without a known conversation_state")
                return str(state)
        return "closed"

    async def _user_conversations(self, identity: str, deadline: Deadline) -> list[Any] | None:
        """The guest's entries of ``GET /v1/Services/{IS}/Users/{identity}/Conversations``:
        empty when Twilio knows no such guest (its 404, code 20404), None when the answer has no
        list; UnusableRead for a 404 that is not Twilio's."""
        request = UpstreamRequest(
            "user_conversations",
            f"{self._base}/v1/Services/{self._service_sid}/Users/"
            f"{quote(identity, safe='')}/Conversations",
            method="GET",
            route="/v1/Services/{ServiceSid}/Users/{Identity}/Conversations",
        )
        try:
            response = await self._twilio.send(request, deadline, retry_ambiguous=True)
        except UpstreamError as exc:
            if exc.http_status != 404:
                raise
            # Only Twilio's own 404 says "no such guest"; another (a proxy's or gateway's page)
            # says nothing about the guest, and reading it as "not found" would create again.
            if exc.twilio_code != TWILIO_NOT_FOUND:
                raise UnusableRead("a 404 that is not Twilio's (no code 20404)") from None
            return []
        listed = (json_object(response) or {}).get("conversations")
        return listed if isinstance(listed, list) else None

    def message_need(self) -> float:
        """The time a message post is expected to take (reserved by a create followed by one)."""
        return self._twilio.estimate("messages").need()

    async def post_message(
        self, conversation_sid: str, author: str, body: str, deadline: Deadline
    ) -> str:
        """Posts ``body`` as ``author``, webhooks on; the message's ``IM…`` SID."""
        request = UpstreamRequest(
            "messages",
            f"{self._base}/v1/Conversations/{quote(conversation_sid, safe='')}/Messages",
            {"Author": author, "Body": body},
            {"X-Twilio-Webhook-Enabled": "true"},
            route="/v1/Conversations/{ConversationSid}/Messages",
        )
        response = await self._twilio.send(request, deadline, retry_ambiguous=False)
        sid = (json_object(response) or {}).get("sid")
        if not isinstance(sid, str) or not MESSAGE_SID.fullmatch(sid):
            raise UpstreamBadResponse(response.status_code, "message sid is not IM + 32 hex")
        return sid


def _unix_time(iso: object) -> float | None:
    """Twilio's ``2026-12-06T21:30:37Z``, as unix seconds; None when absent or unreadable."""
    try:
        return datetime.fromisoformat(str(iso)).timestamp() if iso else None
    except ValueError:
        return None
