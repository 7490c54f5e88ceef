"""The front door: ``prune()`` for one call, ``Pruner`` for training loops. Both are thin: they build
one :class:`~secateurs.PruneConfig` and hand it to the runner it names."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .analysis.measured import measure_profile, measures
from .batches import LossFn
from .collapse import refuse_collapse_of
from .config import PruneConfig
from .errors import ConfigError, SecateursWarning, StateError
from .guards import outside_inference_mode
from .masking import all_or_nothing, masked_targets
from .masking import bake as bake_all
from .pipeline import Data, check
from .report import Report
from .runners import Pruning, run
from .scope import Target, resolve
from .structural.iterative import ScheduledRemoval
from .structural.report import StructuralReport

#: keywords of prune() and Pruner() that are not PruneConfig fields (what to run on, how to run)
_CALL_KEYWORDS = ("calibration", "loss_fn", "example_inputs", "progress", "allow_collapse")


@outside_inference_mode
def prune(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | None = None,
    *,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
    progress: bool = True,
    allow_collapse: bool = False,
    **options: Any,
) -> Report | StructuralReport:
    """Prune ``model`` in place and return a :class:`Report` of what changed.

    ``options`` are the other :class:`PruneConfig` fields (``pattern``, ``allocation``, ``scope``,
    ``mode``, ``solver``, ``runner``, ``overrides``, ``iterations`` ...), so a recipe maps one-to-one:
    ``prune(model, **load_recipe("recipe.yaml"), calibration=loader)``. Every check runs before the
    model is touched; if anything fails, the model is left exactly as it was. ``mode='reconstruct'``
    updates the surviving weights with a solver (``prune(model, 'sparsegpt', 0.5, calibration=...)``
    works on any model with Linear / Conv layers); ``mode='remove'`` removes whole channels, heads,
    hidden dimensions or blocks for real and returns a :class:`StructuralReport`;
    ``runner='blocks'`` prunes one repeated block at a time (the layerwise LLM runner).

    Args:
        calibration: iterable of batches for data-needing methods (see ``secateurs.batches``).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for gradient criteria with unusual batches.
        example_inputs: one input batch, used for MACs in the report and by SynFlow for its shape;
            default: the first sample of the first calibration batch.
        progress: show progress bars for work longer than a second.
        allow_collapse: accept a layer left with no weight, or no path of weights from input to
            output (refused by default with :class:`~secateurs.LayerCollapseError`, model unchanged).
    """
    PruneConfig.check_keywords(options, "prune()", _CALL_KEYWORDS)
    config = PruneConfig(method=method, sparsity=sparsity, **options)
    data = Data.from_user(config, calibration, loss_fn, example_inputs, progress, allow_collapse)
    config = measure_profile(model, config, data)  # allocation='sensitivity' without a profile: measure it now
    return run(model, config, data)


@dataclass
class StepEvent:
    """What :meth:`Pruner.step` did. After ``rewound`` or ``reshaped`` (mode='remove': the
    parameters are new, smaller tensors), rebuild your optimizer and LR schedule."""

    step: int
    pruned: bool = False
    sparsity: float | None = None
    rewound: bool = False
    reshaped: bool = False


_PARAMETRIZED = re.compile(r"\.?parametrizations\.([^.]+)\.original$")


def _plain_name(name: str) -> str:
    """``fc.parametrizations.weight.original`` -> ``fc.weight`` (stable across masking)."""
    return _PARAMETRIZED.sub(r".\1", name).lstrip(".")


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by mask-independent names, masks excluded."""
    state = {_plain_name(n): p.detach().clone() for n, p in model.named_parameters()}
    for n, b in model.named_buffers():
        if ".parametrizations." not in n:
            state[n] = b.detach().clone()
    return state


