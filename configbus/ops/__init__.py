"""Operations: rollout status (and, later, overrides, rollback, history and audit)."""

from configbus.ops.rollout import InstanceStatus, RolloutReport, rollout_status

__all__ = ["InstanceStatus", "RolloutReport", "rollout_status"]
