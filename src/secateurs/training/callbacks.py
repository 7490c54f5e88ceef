"""Drive a :class:`~secateurs.Pruner` from a framework's training loop.

A plain loop needs nothing: call ``pruner.step()`` after ``optimizer.step()``. For
Hugging Face ``Trainer``, :func:`hf_trainer_callback` returns a ``TrainerCallback``
that does the same. Lottery-ticket rewinding cannot rebuild the Trainer's
optimizer, so it clears the optimizer's state instead (fresh Adam moments,
as a new optimizer would have); the learning-rate schedule keeps running.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SecateursError


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget momentum / moment estimates, as after rebuilding the optimizer."""
    optimizer.state.clear()


def hf_trainer_callback(pruner: Any) -> Any:
    """A ``transformers.TrainerCallback`` that steps ``pruner`` after every optimizer step."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise SecateursError("hf_trainer_callback needs transformers: pip install 'secateurs[hf]'") from exc

    if getattr(pruner.config, "mode", None) == "remove":
        raise SecateursError(
            "the transformers Trainer builds its optimizer once, and mode='remove' replaces parameters with "
            "smaller tensors it would never see; train with mode='mask', then secateurs.bake(model) and "
            "prune(..., mode='remove') after training (or drive removal in your own loop)"
        )

    class SecateursPrunerCallback(TrainerCallback):
        def __init__(self) -> None:
            self.pruner = pruner
            self.events: list = []

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            event = self.pruner.step()
            if event.pruned or event.rewound:
                self.events.append(event)
            if event.rewound and optimizer is not None:
                reset_optimizer_state(optimizer)
            return control

    return SecateursPrunerCallback()