class Pruner:
    """Prunes on a schedule inside your training loop::

        pruner = Pruner(model, "magnitude", 0.9, allocation="global",
                        schedule={"kind": "cubic", "start": 0, "end": 2000, "every": 100})
        for batch in loader:
            loss = ...; loss.backward()
            pruner.regularize()          # training-time penalties (regularizer='bn_l1' ...), if any
            optimizer.step()
            event = pruner.step()
            if event.rewound:            # lottery tickets: start training afresh
                optimizer = make_optimizer(model)
        pruner.finalize()                # bake the zeros (mode='bake') or keep the masks

    Masks are parametrizations, so pruned weights get zero gradient and stay zero
    whatever the optimizer does. With ``mode='remove'`` (and ``example_inputs``) every
    scheduled step removes channels or heads for real; ``event.reshaped`` then says the
    parameters are new tensors, so rebuild the optimizer.

    ``allocation='sensitivity'`` without a profile measures one here, at construction, on the model as it
    is (dense, before any step); ``pruner.config.allocation_.profile`` holds it. To rebuild a Pruner that
    resumes from :meth:`state_dict`, pass that profile (``allocation_options={'profile': ...}``), not the
    trained model's new measurement.
    """

    @outside_inference_mode
    def __init__(
        self,
        model: nn.Module,
        method: str = "magnitude",
        sparsity: float | None = None,
        *,
        calibration: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        example_inputs: Any = None,
        progress: bool = False,
        allow_collapse: bool = False,
        **options: Any,
    ) -> None:
        PruneConfig.check_keywords(options, "Pruner()", _CALL_KEYWORDS)
        self.model = model
        self.config = PruneConfig(method=method, sparsity=sparsity, **options)
        if self.config.runner_.name != "model":
            raise ConfigError(
                f"Pruner prunes the whole model between training steps; runner={self.config.runner!r} is for one-shot "
                "pruning with prune() / prune_llm()"
            )
        self.data = Data.from_user(self.config, calibration, loss_fn, example_inputs, progress, allow_collapse)
        # allocation='sensitivity' without a profile: measured once, here, on the model as it is before training
        # and pruning (every step's share of the final allocation comes from it); self.config then holds it
        masked = masked_targets(model) if measures(self.config) else []
        if masked:  # a checkpoint of a scheduled run, being resumed
            raise ConfigError(
                "allocation 'sensitivity' without a profile: a Pruner measures one at construction on the dense "
                f"model, but {masked[0].name!r} already carries a mask (a checkpoint of a scheduled "
                "run?); to resume, pass the profile that run measured (allocation_options={'profile': "
                "state['config']['allocation_options']['profile']}), or measure one with "
                "secateurs.analysis.sensitivity(model, ...) and pass it"
            )
        self.config = measure_profile(model, self.config, self.data)
        self._removal: ScheduledRemoval | None = None
        self._pruning: Pruning | None = None
        self.targets: list[Target] = []
        if self.config.application_.structural:
            self._removal = ScheduledRemoval(model, self.config, self.data)
        else:
            self._pruning = Pruning(model, self.config, self.data)
            self.targets = self._pruning.targets
        # no sparsity at all: the Pruner only drives its regularizer (learned gates, group lasso ...)
        self._prunes = not (self.config.sparsity_ is None and self.config.final_sparsity == 0.0)
        regularizer = self.config.regularizer_
        if self._prunes and regularizer is not None and regularizer.replaces_modules:
            raise ConfigError(
                f"regularizer {regularizer.name!r} replaces modules of the model when it is bound, so this Pruner "
                "cannot also prune; build one Pruner for the regularizer (no sparsity) and prune afterwards"
            )
        self._bind_regularizer()
        self.step_count = 0
        self.current_sparsity = 0.0
        schedule = self.config.schedule_
        self._rewind_state: dict[str, Tensor] | None = None
        if schedule.rewind_step == 0:
            self._rewind_state = _trainable_state(model)

    def regularize(self) -> float:
        """Call between ``loss.backward()`` and ``optimizer.step()``: adds the regularizer's (sub)gradient to
        ``.grad`` and returns the penalty's value (to log, not to backpropagate). A penalty whose value or
        gradient is not finite raises :class:`~secateurs.errors.NonFiniteError` naming the tensor and the
        step, before any gradient is written (skip ``optimizer.step()``: nothing is corrupted)."""
        return self._regularizer().penalize()

    def regularization_report(self, tolerance: float = 1e-3) -> Any:
        """How many groups the regularizer penalises are at or near zero now (to log during training)."""
        return self._regularizer().report(tolerance)

    def _regularizer(self) -> Any:
        if self.config.regularizer_ is None:
            raise StateError(
                "this Pruner has no regularizer; build it with regularizer='l1', 'bn_l1', 'group_lasso', 'l0', "
                "'sparse_vd' or 'movement' (or your own)"
            )
        return self.config.regularizer_

    @outside_inference_mode
    def step(self) -> StepEvent:
        """Call once after every optimizer step."""
        if self.config.regularizer_ is not None:
            self.config.regularizer_.proximal()
            self.config.regularizer_.advance()
        t = self.step_count
        schedule = self.config.schedule_
        event = StepEvent(step=t)
        if schedule.rewind_step is not None and t + 1 == schedule.rewind_step and self._rewind_state is None:
            self._rewind_state = _trainable_state(self.model)
        target = schedule.sparsity_at(t, self.config.final_sparsity) if self._prunes else None
        if target is not None:
            event.reshaped = self.prune_to(target)
            event.pruned, event.sparsity = True, target
            if self._rewind_state is not None:
                self._rewind()
                event.rewound = True
        self.step_count += 1
        return event

    def _bind_regularizer(self) -> None:
        """Point the regularizer at the weights in scope as they are now (removal has no mask targets:
        its scope's weights, re-resolved after every reshaping step)."""
        if self.config.regularizer_ is not None:
            targets = resolve(self.model, self.config.scope_) if self._removal is not None else self.targets
            self.config.regularizer_.bind(self.model, targets, self.data.example_inputs)

    @outside_inference_mode
    def prune_to(self, sparsity: float) -> bool:
        """Prune now to ``sparsity`` overall (what :meth:`step` calls on schedule). Returns whether
        parameters were replaced by smaller tensors (``mode='remove'``): rebuild the optimizer then."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if self._removal is not None:
            removed = self._removal.remove_to(sparsity) is not None
            self.current_sparsity = sparsity
            if removed:  # the regularizer held the replaced tensors: bind the new ones
                self._bind_regularizer()
            return removed
        assert self._pruning is not None
        check(self._pruning.plans, self.config, self.data)
        if self.current_sparsity == 0.0 or sparsity < self.current_sparsity:
            # masks from before this Pruner, or a request below its last one: a schedule never goes down,
            # and a step whose rounded-up predecessor already reached it is a harmless no-op
            self._pruning.refuse_lower(sparsity)
        with all_or_nothing(self.targets, self.config.application_.writes_weights):
            self._pruning.prune_to(sparsity, round_=self.step_count)
            if not self.data.allow_collapse:  # refused inside the block: the previous masks come back
                refuse_collapse_of(self.model, self.targets, self.data.example_inputs)
        self.current_sparsity = sparsity
        return False

    def _rewind(self) -> None:
        """Put every parameter and buffer back to the snapshot; masks stay."""
        state = self._rewind_state or {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(state[_plain_name(name)])
            for name, b in self.model.named_buffers():
                if name in state:
                    b.copy_(state[name])

    def report(self, example_inputs: Any = None) -> Report | StructuralReport | None:
        """The masks' report; in remove mode, the last removal's (None before the first)."""
        if self._removal is not None:
            return self._removal.reports[-1] if self._removal.reports else None
        assert self._pruning is not None
        return self._pruning.report(example_inputs if example_inputs is not None else self.data.example_inputs)

    @outside_inference_mode
    def finalize(self, bake: bool | None = None, *, to_final: bool = False) -> nn.Module:
        """End of training: bake the zeros into the weights (default when mode='bake').

        Before the schedule has reached its final sparsity, ``to_final=True`` prunes to it now;
        otherwise the model keeps the sparsity reached so far, with a :class:`SecateursWarning`."""
        final = self.config.final_sparsity
        if self.current_sparsity < final - 1e-9:
            if to_final:
                self.prune_to(final)
            else:
                warnings.warn(
                    f"Pruner.finalize() at step {self.step_count}, before the schedule ends (its last pruning step "
                    f"is {self.config.schedule_.last_step}): the model keeps sparsity {self.current_sparsity:.2%}, "
                    f"not the final {final:.2%}. Train until the schedule ends, or call finalize(to_final=True) to "
                    "prune to the final sparsity now",
                    SecateursWarning,
                    stacklevel=2,
                )
        if bake if bake is not None else self.config.mode_ == "bake":
            bake_all(self.model)
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Progress of the schedule (masks live in the model's own state_dict)."""
        return {
            "step_count": self.step_count,
            "current_sparsity": self.current_sparsity,
            "config": self.config.to_dict(),
            "rewind_state": self._rewind_state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved, mine = state.get("config") or {}, self.config.to_dict()
        if saved != mine:
            differing = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            profiles = [(c.get("allocation_options") or {}).get("profile") for c in (saved, mine)]
            if profiles[0] is not None and profiles[0] != profiles[1]:
                raise StateError(  # the saved config holds a whole profile: point at it, do not print it
                    f"this pruner state was saved with another configuration ({', '.join(differing)} differ), "
                    "including another sensitivity profile (a Pruner measures one at construction); rebuild the "
                    "Pruner with the saved configuration: state['config'], whose allocation_options hold that profile"
                )
            raise StateError(
                f"this pruner state was saved with a different configuration ({', '.join(differing)} differ); "
                f"build the Pruner with the saved config: {saved}"
            )
        self.step_count = int(state["step_count"])
        self.current_sparsity = float(state["current_sparsity"])
        if self._removal is not None:  # what is gone is what the schedule reached
            self._removal.removed = self.current_sparsity
        self._rewind_state = state.get("rewind_state")
