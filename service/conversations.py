"""Twilio Conversations: posting the guest's first message into its new conversation.

``POST {conversations}/v1/Conversations/{CH}/Messages`` with ``Author`` = the guest identity and
``X-Twilio-Webhook-Enabled: true``, so the post fires the conversation's webhooks (what starts the
Flex task) as if the guest had typed it. Like WebChats it has no idempotency key, and a duplicate
message would sit in front of the agent, so only failures Twilio never processed are retried. It
does not draw on the WebChats rate budget: that limit is the webchat orchestrator's.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from service.config import Settings
from service.deadline import Deadline
from service.errors import UpstreamBadResponse
from service.upstream import TwilioHttp, UpstreamRequest, json_object

MESSAGE_SID = re.compile(r"IM[0-9a-fA-F]{32}")


class ConversationsClient:
    def __init__(self, twilio: TwilioHttp, settings: Settings) -> None:
        self._twilio = twilio
        self._base = settings.conversations_url

    async def post_message(
        self, conversation_sid: str, author: str, body: str, deadline: Deadline
    ) -> str:
        """Posts ``body`` as ``author``, webhooks on; the message's ``IM…`` SID."""
        request = UpstreamRequest(
            "messages",
            f"{self._base}/v1/Conversations/{quote(conversation_sid, safe='')}/Messages",
            {"Author": author, "Body": body},
            {"X-Twilio-Webhook-Enabled": "true"},
        )
        response = await self._twilio.send(request, deadline, retry_ambiguous=False)
        sid = (json_object(response) or {}).get("sid")
        if not isinstance(sid, str) or not MESSAGE_SID.fullmatch(sid):
            raise UpstreamBadResponse(response.status_code, "message sid is not IM + 32 hex")
        return sid
