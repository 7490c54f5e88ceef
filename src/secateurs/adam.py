"""Adam's normalised step direction, for searches that move scores or probabilities by hand.

The Bernoulli search (``structural/bernoulli.py``, ``update='adam'``) and hard movement's Adam-trained
scores (``training/movement.py``, ``score_update='adam'``) step tensors that are not parameters of any
optimizer, so both keep Adam's moments themselves; this is the one place that does it.
"""

from __future__ import annotations

from torch import Tensor


def adam_direction(state: dict, grad: Tensor, eps: float, betas: tuple[float, float] = (0.9, 0.999)) -> Tensor:
    """``m_hat / (sqrt(v_hat) + eps)`` for ``grad``, after updating the moments kept in ``state`` (empty on the
    first call: ``m``, ``v`` and the step count ``t`` are added to it)."""
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = b1 * state["m"] + (1 - b1) * grad if "m" in state else (1 - b1) * grad
    v = state["v"] = b2 * state["v"] + (1 - b2) * grad**2 if "v" in state else (1 - b2) * grad**2
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
