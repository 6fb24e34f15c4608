"""The checkpoint strategy (``--recovery checkpoint``): durable per-stage checkpoints and rollback targets."""

from node.checkpoint.restore import restore_runtime
from node.checkpoint.store import CheckpointError, CheckpointInfo, CheckpointStore, rollback_target
from node.checkpoint.writer import BackgroundWriter

__all__ = [
    "BackgroundWriter",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStore",
    "restore_runtime",
    "rollback_target",
]
