"""Layer collapse: a pruned layer with no weight left, or no path of weights from input to output.

The network then computes a constant whatever its input (Tanaka et al. 2020, arXiv:2006.05467,
on global magnitude pruning at high sparsity). It is refused, before the model changes, unless
the caller says it is intended (``allow_collapse=True``, CLI ``--allow-collapse``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import LayerCollapseError
from .evaluation import is_connected
from .scope import Target

_WAYS_OUT = (
    "lower the sparsity, use allocation='uniform', 'erk' or 'lamp' (every layer keeps weights), exclude the "
    "layer from the scope, or pass allow_collapse=True (CLI: --allow-collapse) if this is intended"
)


def collapsed_targets(targets: Sequence[Target]) -> list[str]:
    """Targets whose effective weight (masked or baked) has no nonzero entry."""
    return [t.name for t in targets if not bool(t.weight.detach().any())]


def refuse_collapse(collapsed: Sequence[str], connected: bool | None, restored: bool = True) -> None:
    """Raise :class:`LayerCollapseError` for fully pruned layers or a cut input-output path.
    ``restored=False``: the caller cannot put the weights back (``rollback=False``), so the message says so."""
    unchanged = "the model is unchanged" if restored else "rollback=False, so the model keeps the pruned weights"
    if collapsed:
        shown = ", ".join(repr(n) for n in collapsed[:5]) + (
            f" and {len(collapsed) - 5} more" if len(collapsed) > 5 else ""
        )
        raise LayerCollapseError(
            f"pruning would remove every weight of {shown} (layer collapse: the model would output a constant); "
            f"{unchanged}. To fix it, {_WAYS_OUT}"
        )
    if connected is False:
        raise LayerCollapseError(
            "pruning would leave no path of surviving weights from the input to the output (the model would "
            f"output a constant); {unchanged}. To fix it, {_WAYS_OUT}"
        )


def refuse_collapse_of(model: nn.Module, targets: Sequence[Target], example_inputs: Any) -> None:
    """The check on a model as it is now; connectivity needs ``example_inputs`` (float tensors)."""
    collapsed = collapsed_targets(targets)
    connected = is_connected(model, example_inputs) if not collapsed and example_inputs is not None else None
    refuse_collapse(collapsed, connected)
