"""Runners: how a pruning run walks the model. Their declared traits let a configuration refuse, up
front, a method a runner cannot feed.

- ``model`` (:mod:`secateurs.runners.model`): hooks over the calibration batches on the whole model;
  every need, every mode (removal included), every allocation.
- ``blocks`` (:mod:`secateurs.runners.blocks`): the layerwise LLM runner. Captures the inputs of the
  first repeated block, then for each block gathers its layers' statistics, prunes them, and
  recomputes the block's outputs with the pruned weights for the next block. Peak memory is one
  block plus the calibration activations. It has no loss, so it feeds only what forward hooks
  see (activations, Hessians), and it prunes one block at a time, so an allocation that ranks
  all layers together cannot apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from .criteria.base import MODES
from .errors import ConfigError, StateError, choices
from .evidence import HOOKED, Need
from .registry import Registry

#: runner name -> the function that carries it out (registered by secateurs.runners, which sits above
#: the configuration that reads the traits below)
_IMPLEMENTATIONS: dict[str, Callable[[Any, Any, Any], Any]] = {}


class Runner:
    """Base class: declared traits plus :meth:`run` (implemented in :mod:`secateurs.runners`)."""

    name: ClassVar[str]
    #: needs it can gather
    needs: ClassVar[frozenset[Need]] = frozenset(Need)
    #: application modes it can apply
    modes: ClassVar[tuple[str, ...]] = MODES
    #: sees every target's scores at once (False: one block at a time)
    sees_all_targets: ClassVar[bool] = True
    #: can prune in several rounds in one call (SynFlow's exponential schedule)
    multi_round: ClassVar[bool] = True

    def check(self, config: Any) -> None:
        """Refuse a configuration this runner cannot carry out, naming what it supports."""
        if config.mode_ not in self.modes:
            hint = (
                "; structural removal runs on the whole model: use runner='model'"
                if config.application_.structural
                else ""
            )
            raise ConfigError(
                f"runner {self.name!r} does not apply mode {config.mode_!r}; it supports {choices(self.modes)}{hint}"
            )
        missing = config.needs - self.needs
        if missing:
            raise ConfigError(
                f"runner {self.name!r} cannot gather {choices(n.value for n in missing)}, which "
                f"{config.describe_needs(missing)} needs; it gathers {choices(n.value for n in self.needs)}. "
                "Use runner='model' (hooks and a loss over the whole model)"
            )
        if not self.multi_round and config.rounds > 1:
            raise ConfigError(
                f"runner {self.name!r} prunes each block once; iterations={config.rounds} (rounds) need runner='model'"
            )
        if not self.sees_all_targets and config.allocation_.needs_single_group:
            raise ConfigError(
                f"allocation {config.allocation_.name!r} ranks every layer together, but runner {self.name!r} prunes "
                "one block at a time; use allocation 'uniform', 'erk', 'owl' or a {glob: sparsity} dict"
            )

    def run(self, model: Any, config: Any, data: Any) -> Any:
        """Carry out ``config`` on ``model`` (a user's runner overrides this)."""
        implementation = _IMPLEMENTATIONS.get(self.name)
        if implementation is None:
            raise StateError(f"runner {self.name!r} has no implementation loaded; import secateurs.runners")
        return implementation(model, config, data)


def implements(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the function that carries out the declared runner ``name``."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _IMPLEMENTATIONS[name] = fn
        return fn

    return register


RUNNERS: Registry[type[Runner]] = Registry("runner", base=Runner)


@RUNNERS.register
class ModelRunner(Runner):
    """Hooks over the calibration batches on the whole model; every need, mode and allocation."""

    name = "model"


@RUNNERS.register
class BlockRunner(Runner):
    """One repeated block at a time, with recomputed inputs (the layerwise LLM runner)."""

    name = "blocks"
    needs = HOOKED  # what hooks on the targets gather; passes over the whole model need the model runner
    modes = ("mask", "bake", "reconstruct")
    sees_all_targets = False
    multi_round = False
