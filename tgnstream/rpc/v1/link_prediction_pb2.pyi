from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pair(_message.Message):
    __slots__ = ("src", "dst")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ...) -> None: ...

class StateStamp(_message.Message):
    __slots__ = ("model_version", "events_applied", "watermark")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    events_applied: int
    watermark: float
    def __init__(self, model_version: _Optional[str] = ..., events_applied: _Optional[int] = ..., watermark: _Optional[float] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("pairs", "time")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[Pair]
    time: float
    def __init__(self, pairs: _Optional[_Iterable[_Union[Pair, _Mapping]]] = ..., time: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("probabilities", "src_unknown", "dst_unknown", "state")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SRC_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    DST_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    src_unknown: _containers.RepeatedScalarFieldContainer[bool]
    dst_unknown: _containers.RepeatedScalarFieldContainer[bool]
    state: StateStamp
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., src_unknown: _Optional[_Iterable[bool]] = ..., dst_unknown: _Optional[_Iterable[bool]] = ..., state: _Optional[_Union[StateStamp, _Mapping]] = ...) -> None: ...

class TopKRequest(_message.Message):
    __slots__ = ("src", "k", "candidates", "exclude_seen", "time", "strict")
    SRC_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    src: str
    k: int
    candidates: _containers.RepeatedScalarFieldContainer[str]
    exclude_seen: bool
    time: float
    strict: bool
    def __init__(self, src: _Optional[str] = ..., k: _Optional[int] = ..., candidates: _Optional[_Iterable[str]] = ..., exclude_seen: bool = ..., time: _Optional[float] = ..., strict: bool = ...) -> None: ...

class ScoredNode(_message.Message):
    __slots__ = ("id", "probability", "unknown")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    id: str
    probability: float
    unknown: bool
    def __init__(self, id: _Optional[str] = ..., probability: _Optional[float] = ..., unknown: bool = ...) -> None: ...

class TopKResponse(_message.Message):
    __slots__ = ("results", "src_unknown", "state")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SRC_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoredNode]
    src_unknown: bool
    state: StateStamp
    def __init__(self, results: _Optional[_Iterable[_Union[ScoredNode, _Mapping]]] = ..., src_unknown: bool = ..., state: _Optional[_Union[StateStamp, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("nodes", "time")
    NODES_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    time: float
    def __init__(self, nodes: _Optional[_Iterable[str]] = ..., time: _Optional[float] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("id", "values", "unknown")
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    unknown: bool
    def __init__(self, id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., unknown: bool = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dim", "state")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    state: StateStamp
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ..., state: _Optional[_Union[StateStamp, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "events_applied", "watermark", "num_nodes", "model", "embedding_dim", "device", "next_offsets")
    class NextOffsetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    events_applied: int
    watermark: float
    num_nodes: int
    model: str
    embedding_dim: int
    device: str
    next_offsets: _containers.ScalarMap[int, int]
    def __init__(self, model_version: _Optional[str] = ..., events_applied: _Optional[int] = ..., watermark: _Optional[float] = ..., num_nodes: _Optional[int] = ..., model: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., device: _Optional[str] = ..., next_offsets: _Optional[_Mapping[int, int]] = ...) -> None: ...
