from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("src", "dst", "ts", "features", "label")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    ts: float
    features: _containers.RepeatedScalarFieldContainer[float]
    label: int
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., ts: _Optional[float] = ..., features: _Optional[_Iterable[float]] = ..., label: _Optional[int] = ...) -> None: ...
