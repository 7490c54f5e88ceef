"""Structural pruning: remove channels, neurons, heads, hidden dimensions and blocks for real.

``secateurs.prune(model, method, sparsity, mode="remove", pattern=...)`` is the front door;
this package also exposes the pieces: the :class:`DependencyGraph`, handler registration
for your own module types, saving and loading pruned models, and two LLM shortcuts.
See ``docs/structural.md``.
"""

from __future__ import annotations

from .api import prune_heads_and_neurons, remove_layers
from .attention import PrunedMultiheadAttention
from .graph import DependencyGraph, Group
from .handlers import Handler, register_handler, register_handler_by_name
from .options import Granularity, StructuralOptions
from .pipeline import remove
from .plan import PruningPlan, load_pruned, plan_of, save_pruned
from .report import StructuralReport
from .step import Step

__all__ = [
    "DependencyGraph",
    "Granularity",
    "Group",
    "Handler",
    "PrunedMultiheadAttention",
    "PruningPlan",
    "Step",
    "StructuralOptions",
    "StructuralReport",
    "load_pruned",
    "plan_of",
    "prune_heads_and_neurons",
    "register_handler",
    "register_handler_by_name",
    "remove",
    "remove_layers",
    "save_pruned",
]
