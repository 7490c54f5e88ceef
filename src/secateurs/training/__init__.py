"""Training helpers. The library drives *your* loop through ``Pruner.step()`` (schedules) and
``Pruner.regularize()`` (penalties: L1, network slimming, group lasso, L0 gates, sparse variational
dropout, movement scores); the minimal loop here exists for the CLI, the demo and the benchmarks only."""

from . import fbs, gates, group_lasso, movement  # noqa: F401  (registration)
from .callbacks import hf_trainer_callback, lightning_callback, reset_optimizer_state
from .fbs import FBSLasso
from .finetune import accuracy, train
from .gates import HardConcreteGate, L0Gates, SparseVariationalDropout, VariationalDropoutGate, gates_to_masks
from .group_lasso import GroupLasso, ZeroGroups, remove_zero_groups
from .movement import MovementScoreGate, MovementScores, SoftMovement
from .regularizers import L1, REGULARIZERS, BNScaleL1, RegularizationReport, Regularizer, register_regularizer

__all__ = [
    "BNScaleL1",
    "FBSLasso",
    "GroupLasso",
    "HardConcreteGate",
    "L0Gates",
    "L1",
    "MovementScoreGate",
    "MovementScores",
    "REGULARIZERS",
    "RegularizationReport",
    "Regularizer",
    "SoftMovement",
    "SparseVariationalDropout",
    "VariationalDropoutGate",
    "ZeroGroups",
    "accuracy",
    "gates_to_masks",
    "hf_trainer_callback",
    "lightning_callback",
    "register_regularizer",
    "remove_zero_groups",
    "reset_optimizer_state",
    "train",
]
