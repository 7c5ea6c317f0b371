"""Twilio Flex's ``POST /v2/WebChats``: its form, its headers, its answer.

The request matches what twilio-python's ``client.flex_api.v2.web_channels.create(...)`` sends,
field for field and header for header, except for the honest ``User-Agent`` and the absence of
``X-Twilio-Client`` (which names Twilio's own SDK). Sending, retries and failure classes are
``service.upstream``'s; every attempt draws on the account-wide rate limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

from . import observability as obs
from .config import Settings
from .deadline import Deadline
from .errors import UpstreamBadResponse
from .params import WebChatParams
from .ratelimit import Limiter
from .upstream import TwilioHttp, UpstreamRequest, json_object

WEBCHATS_PATH = "/v2/WebChats"
CONVERSATION_SID = re.compile(r"CH[0-9a-fA-F]{32}")


@dataclass(frozen=True)
class WebChat:
    conversation_sid: str
    identity: str
    # When Twilio created it (unix seconds), for a chat found rather than just created.
    created_at: float | None = None


class FlexClient:
    def __init__(self, twilio: TwilioHttp, settings: Settings, limiter: Limiter) -> None:
        self._twilio = twilio
        self._settings = settings
        self._limiter = limiter
        self._url = httpx.URL(settings.base_url + WEBCHATS_PATH)  # parsed once, not per call
        # A create without its form: what wait_turn needs to admit one.
        self._request_shape = UpstreamRequest(
            "webchats", self._url, creates=True, route=WEBCHATS_PATH
        )

    async def create_web_chat(
        self,
        params: WebChatParams,
        deadline: Deadline,
        *,
        retry_ambiguous: bool,
        reserve: float = 0.0,
        admitted: bool = False,
    ) -> WebChat:
        """POST /v2/WebChats under the retry policy; raises a FacadeError on failure. An attempt
        starts only if ``reserve`` seconds (for what follows the create) will be left too.
        ``admitted``: the first attempt's turn was taken with ``wait_turn``."""
        headers = {}
        ui_version = params.ui_version or self._settings.ui_version
        if ui_version:
            headers["Ui-Version"] = ui_version
        response = await self._twilio.send(
            UpstreamRequest(
                "webchats", self._url, params.form(), headers, creates=True, route=WEBCHATS_PATH
            ),
            deadline,
            retry_ambiguous=retry_ambiguous or self._settings.retry_ambiguous,
            limiter=self._limiter,
            reserve=reserve,
            admitted=admitted,
        )
        return _web_chat(response)

    async def wait_turn(self, deadline: Deadline, *, reserve: float = 0.0) -> None:
        """Waits for a create's turn at the rate limit (refused, having taken nothing, when it
        would come too late); ``create_web_chat(..., admitted=True)`` then sends at once. Nothing
        is sent while waiting, so the caller may wait without a task of its own."""
        await self._twilio.wait_turn(self._request_shape, deadline, self._limiter, reserve)


def _web_chat(response: httpx.Response) -> WebChat:
    body = json_object(response)
    if body is None:
        raise UpstreamBadResponse(response.status_code, "body is not a JSON object")
    sid, identity = body.get("conversation_sid"), body.get("identity")
    if not isinstance(sid, str) or not CONVERSATION_SID.fullmatch(sid):
        raise UpstreamBadResponse(response.status_code, "conversation_sid is not CH + 32 hex")
    if not isinstance(identity, str) or not identity:
        raise UpstreamBadResponse(response.status_code, "identity is missing")
    obs.current_rpc().conversation_sid = sid
    return WebChat(conversation_sid=sid, identity=identity)
