"""Operations: rollout status, history and diff (and, later, overrides, rollback, audit)."""

from configbus.ops.history import Change, HistoryEntry, StreamHistory, diff, stream_history
from configbus.ops.rollout import InstanceStatus, RolloutReport, rollout_status

__all__ = [
    "Change",
    "HistoryEntry",
    "InstanceStatus",
    "RolloutReport",
    "StreamHistory",
    "diff",
    "rollout_status",
    "stream_history",
]
