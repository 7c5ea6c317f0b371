import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateWebChatRequest(_message.Message):
    __slots__ = ("address_sid", "chat_friendly_name", "customer_friendly_name", "pre_engagement_data", "ui_version", "identity", "request_id", "issue_token", "initial_message")
    ADDRESS_SID_FIELD_NUMBER: _ClassVar[int]
    CHAT_FRIENDLY_NAME_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FRIENDLY_NAME_FIELD_NUMBER: _ClassVar[int]
    PRE_ENGAGEMENT_DATA_FIELD_NUMBER: _ClassVar[int]
    UI_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INITIAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    address_sid: str
    chat_friendly_name: str
    customer_friendly_name: str
    pre_engagement_data: str
    ui_version: str
    identity: str
    request_id: str
    issue_token: bool
    initial_message: str
    def __init__(self, address_sid: _Optional[str] = ..., chat_friendly_name: _Optional[str] = ..., customer_friendly_name: _Optional[str] = ..., pre_engagement_data: _Optional[str] = ..., ui_version: _Optional[str] = ..., identity: _Optional[str] = ..., request_id: _Optional[str] = ..., issue_token: _Optional[bool] = ..., initial_message: _Optional[str] = ...) -> None: ...

class CreateWebChatResponse(_message.Message):
    __slots__ = ("conversation_sid", "identity", "access_token", "access_token_expires_at", "initial_message_sid", "session_expires_at")
    CONVERSATION_SID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_MESSAGE_SID_FIELD_NUMBER: _ClassVar[int]
    SESSION_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    conversation_sid: str
    identity: str
    access_token: str
    access_token_expires_at: _timestamp_pb2.Timestamp
    initial_message_sid: str
    session_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, conversation_sid: _Optional[str] = ..., identity: _Optional[str] = ..., access_token: _Optional[str] = ..., access_token_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., initial_message_sid: _Optional[str] = ..., session_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RefreshGuestTokenRequest(_message.Message):
    __slots__ = ("access_token",)
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    def __init__(self, access_token: _Optional[str] = ...) -> None: ...

class RefreshGuestTokenResponse(_message.Message):
    __slots__ = ("access_token", "access_token_expires_at", "identity", "session_expires_at")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SESSION_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    access_token_expires_at: _timestamp_pb2.Timestamp
    identity: str
    session_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, access_token: _Optional[str] = ..., access_token_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., identity: _Optional[str] = ..., session_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
