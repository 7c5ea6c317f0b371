from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CreateWebChatRequest(_message.Message):
    __slots__ = ("address_sid", "chat_friendly_name", "customer_friendly_name", "pre_engagement_data", "ui_version", "identity", "request_id")
    ADDRESS_SID_FIELD_NUMBER: _ClassVar[int]
    CHAT_FRIENDLY_NAME_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FRIENDLY_NAME_FIELD_NUMBER: _ClassVar[int]
    PRE_ENGAGEMENT_DATA_FIELD_NUMBER: _ClassVar[int]
    UI_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    address_sid: str
    chat_friendly_name: str
    customer_friendly_name: str
    pre_engagement_data: str
    ui_version: str
    identity: str
    request_id: str
    def __init__(self, address_sid: _Optional[str] = ..., chat_friendly_name: _Optional[str] = ..., customer_friendly_name: _Optional[str] = ..., pre_engagement_data: _Optional[str] = ..., ui_version: _Optional[str] = ..., identity: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateWebChatResponse(_message.Message):
    __slots__ = ("conversation_sid", "identity")
    CONVERSATION_SID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    conversation_sid: str
    identity: str
    def __init__(self, conversation_sid: _Optional[str] = ..., identity: _Optional[str] = ...) -> None: ...
