"""The criterion contract: scores in, nothing else touched.

A criterion turns :class:`~secateurs.evidence.Evidence` into one importance tensor per target,
in the canonical ``(out, spatial, in)`` layout. Higher means keep. Class attributes declare what
it needs, which application modes it supports, and the preset it is usually run with (the
paper's defaults), so ``prune(model, method="snip")`` does what the paper did.
"""

from __future__ import annotations

from abc import ABC
from typing import ClassVar

from torch import Tensor

from ..errors import ConfigError, DataRequiredError
from ..evidence import Evidence, Need
from ..layout import Layout, to_canonical
from ..registry import Registry
from ..scope import Target

#: application modes of the pipeline (the map's four)
MODES = ("mask", "bake", "reconstruct", "remove")

CRITERIA: Registry[type[Criterion]] = Registry("method")


class Criterion(ABC):
    """Base class. Override :meth:`score` (per target) or :meth:`scores` (all at once)."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[Need]] = frozenset()
    #: how element scores combine into a block's or channel's score
    reduction: ClassVar[str] = "sum"
    #: scores are signed first-order loss contributions, one slice per calibration batch
    #: (shape ``(batches, O, S, I)``): a unit scores the batch mean of |sum of its elements|
    signed: ClassVar[bool] = False
    #: patterns this criterion is defined for (None: all)
    patterns: ClassVar[tuple[str, ...] | None] = None
    #: application modes it supports; ``remove`` ranks coupled channels through its group form
    modes: ClassVar[tuple[str, ...]] = MODES
    #: granularities it can rank in ``mode='remove'``
    granularities: ClassVar[tuple[str, ...]] = ("channel", "head", "hidden")
    #: the paper's defaults, used when the user does not say otherwise
    default_allocation: ClassVar[str] = "uniform"
    default_comparison: ClassVar[str] = "layer"
    default_iterations: ClassVar[int] = 1
    default_mode: ClassVar[str | None] = None  # None: the front door's default ('mask', or 'bake' for LLMs)
    default_solver: ClassVar[str | None] = None  # for modes that take a solver (reconstruct, remove)
    default_pattern: ClassVar[str | None] = None  # for mode='remove' (None: 'channel')
    #: in ``reconstruct`` mode the solver picks the mask itself as it updates the weights, re-scoring
    #: them with this criterion (SparseGPT's adaptive mask selection) instead of fixing it up front
    adaptive: ClassVar[bool] = False
    #: can it score Embedding tables?
    scores_embeddings: ClassVar[bool] = True
    #: its scores are accumulated during training (a Pruner with a regularizer), so a one-shot prune refuses it
    from_training: ClassVar[bool] = False
    #: every scheduled step chooses its masks afresh from all the weights, so a pruned weight whose score
    #: has risen comes back (movement pruning's top-v of scores that keep training); otherwise masks only grow
    reselects: ClassVar[bool] = False

    def scores(self, evidence: Evidence) -> dict[str, Tensor]:
        """Importance per target name, canonical ``(O, S, I)`` layout."""
        return {t.name: self.score(t, evidence) for t in evidence.targets}

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or scores()")

    def validate(self, targets: list[Target]) -> None:
        """Refuse targets this criterion cannot score, before anything runs."""
        if not self.scores_embeddings:
            for t in targets:
                if t.layout is Layout.EMBEDDING:
                    raise ConfigError(
                        f"criterion {self.name!r} needs float inputs, but {t.module_name!r} is an "
                        "Embedding; exclude it from the scope or use magnitude"
                    )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def weight3(target: Target) -> Tensor:
    """The effective weight, detached, as ``(O, S, I)`` in float32 or wider."""
    w = target.weight.detach()
    return to_canonical(w if w.is_floating_point() and w.element_size() >= 4 else w.float(), target.layout)


def grad3(evidence: Evidence, target: Target, attribute: str) -> Tensor:
    """A gradient statistic of ``target`` as ``(O, S, I)``."""
    stats = evidence.gradients.get(target.name)
    if stats is None:
        raise DataRequiredError(f"no gradients were gathered for {target.name}")
    return to_canonical(getattr(stats, attribute), target.layout)


CRITERIA.base = Criterion


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name`` (``prune(model, name, ...)``)."""
    return CRITERIA.register(cls)


def registry() -> dict[str, type[Criterion]]:
    return dict(CRITERIA.items())
