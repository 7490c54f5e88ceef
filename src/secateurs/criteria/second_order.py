"""Second-order criteria."""

from __future__ import annotations

from torch import Tensor

from ..evidence import Evidence, Need
from ..scope import Target
from .base import Criterion, grad3, register, weight3


@register
class OBD(Criterion):
    """Optimal Brain Damage (LeCun et al. 1990): the loss increase from zeroing w is
    about ``0.5 * H_ww * w^2``. The diagonal Hessian is approximated by the empirical
    diagonal Fisher, the mean of squared batch gradients (as in Theis et al. 2018,
    arXiv:1801.05787)."""

    name = "obd"
    needs = frozenset({Need.GRADIENTS})

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        return 0.5 * weight3(target).double().square() * grad3(evidence, target, "fisher")
