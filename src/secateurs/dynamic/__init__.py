"""Dynamic pruning: sparsity that depends on the input, set at run time, and really skips compute.

- :func:`sparsify_activations` (TEAL, CATS): training-free activation sparsity for LLMs, calibrated
  once from activation distributions, with a target changed at run time (:meth:`ActivationSparsity.set_sparsity`)
  and a batch-1 CPU kernel that reads only the weight rows of non-zero inputs (:mod:`.kernel`);
- :func:`add_fbs` (Feature Boosting and Suppression): per-input channel gating for CNNs, trained in
  your loop, computing only the selected channels at inference.

See ``docs/dynamic.md``.
"""

from .activation import (
    ActivationSparsity,
    activation_sparsity,
    load_activation_sparsity,
    sparsify_activations,
)
from .fbs import FBS, FBSConv, add_fbs, load_fbs
from .kernel import kernel_notice, sparse_input_linear

__all__ = [
    "FBS",
    "FBSConv",
    "ActivationSparsity",
    "add_fbs",
    "activation_sparsity",
    "kernel_notice",
    "load_activation_sparsity",
    "load_fbs",
    "sparse_input_linear",
    "sparsify_activations",
]
