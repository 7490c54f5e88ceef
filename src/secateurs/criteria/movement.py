"""Movement pruning's criterion (Sanh, Wolf & Rush 2020, arXiv:2005.07683): keep the weights that move
away from zero during fine-tuning.

Hard movement pruning scores each weight by ``S = -sum_t dL/dW'_t * W_t`` accumulated over the
training steps, ``W' = W * M`` being the masked weight the layer computes with (the paper's eq. 6
with a plain SGD step on the scores: the straight-through estimator passes ``dL/dW'`` to every score,
pruned weights' included; the score grows when the weight and its update point the same way, i.e.
the weight moves away from zero), then keeps the top-v of the scores at each step of a cubic
schedule, chosen afresh every time (``reselects``): a pruned weight whose score rises comes back.
The scores are accumulated between ``loss.backward()`` and ``optimizer.step()`` by the ``'movement'``
regularizer (:mod:`secateurs.training.movement`), which writes them to the store here; this
criterion reads them. A criterion never runs the training loop itself.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import DataRequiredError
from ..evidence import Evidence
from ..layout import to_canonical
from ..scope import Target
from .base import Criterion, register

#: accumulated movement scores, by the trained tensor they belong to (dropped with it)
_SCORES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def accumulate(parameter: Tensor, increment: Tensor) -> None:
    """Add ``increment`` (same shape) to ``parameter``'s movement score."""
    score = _SCORES.get(parameter)
    if score is None or score.shape != parameter.shape:
        score = torch.zeros(parameter.shape, dtype=torch.float32, device=parameter.device)
        _SCORES[parameter] = score
    score.add_(increment.to(score.dtype))


def movement_scores(parameter: Tensor) -> Tensor | None:
    """The movement score accumulated for ``parameter`` so far (stored shape), or None."""
    return _SCORES.get(parameter)


def reset_scores(parameter: Tensor) -> None:
    _SCORES.pop(parameter, None)


@register
class Movement(Criterion):
    """Hard movement pruning: ``S = -sum_t W * dL/dW`` accumulated during fine-tuning, top-k kept.
    Train with ``regularizer='movement'`` (which accumulates ``S``) on a cubic schedule, as the paper."""

    name = "movement"
    default_allocation = "uniform"
    from_training = True
    reselects = True  # the paper's top-v of the current scores at every step: pruned weights can come back

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        score = movement_scores(target.parameter)
        if score is None:
            raise DataRequiredError(
                f"method 'movement' ranks weights by how they moved during fine-tuning, and {target.name} has no "
                "accumulated score: build the Pruner with regularizer='movement' and call pruner.regularize() "
                "between loss.backward() and optimizer.step()"
            )
        return to_canonical(score.double(), target.layout)
