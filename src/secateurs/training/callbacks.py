"""Drive a :class:`~secateurs.Pruner` from a framework's training loop.

A plain loop needs nothing: call ``pruner.regularize()`` between ``loss.backward()`` and
``optimizer.step()`` (when the Pruner has a regularizer) and ``pruner.step()`` after
``optimizer.step()``. For Hugging Face ``Trainer``, :func:`hf_trainer_callback` returns a
``TrainerCallback`` that does the same; for PyTorch Lightning, :func:`lightning_callback` returns a
``Callback`` (``pip install 'secateurs[lightning]'``). Lottery-ticket rewinding cannot rebuild the
framework's optimizer, so it clears the optimizer's state instead (fresh Adam moments, as a new
optimizer would have); the learning-rate schedule keeps running.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SecateursError


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget momentum / moment estimates, as after rebuilding the optimizer."""
    optimizer.state.clear()


def _refuse_removal(pruner: Any, framework: str) -> None:
    if getattr(pruner.config, "mode", None) == "remove":
        raise SecateursError(
            f"the {framework} builds its optimizer once, and mode='remove' replaces parameters with "
            "smaller tensors it would never see; train with mode='mask', then secateurs.bake(model) and "
            "prune(..., mode='remove') after training (after a regularizer: secateurs.bake(model), then "
            "secateurs.training.remove_zero_groups(model, example_inputs)), or drive removal in your own loop"
        )


class _Driver:
    """What both callbacks do: regularize before the optimizer step, step the pruner after it."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner
        self.events: list = []
        self.penalties: list[float] = []

    def before_optimizer_step(self) -> None:
        if self.pruner.config.regularizer_ is not None:
            self.penalties.append(self.pruner.regularize())

    def after_optimizer_step(self, optimizer: Any) -> None:
        event = self.pruner.step()
        if event.pruned or event.rewound:
            self.events.append(event)
        if event.rewound and optimizer is not None:
            reset_optimizer_state(optimizer)


def hf_trainer_callback(pruner: Any) -> Any:
    """A ``transformers.TrainerCallback`` that regularizes before and steps ``pruner`` after every optimizer step."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise SecateursError("hf_trainer_callback needs transformers: pip install 'secateurs[hf]'") from exc
    _refuse_removal(pruner, "transformers Trainer")

    class SecateursPrunerCallback(TrainerCallback, _Driver):
        def __init__(self) -> None:
            _Driver.__init__(self, pruner)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.before_optimizer_step()
            return control

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.after_optimizer_step(optimizer)
            return control

    return SecateursPrunerCallback()


def _lightning_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as exc:
            raise SecateursError(
                "lightning_callback needs PyTorch Lightning: pip install 'secateurs[lightning]'"
            ) from exc
    return Callback


def lightning_callback(pruner: Any) -> Any:
    """A PyTorch Lightning ``Callback``: ``pruner.regularize()`` in ``on_before_optimizer_step`` and
    ``pruner.step()`` once per optimizer step (gradient accumulation counted once)."""
    base = _lightning_base()
    _refuse_removal(pruner, "Lightning Trainer")

    class SecateursLightningCallback(base, _Driver):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            _Driver.__init__(self, pruner)
            self._seen_step = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before_optimizer_step()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != self._seen_step and trainer.global_step > 0:
                self._seen_step = trainer.global_step
                optimizers = trainer.optimizers
                self.after_optimizer_step(optimizers[0] if optimizers else None)

    return SecateursLightningCallback()
