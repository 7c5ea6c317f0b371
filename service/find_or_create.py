"""Find, don't re-create: one Twilio conversation per request_id, whatever fails.

Twilio's create has no idempotency key, so a create whose answer was lost (5xx, reset after
sending, read timeout, a replica that died, an outcome that could not be stored) may or may not
have happened. When the caller leaves ``identity`` to the facade, the facade chooses it,
deterministically: an HMAC of the request_id's record key keyed with the secret the facade sends
with (``service.credentials``), which no caller sees, so nobody can compute another caller's
identity and take it first. Then whether the create happened is a question Twilio can answer:
the guest's conversations in the Flex conversations service
(``GET /v1/Services/{IS}/Users/{identity}/Conversations``; 404 means no such guest yet).

* Found: that is the chat; it is recorded and answered. A request_id sent before a credential
  rotation is also looked up under the identity the previous secret gave it.
* Not found: re-sending is safe once no earlier request can still be in flight at Twilio. The
  facade gives up on an answer after the attempt timeout, but Twilio may go on working on the
  request; so it waits until twice the attempt timeout, plus the longest an attempt may wait
  for a connection slot and connect, has passed since the send, looks again, and only then
  re-sends. When the deadline cannot wait that long, the call fails UNAVAILABLE with a
  RetryInfo saying when a retry can settle it.

Just before each create request may leave, the id is marked in the records (``mark_sent``), so
that an execution that leaves no stored outcome makes the next one, on any replica, start by
looking and waiting for the earlier request to settle. The mark carries its sender's settle
window, which every reader waits (replicas may run different attempt timeouts during a rolling
change); a mark without one gets the reader's own. The mark's age is read on the records'
clock (Redis's with REDIS_URL, one for every replica), never compared with a replica's own wall
clock, which may be skewed against the others'. An id with neither a record nor a
mark is looked up too before its first create: records can be lost (Redis flushed, restarted
without persistence, evicted, failed over to a replica that missed the last writes), and a chat
found then is replayed without its first message, which the lost execution may have posted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import replace

from . import execution
from . import observability as obs
from .config import Settings
from .conversations import ConversationsClient
from .credentials import Credentials
from .deadline import Deadline
from .errors import FacadeError, UpstreamUnreachable
from .flex import FlexClient, WebChat
from .idempotency import RecordBackend
from .identities import FACADE_IDENTITY_PREFIX
from .params import WebChatParams
from .upstream import is_ambiguous, longest_wait_before_writing

log = logging.getLogger("flexwebchat.find_or_create")

SETTLE_TIMEOUTS = 2  # attempt timeouts after a send by which Twilio has settled it


class FindOrCreate:
    def __init__(
        self,
        flex: FlexClient,
        conversations: ConversationsClient,
        records: RecordBackend,
        settings: Settings,
        credentials: Credentials,
    ) -> None:
        self._flex = flex
        self._conversations = conversations
        self._records = records
        self._settings = settings
        self._credentials = credentials

    def applies(self, params: WebChatParams) -> bool:
        """Needs the conversations service to look in, and an identity of the facade's choosing
        (a caller's own identity may already be in other conversations)."""
        return bool(self._settings.conversations_service_sid) and not params.identity

    def identity(self, key: str) -> str:
        """The identity the facade chooses for ``key`` (current secret)."""
        return self.identities(key)[0]

    def identities(self, key: str) -> list[str]:
        """Under the current secret, then the previous ones (to find a pending request's chat)."""
        return [_identity(secret_key, key) for secret_key in self._credentials.identity_keys()]

    async def create(
        self, key: str, params: WebChatParams, deadline: Deadline, *, reserve: float = 0.0
    ) -> tuple[WebChat, bool]:
        """The chat for ``key``, and whether this execution created it (False: found)."""
        identities = self.identities(key)
        params = replace(params, identity=identities[0])
        earlier = await self._records.sent_ago(key)
        if earlier is not None:
            # The sender's window, not this replica's: their attempt timeouts may differ.
            settle = self.settle_seconds() if earlier.settle is None else earlier.settle
            found = await self._find(identities, deadline, earlier.ago, settle)
            if found is not None:
                return found, False
        else:
            found = await self._recover(identities, deadline)
            if found is not None:
                return found, False
        work = execution.current()

        async def note_sending() -> None:
            await self._records.mark_sent(
                key, self._settings.idempotency_ttl, self.settle_seconds()
            )

        last_error: FacadeError | None = None
        for _ in range(self._settings.max_attempts):
            work.before_send = note_sending
            try:
                chat = await self._flex.create_web_chat(
                    params, deadline, retry_ambiguous=False, reserve=reserve
                )
                return chat, True
            except FacadeError as exc:
                if not is_ambiguous(exc) or work.abandoned:
                    raise
                last_error = exc
            finally:
                work.before_send = None
            sent_ago = time.monotonic() - work.last_sent_at  # this process's own send
            found = await self._find([params.identity], deadline, sent_ago, self.settle_seconds())
            if found is not None:
                return found, True
        assert last_error is not None
        raise last_error

    def settle_seconds(self) -> float:
        """How long after this replica marks a create as sent Twilio may still create it. The
        mark is written before the attempt waits for a connection slot and connects, so the
        window also covers the longest those waits can take. Adding that bound, rather than
        marking again once a connection is in hand, costs no extra Redis write per create and no
        hook inside the transport; its price, a longer window, is paid only after an ambiguous
        failure."""
        return SETTLE_TIMEOUTS * self._settings.attempt_timeout + longest_wait_before_writing(
            self._settings
        )

    async def _recover(self, identities: list[str], deadline: Deadline) -> WebChat | None:
        """The chat of an id that has neither record nor sent mark. Their absence proves nothing
        (a flushed, evicted or restarted Redis, or a failover, leaves no trace), so Twilio is
        asked before a first create; a chat found means the id's record was lost."""
        chat = await self._look(identities, deadline)
        if chat is None:
            return None
        obs.child(obs.IDEMPOTENCY, "recovered_by_lookup").inc()
        log.warning(
            "a request_id without a record already has a conversation: its record was lost "
            "(Redis flushed, restarted without persistence, evicted or failed over); replayed it",
            extra={"fields": {"conversation_sid": chat.conversation_sid}},
        )
        return chat

    async def _find(
        self, identities: list[str], deadline: Deadline, sent_ago: float, window: float
    ) -> WebChat | None:
        """The chat of one of the guests, or None once no request sent ``sent_ago`` seconds ago,
        which could stay in flight ``window`` seconds, can still create it."""
        chat = await self._look(identities, deadline)
        if chat is None:
            settle = window - sent_ago
            if settle > 0:
                if settle >= deadline.remaining():
                    failure = UpstreamUnreachable(
                        "an earlier request for this request_id may still be in flight at "
                        "Twilio; retry with the same request_id once it has settled",
                        maybe_processed=True,
                    )
                    failure.retry_after = settle
                    raise failure
                await asyncio.sleep(settle)
                chat = await self._look(identities, deadline)
        return chat

    async def _look(self, identities: list[str], deadline: Deadline) -> WebChat | None:
        for identity in identities:
            chat = await self._conversations.find_conversation(identity, deadline)
            if chat is not None:
                return chat
        return None


def _identity(secret_key: bytes, key: str) -> str:
    digest = hmac.new(secret_key, key.encode(), hashlib.sha256).digest()
    # The prefix no caller may choose in (CALLER_IDENTITY_PREFIXES): nobody can take it first.
    return FACADE_IDENTITY_PREFIX + str(uuid.UUID(bytes=digest[:16], version=4))
