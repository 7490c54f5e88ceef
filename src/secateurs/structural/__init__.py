"""Structural pruning: remove channels, neurons, heads, hidden dimensions and blocks for real.

``secateurs.prune(model, method, sparsity, mode="remove", pattern=...)`` is the front door;
this package also exposes the pieces: the :class:`DependencyGraph`, handler registration
for your own module types, and saving and loading structurally pruned models.
See ``docs/structural.md``.
"""

from __future__ import annotations

from . import attention, bernoulli, hf, hf_attention, hf_fused, hf_moe, hf_t5, recurrent, subspace, vision  # noqa: F401  (handlers register eagerly, at import)
from .attention import PrunedMultiheadAttention
from .criteria import FLAP, FPGM, GROUP_FORMS, BNScale, GroupCriterion, ShortGPT, as_group_criterion
from .graph import DependencyGraph, Group
from .handlers import HANDLERS, Handler, register_handler, register_handler_by_name
from .plan import PruningPlan, load_structured, plan_of, save_structured
from .removal import remove
from .report import StructuralReport
from .step import Step

__all__ = [
    "BNScale",
    "DependencyGraph",
    "FLAP",
    "FPGM",
    "GROUP_FORMS",
    "Group",
    "GroupCriterion",
    "HANDLERS",
    "Handler",
    "PrunedMultiheadAttention",
    "PruningPlan",
    "ShortGPT",
    "Step",
    "StructuralReport",
    "as_group_criterion",
    "load_structured",
    "plan_of",
    "register_handler",
    "register_handler_by_name",
    "remove",
    "save_structured",
]
