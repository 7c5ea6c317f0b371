"""A validated CreateWebChat request, as the upstream calls take it: no gRPC, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WebChatParams:
    address_sid: str
    chat_friendly_name: str = ""
    customer_friendly_name: str = ""
    pre_engagement_data: str = ""
    identity: str = ""
    ui_version: str = ""
    # Not part of POST /v2/WebChats: posted afterwards as the guest's first message.
    initial_message: str = ""

    def form(self) -> dict[str, str]:
        """The WebChats form body, in twilio-python's field order, without empty fields."""
        fields = {
            "AddressSid": self.address_sid,
            "ChatFriendlyName": self.chat_friendly_name,
            "CustomerFriendlyName": self.customer_friendly_name,
            "PreEngagementData": self.pre_engagement_data,
            "Identity": self.identity,
        }
        return {name: value for name, value in fields.items() if value}
