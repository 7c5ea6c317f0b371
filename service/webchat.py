"""The servicer: validate -> (idempotency) -> Flex -> response. Raises errors, never builds them."""

from __future__ import annotations

import hashlib

import grpc
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from google.rpc import status_pb2

from service import observability as obs
from service.config import Settings
from service.deadline import Deadline
from service.errors import FacadeError, ReplayedError, to_status
from service.flex import FlexClient, WebChatParams
from service.idempotency import IdempotencyStore, Outcome, is_stored_failure
from service.validation import validate


class WebChatServicer(webchat_pb2_grpc.WebChatServiceServicer):
    def __init__(self, flex: FlexClient, idempotency: IdempotencyStore, settings: Settings):
        self._flex = flex
        self._idempotency = idempotency
        self._settings = settings

    async def CreateWebChat(
        self,
        request: webchat_pb2.CreateWebChatRequest,
        context: grpc.aio.ServicerContext[
            webchat_pb2.CreateWebChatRequest, webchat_pb2.CreateWebChatResponse
        ],
    ) -> webchat_pb2.CreateWebChatResponse:
        params = validate(request)
        deadline = Deadline.for_call(
            context.time_remaining(),
            default=self._settings.default_deadline,
            maximum=self._settings.max_deadline,
        )
        if not request.request_id:
            return await self._create(params, deadline, retry_ambiguous=False)

        obs.current_rpc().request_id = request.request_id

        async def work() -> bytes:
            # With a request_id the caller gets one answer per id whatever we retry, so an
            # ambiguous failure may be retried; see README "Idempotency".
            try:
                response = await self._create(params, deadline, retry_ambiguous=True)
            except FacadeError as exc:
                if is_stored_failure(exc):
                    raise Outcome(to_status(exc).SerializeToString()) from exc
                raise
            return response.SerializeToString()

        record = await self._idempotency.run(
            request.request_id.lower(), fingerprint(request), work, deadline
        )
        if not record.ok:
            raise ReplayedError(status_pb2.Status.FromString(record.payload))
        response = webchat_pb2.CreateWebChatResponse.FromString(record.payload)
        obs.current_rpc().conversation_sid = response.conversation_sid
        return response

    async def _create(
        self, params: WebChatParams, deadline: Deadline, *, retry_ambiguous: bool
    ) -> webchat_pb2.CreateWebChatResponse:
        chat = await self._flex.create_web_chat(params, deadline, retry_ambiguous=retry_ambiguous)
        return webchat_pb2.CreateWebChatResponse(
            conversation_sid=chat.conversation_sid, identity=chat.identity
        )


def fingerprint(request: webchat_pb2.CreateWebChatRequest) -> str:
    """A digest of every field but request_id: a retry must repeat the request exactly."""
    fields = webchat_pb2.CreateWebChatRequest()
    fields.CopyFrom(request)
    fields.request_id = ""
    return hashlib.sha256(fields.SerializeToString(deterministic=True)).hexdigest()
