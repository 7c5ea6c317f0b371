"""The servicer: validate -> (idempotency) -> Twilio -> response. Raises errors, builds none."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import TypeAlias

import grpc
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from . import execution
from . import observability as obs
from .auth import ANONYMOUS
from .config import Settings
from .conversations import ConversationsClient
from .credentials import Credentials
from .deadline import Deadline
from .errors import (
    ConversationClosed,
    DeadlineExceeded,
    FacadeError,
    MaybeProcessed,
    ReplayedError,
    SessionEnded,
    TokenRejected,
    TokensNotConfigured,
    TokenWrongCaller,
    to_status,
)
from .execution import Executions
from .find_or_create import FindOrCreate
from .flex import FlexClient, WebChat
from .idempotency import IdempotencyStore, Outcome, Produced, is_stored_failure
from .identities import check_identity
from .params import WebChatParams
from .ratelimit import CallerQuota
from .tokens import GuestToken, GuestTokens, Session
from .upstream import is_ambiguous
from .validation import validate, validate_refresh

log = logging.getLogger("flexwebchat.webchat")

# Generic only in the typing stubs, so quoted.
CreateContext: TypeAlias = (
    "grpc.aio.ServicerContext[webchat_pb2.CreateWebChatRequest, webchat_pb2.CreateWebChatResponse]"
)
RefreshContext: TypeAlias = (
    "grpc.aio.ServicerContext[webchat_pb2.RefreshGuestTokenRequest, "
    "webchat_pb2.RefreshGuestTokenResponse]"
)


class WebChatServicer(webchat_pb2_grpc.WebChatServiceServicer):
    def __init__(
        self,
        flex: FlexClient,
        conversations: ConversationsClient,
        idempotency: IdempotencyStore,
        tokens: GuestTokens | None,
        settings: Settings,
        credentials: Credentials,
    ):
        self._flex = flex
        self._conversations = conversations
        self.idempotency = idempotency
        self._tokens = tokens
        self._settings = settings
        self._quota = CallerQuota(settings.max_pending_per_caller)
        self._find_or_create = FindOrCreate(
            flex, conversations, idempotency.backend, settings, credentials
        )
        self.executions = Executions()

    async def CreateWebChat(
        self, request: webchat_pb2.CreateWebChatRequest, context: CreateContext
    ) -> webchat_pb2.CreateWebChatResponse:
        rpc = obs.current_rpc()
        # First: a refused identity must not learn which other field is wrong, nor replay a
        # stored request_id (and mint a token for its identity).
        check_identity(self._settings.caller_identity_prefixes, rpc.caller, request.identity)
        params = validate(request)
        if request.issue_token:
            self._require_tokens()  # before anything is created
        deadline = self._deadline(context)
        give_back = self._quota.take(rpc.caller)  # until the work ends, even after the caller
        if request.request_id:
            rpc.request_id = request.request_id
            response, created_at = await self._create_once(request, params, deadline, give_back)
        else:
            response = await self._create_unkeyed(params, deadline, give_back)
            created_at = time.time()
        if request.issue_token:
            # Never stored: a replay gets a fresh token for the stored identity, in the session
            # that began when the conversation was created (a replay cannot extend it).
            session = Session(response.identity, response.conversation_sid, int(created_at))
            try:
                token = self._mint(session, via="create")
            except TokenRejected:
                raise SessionEnded() from None
            _set_token(response, token)
        return response

    async def RefreshGuestToken(
        self, request: webchat_pb2.RefreshGuestTokenRequest, context: RefreshContext
    ) -> webchat_pb2.RefreshGuestTokenResponse:
        presented = validate_refresh(request)
        tokens = self._require_tokens()
        try:
            verified = tokens.verify(presented, obs.current_rpc().caller)
            if verified.expired:
                await self._check_resumable(verified.session, self._deadline(context))
        except TokenRejected as exc:
            obs.child(obs.TOKEN_REFRESH_REFUSED, exc.reason).inc()
            raise
        except TokenWrongCaller:
            obs.child(obs.TOKEN_REFRESH_REFUSED, "TOKEN_WRONG_CALLER").inc()
            raise
        except ConversationClosed:
            obs.child(obs.TOKEN_REFRESH_REFUSED, "CONVERSATION_CLOSED").inc()
            raise
        token = self._mint(verified.session, via="resume" if verified.expired else "refresh")
        response = webchat_pb2.RefreshGuestTokenResponse(
            access_token=token.jwt, identity=token.identity
        )
        response.access_token_expires_at.CopyFrom(_timestamp(token.expires_at))
        response.session_expires_at.CopyFrom(_timestamp(token.session_expires_at))
        return response

    async def _check_resumable(self, session: Session, deadline: Deadline) -> None:
        """A guest coming back after its token expired: worth a token only while the agent has
        not closed the conversation. The only refresh that asks Twilio anything."""
        state = await self._conversations.conversation_state(
            session.identity, session.conversation_sid, deadline
        )
        if state == "closed":
            raise ConversationClosed()

    async def _create_once(
        self,
        request: webchat_pb2.CreateWebChatRequest,
        params: WebChatParams,
        deadline: Deadline,
        give_back: Callable[[], None],
    ) -> tuple[webchat_pb2.CreateWebChatResponse, float]:
        """At most one execution per request_id; later calls get the stored outcome, and when it
        was produced (the conversation's creation: 0 when the record does not say).

        The id is claimed (or its stored outcome found) in the RPC itself: that sends nothing, so
        a replay runs no task of its own. Only the execution, which may send, gets one."""

        key = record_key(request.request_id, obs.current_rpc().caller)

        async def work() -> bytes | Produced:
            try:
                if self._find_or_create.applies(params):
                    chat, fresh = await self._find_or_create.create(
                        key, params, deadline, reserve=self._reserve(params)
                    )
                    # A chat found from an earlier execution may have its first message already.
                    response = await self._respond(
                        chat, params, deadline, post_message=fresh, recorded=True
                    )
                    if chat.created_at is not None:  # found: its guest session began back then
                        created = min(chat.created_at, time.time())
                        return Produced(response.SerializeToString(), created)
                else:
                    # The caller gets one answer per id whatever we retry, so an ambiguous
                    # failure may be retried; see docs/idempotency.md.
                    response = await self._create(
                        params, deadline, retry_ambiguous=True, recorded=True
                    )
            except FacadeError as exc:
                if is_stored_failure(exc):
                    raise Outcome(to_status(exc).SerializeToString()) from exc
                raise
            return response.SerializeToString()

        try:
            record = await self.idempotency.claim(key, fingerprint(request), deadline)
        except BaseException:
            give_back()
            raise
        if record.done:
            give_back()
        else:
            claimed = record
            record = await self.executions.run(
                lambda: self.idempotency.execute(key, claimed, work),
                deadline,
                when_done=give_back,
            )
        if not record.ok:
            raise ReplayedError(status_pb2.Status.FromString(record.payload))
        response = webchat_pb2.CreateWebChatResponse.FromString(record.payload)
        obs.current_rpc().conversation_sid = response.conversation_sid
        return response, record.completed_at

    async def _create_unkeyed(
        self, params: WebChatParams, deadline: Deadline, give_back: Callable[[], None]
    ) -> webchat_pb2.CreateWebChatResponse:
        """Without a request_id nobody can tell a retry from a new chat: ambiguous failures are
        not retried (unless FLEX_RETRY_AMBIGUOUS), and not reported as retryable.

        The call waits for its turn at the rate limit in the RPC itself, with nothing sent and
        nothing held but its place in the queue (memory per waiting call); the work
        that sends, and must outlive its caller, gets a task once the turn has come."""
        try:
            await self._flex.wait_turn(deadline, reserve=self._reserve(params))
            if not deadline.remaining():  # a turn that came late (shared state slow): send nothing
                raise DeadlineExceeded("the deadline passed before Twilio answered")
        except BaseException:
            give_back()
            raise
        return await self.executions.run(
            lambda: self._send_unkeyed(params, deadline),
            deadline,
            after_caller_left=_orphaned,
            when_done=give_back,
        )

    async def _send_unkeyed(
        self, params: WebChatParams, deadline: Deadline
    ) -> webchat_pb2.CreateWebChatResponse:
        try:
            return await self._create(
                params, deadline, retry_ambiguous=False, recorded=False, admitted=True
            )
        except FacadeError as exc:
            if is_ambiguous(exc):
                raise MaybeProcessed(exc) from exc
            raise

    async def _create(
        self,
        params: WebChatParams,
        deadline: Deadline,
        *,
        retry_ambiguous: bool,
        recorded: bool,
        admitted: bool = False,
    ) -> webchat_pb2.CreateWebChatResponse:
        chat = await self._flex.create_web_chat(
            params,
            deadline,
            retry_ambiguous=retry_ambiguous,
            reserve=self._reserve(params),
            admitted=admitted,
        )
        return await self._respond(chat, params, deadline, post_message=True, recorded=recorded)

    def _reserve(self, params: WebChatParams) -> float:
        """A create followed by a first message starts only if both fit the deadline."""
        return self._conversations.message_need() if params.initial_message else 0.0

    async def _respond(
        self,
        chat: WebChat,
        params: WebChatParams,
        deadline: Deadline,
        *,
        post_message: bool,
        recorded: bool,
    ) -> webchat_pb2.CreateWebChatResponse:
        response = webchat_pb2.CreateWebChatResponse(
            conversation_sid=chat.conversation_sid, identity=chat.identity
        )
        if execution.current().abandoned:
            if not recorded:
                return response  # an orphan: no Flex task for a guest who will never come
            # Recorded as if the caller had waited: the message gets an attempt's time.
            deadline = Deadline.after(max(deadline.remaining(), self._settings.attempt_timeout))
        if params.initial_message and post_message:
            response.initial_message_sid = await self._post_first_message(
                chat.conversation_sid, chat.identity, params.initial_message, deadline
            )
        return response

    async def _post_first_message(
        self, conversation_sid: str, identity: str, body: str, deadline: Deadline
    ) -> str:
        """The message's SID, or "" when it could not be posted: the conversation exists and
        must reach its caller all the same."""
        try:
            sid = await self._conversations.post_message(conversation_sid, identity, body, deadline)
        except FacadeError as exc:
            obs.child(obs.INITIAL_MESSAGES, "failed").inc()
            log.warning(
                "the guest's first message could not be posted; the chat was created without it",
                extra={"fields": {"conversation_sid": conversation_sid, "error": str(exc)}},
            )
            return ""
        obs.child(obs.INITIAL_MESSAGES, "posted").inc()
        return sid

    def _require_tokens(self) -> GuestTokens:
        if self._tokens is None:
            raise TokensNotConfigured(self._settings.missing_for_tokens())
        return self._tokens

    def _mint(self, session: Session, *, via: str) -> GuestToken:
        token = self._require_tokens().mint(session, obs.current_rpc().caller)
        obs.child(obs.GUEST_TOKENS, via).inc()
        return token

    def _deadline(self, context: CreateContext | RefreshContext) -> Deadline:
        return Deadline.for_call(
            context.time_remaining(),
            default=self._settings.default_deadline,
            maximum=self._settings.max_deadline,
        )


def record_key(request_id: str, caller: str) -> str:
    """Where a request_id's record lives. With callers authenticated, each caller has its own
    space: another caller sending the same id and fields must not receive this one's conversation
    and identity. The id is a UUID (no "/"), so the key names caller and id unambiguously."""
    request_id = request_id.lower()
    return request_id if caller == ANONYMOUS else f"{caller}/{request_id}"


def fingerprint(request: webchat_pb2.CreateWebChatRequest) -> str:
    """A digest of the fields that shape the chat: a retry must repeat them exactly. request_id
    names the chat and issue_token only asks for a token, so neither is part of it."""
    fields = webchat_pb2.CreateWebChatRequest()
    fields.CopyFrom(request)
    fields.request_id = ""
    fields.issue_token = False
    return hashlib.sha256(fields.SerializeToString(deterministic=True)).hexdigest()


def _orphaned(response: webchat_pb2.CreateWebChatResponse) -> None:
    obs.ORPHANED_CONVERSATIONS.inc()
    log.warning(
        "Twilio created a conversation after its caller (without request_id) had left: nobody "
        "will use it; send a request_id, or a longer deadline, to avoid this",
        extra={"fields": {"conversation_sid": response.conversation_sid}},
    )


def _timestamp(unix_seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=unix_seconds)


def _set_token(response: webchat_pb2.CreateWebChatResponse, token: GuestToken) -> None:
    response.access_token = token.jwt
    response.access_token_expires_at.CopyFrom(_timestamp(token.expires_at))
    response.session_expires_at.CopyFrom(_timestamp(token.session_expires_at))
