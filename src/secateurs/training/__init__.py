"""Training helpers. The library drives *your* loop through ``Pruner.step()``; the minimal
loop here exists for the CLI, the demo and the benchmarks only."""

from .callbacks import hf_trainer_callback, reset_optimizer_state
from .finetune import accuracy, train

__all__ = ["accuracy", "hf_trainer_callback", "reset_optimizer_state", "train"]
