from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_INT64: DType
DTYPE_FLOAT64: DType
DTYPE_INT8: DType

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class MicrobatchMeta(_message.Message):
    __slots__ = ("step", "microbatch", "route", "hop", "sender_stage", "sender_peer", "attempt", "grad_norm", "eval", "route_peers", "prev_microbatch", "snapshot")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    SENDER_STAGE_FIELD_NUMBER: _ClassVar[int]
    SENDER_PEER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_PEERS_FIELD_NUMBER: _ClassVar[int]
    PREV_MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    step: int
    microbatch: int
    route: _containers.RepeatedScalarFieldContainer[int]
    hop: int
    sender_stage: int
    sender_peer: str
    attempt: int
    grad_norm: float
    eval: bool
    route_peers: _containers.RepeatedScalarFieldContainer[str]
    prev_microbatch: _containers.RepeatedScalarFieldContainer[int]
    snapshot: bool
    def __init__(self, step: _Optional[int] = ..., microbatch: _Optional[int] = ..., route: _Optional[_Iterable[int]] = ..., hop: _Optional[int] = ..., sender_stage: _Optional[int] = ..., sender_peer: _Optional[str] = ..., attempt: _Optional[int] = ..., grad_norm: _Optional[float] = ..., eval: _Optional[bool] = ..., route_peers: _Optional[_Iterable[str]] = ..., prev_microbatch: _Optional[_Iterable[int]] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("meta", "header", "data")
    META_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    meta: MicrobatchMeta
    header: TensorHeader
    data: bytes
    def __init__(self, meta: _Optional[_Union[MicrobatchMeta, _Mapping]] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("ok", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReplicaShare(_message.Message):
    __slots__ = ("peer_id", "microbatches")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    microbatches: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, peer_id: _Optional[str] = ..., microbatches: _Optional[_Iterable[int]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("step", "attempt", "stage", "epoch", "shares")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    step: int
    attempt: int
    stage: int
    epoch: int
    shares: _containers.RepeatedCompositeFieldContainer[ReplicaShare]
    def __init__(self, step: _Optional[int] = ..., attempt: _Optional[int] = ..., stage: _Optional[int] = ..., epoch: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[ReplicaShare, _Mapping]]] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("stage", "grad_norm_sq", "microbatches")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    stage: int
    grad_norm_sq: float
    microbatches: int
    def __init__(self, stage: _Optional[int] = ..., grad_norm_sq: _Optional[float] = ..., microbatches: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("step", "attempt", "global_grad_norm", "clip_coef", "stage", "epoch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEF_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    attempt: int
    global_grad_norm: float
    clip_coef: float
    stage: int
    epoch: int
    def __init__(self, step: _Optional[int] = ..., attempt: _Optional[int] = ..., global_grad_norm: _Optional[float] = ..., clip_coef: _Optional[float] = ..., stage: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("stage", "committed_step")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    stage: int
    committed_step: int
    def __init__(self, stage: _Optional[int] = ..., committed_step: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("step", "attempt", "reason", "stage", "epoch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    attempt: int
    reason: str
    stage: int
    epoch: int
    def __init__(self, step: _Optional[int] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ..., stage: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("sender_stage", "sender_peer", "committed_step", "refresh")
    SENDER_STAGE_FIELD_NUMBER: _ClassVar[int]
    SENDER_PEER_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    sender_stage: int
    sender_peer: str
    committed_step: int
    refresh: bool
    def __init__(self, sender_stage: _Optional[int] = ..., sender_peer: _Optional[str] = ..., committed_step: _Optional[int] = ..., refresh: _Optional[bool] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("stage", "peer_id", "state", "committed_step")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    stage: int
    peer_id: str
    state: str
    committed_step: int
    def __init__(self, stage: _Optional[int] = ..., peer_id: _Optional[str] = ..., state: _Optional[str] = ..., committed_step: _Optional[int] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("requester_stage", "requester_peer", "step", "full_state", "parked", "replica", "snapshot")
    REQUESTER_STAGE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_PEER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FULL_STATE_FIELD_NUMBER: _ClassVar[int]
    PARKED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    requester_stage: int
    requester_peer: str
    step: int
    full_state: bool
    parked: bool
    replica: bool
    snapshot: bool
    def __init__(self, requester_stage: _Optional[int] = ..., requester_peer: _Optional[str] = ..., step: _Optional[int] = ..., full_state: _Optional[bool] = ..., parked: _Optional[bool] = ..., replica: _Optional[bool] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("swarm",)
    SWARM_FIELD_NUMBER: _ClassVar[int]
    swarm: bool
    def __init__(self, swarm: _Optional[bool] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage", "peer_id", "state", "committed_step", "last_grad_norm", "rejected_messages", "pid", "checkpoint_steps", "swarm", "records")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    REJECTED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEPS_FIELD_NUMBER: _ClassVar[int]
    SWARM_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    peer_id: str
    state: str
    committed_step: int
    last_grad_norm: float
    rejected_messages: int
    pid: int
    checkpoint_steps: _containers.RepeatedScalarFieldContainer[int]
    swarm: str
    records: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stage: _Optional[int] = ..., peer_id: _Optional[str] = ..., state: _Optional[str] = ..., committed_step: _Optional[int] = ..., last_grad_norm: _Optional[float] = ..., rejected_messages: _Optional[int] = ..., pid: _Optional[int] = ..., checkpoint_steps: _Optional[_Iterable[int]] = ..., swarm: _Optional[str] = ..., records: _Optional[_Iterable[str]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("step", "attempt", "sender_peer", "stage", "epoch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SENDER_PEER_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    attempt: int
    sender_peer: str
    stage: int
    epoch: int
    def __init__(self, step: _Optional[int] = ..., attempt: _Optional[int] = ..., sender_peer: _Optional[str] = ..., stage: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class RollbackReply(_message.Message):
    __slots__ = ("stage", "committed_step")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    stage: int
    committed_step: int
    def __init__(self, stage: _Optional[int] = ..., committed_step: _Optional[int] = ...) -> None: ...
