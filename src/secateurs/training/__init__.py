"""Training helpers. The library drives *your* loop through ``Pruner.step()`` (schedules) and
``Pruner.regularize()`` (penalties); the minimal loop here exists for the CLI, the demo and the
benchmarks only."""

from .callbacks import hf_trainer_callback, reset_optimizer_state
from .finetune import accuracy, train
from .regularizers import L1, REGULARIZERS, BNScaleL1, Regularizer, register_regularizer

__all__ = [
    "BNScaleL1",
    "L1",
    "REGULARIZERS",
    "Regularizer",
    "accuracy",
    "hf_trainer_callback",
    "register_regularizer",
    "reset_optimizer_state",
    "train",
]
