"""A guest's whole flow through the facade, as docs/clients.md shows it for Python callers.

    python create_webchat.py HOST:PORT ADDRESS_SID
    python create_webchat.py HOST:PORT --resume ACCESS_TOKEN

Creates a chat with a request_id, a guest access token and the guest's first message, then
refreshes the token, on one channel with the shipped service config. With --resume, brings a
guest back with its expired token, or says that the agent has ended the chat. Needs only the client
package (``pip install ./generated``: flexwebchat-client). Prints both replies as JSON and exits
0, or prints the status code and its google.rpc details and exits 1.
"""

from __future__ import annotations

import json
import sys
import uuid
from importlib import resources
from typing import Any

import grpc
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# retryPolicy (UNAVAILABLE, RESOURCE_EXHAUSTED) and round_robin, shipped with the stubs.
SERVICE_CONFIG = resources.files("flexwebchat.v1").joinpath("service_config.json").read_text()
DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure,
)


def connect(target: str) -> grpc.Channel:
    """A channel whose calls gRPC itself retries, waiting as long as the facade's RetryInfo asks
    (it arrives as ``grpc-retry-pushback-ms``). Use ``dns:///NAME:PORT`` with a headless Service
    so that round_robin spreads calls over every replica."""
    return grpc.insecure_channel(
        target,
        options=[("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)],
    )


def create_webchat(
    channel: grpc.Channel, address_sid: str, request_id: str, first_message: str = ""
) -> webchat_pb2.CreateWebChatResponse:
    """One chat with a guest access token and, when given, the guest's first message.
    ``request_id`` is made once per chat and reused by every retry of it: that is what makes any
    retry (gRPC's own, or yours) return the same conversation."""
    stub = webchat_pb2_grpc.WebChatServiceStub(channel)
    request = webchat_pb2.CreateWebChatRequest(
        address_sid=address_sid,
        request_id=request_id,
        issue_token=True,
        initial_message=first_message,
    )
    return stub.CreateWebChat(request, timeout=10)  # always set a deadline (seconds)


def refresh_guest_token(
    channel: grpc.Channel, access_token: str
) -> webchat_pb2.RefreshGuestTokenResponse:
    """A fresh token for the guest's conversation, before the old one expires (the browser's
    ``tokenAboutToExpire``). No Twilio call: it needs no request_id."""
    stub = webchat_pb2_grpc.WebChatServiceStub(channel)
    request = webchat_pb2.RefreshGuestTokenRequest(access_token=access_token)
    return stub.RefreshGuestToken(request, timeout=10)


def resume_guest_token(
    channel: grpc.Channel, expired_token: str
) -> webchat_pb2.RefreshGuestTokenResponse | None:
    """The guest came back after its token expired (a closed laptop, a page reload): the same
    RefreshGuestToken, with the expired token, from the caller that created the chat. None when
    the agent has ended the chat (CONVERSATION_CLOSED): offer the guest a new chat."""
    try:
        return refresh_guest_token(channel, expired_token)
    except grpc.RpcError as error:
        if error_details(error).get("ErrorInfo", {}).get("reason") == "CONVERSATION_CLOSED":
            return None
        raise


def error_details(error: grpc.RpcError) -> dict[str, Any]:
    """The status code and each google.rpc detail of a failed call, by type name."""
    described: dict[str, Any] = {"code": error.code().name}  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:  # a status from gRPC itself (e.g. the deadline): no details
        described["message"] = error.details()  # type: ignore[attr-defined]
        return described
    described["message"] = status.message
    for packed in status.details:
        for kind in DETAIL_TYPES:
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                described[kind.DESCRIPTOR.name] = json_format.MessageToDict(detail)
    return described


def should_retry(described: dict[str, Any]) -> bool:
    """Retry (later, with the same request_id) only when the facade says when: RetryInfo.
    RESOURCE_EXHAUSTED without one (an oversized message) fails the same way every time."""
    return "RetryInfo" in described


def main(argv: list[str]) -> int:
    target = argv[1]
    replies: dict[str, Any] = {}
    with connect(target) as channel:
        try:
            if argv[2] == "--resume":
                resumed = resume_guest_token(channel, argv[3])
                replies = {"resumed": resumed} if resumed else {"chat_ended": True}
            else:
                created = create_webchat(
                    channel, argv[2], str(uuid.uuid4()), first_message="Hello, I need help"
                )
                # An empty initial_message_sid: the chat exists, but the first message was not
                # posted.
                refreshed = refresh_guest_token(channel, created.access_token)
                replies = {"created": created, "refreshed": refreshed}
        except grpc.RpcError as error:
            described = error_details(error)
            print(json.dumps({**described, "retryable": should_retry(described)}, indent=2))
            return 1
    print(
        json.dumps(
            {
                name: reply
                if isinstance(reply, bool)
                else json_format.MessageToDict(reply, preserving_proto_field_name=True)
                for name, reply in replies.items()
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
