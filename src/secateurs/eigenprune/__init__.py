"""Eigenpruning: remove the singular directions of chosen weight matrices that a task does not use.

Vergara-Browne, Soto, Aizawa 2024, "Eigenpruning: an interpretability-inspired PEFT method"
(arXiv:2404.03147). Each chosen matrix (per attention head for Q/K/V/O, whole for the MLP) is
decomposed by SVD; each singular direction is scored by attribution patching between clean and
corrupted prompts (``effects.py``); the lowest-scoring fraction of each kind is removed and its
mean contribution folded into the layer's bias (``fold.py``). Unlike compression, the goal is to
*improve* the model on the task: the paper reports Phi-2's integer multiplication going from
13.75% to 97.50%.

    report = eigenprune(model, prompts, answers, tokenizer=tokenizer)   # components=("k",), fraction=0.3
    report.restore(model)                                               # exactly undone
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import find_blocks
from ..errors import ConfigError, SecateursWarning, choices
from .components import KINDS, Component, ComponentError, find_components, module_map
from .effects import Evidence, gather_evidence
from .fold import Correction, apply_corrections, corrections
from .persist import BiasFlags, complete_biases, unsaved_biases
from .task import Prompt, TaskError, encode_task

__all__ = ["KINDS", "ComponentError", "EigenpruneReport", "TaskError", "eigenprune", "select_lowest"]

#: the reference code's defaults (tvergara/eigenpruning ``main.py``): key matrices, 30% removed
DEFAULT_COMPONENTS = ("k",)
DEFAULT_FRACTION = 0.3


@dataclass
class EigenpruneReport:
    """What was removed. ``corrections`` hold the removed low-rank parts, so ``restore`` is exact."""

    components: tuple[str, ...]
    fraction: float
    examples: int
    total: dict[str, int]  # singular values per kind
    removed: dict[str, int]  # removed per kind
    removed_by_layer: dict[str, int]  # module name -> directions removed
    created_biases: list[str]
    corrections: dict[str, Correction] = field(repr=False)
    bias_flags: BiasFlags = field(repr=False)  # config flags set so that save/load keeps new biases
    scores: dict[str, Tensor] = field(repr=False)  # component name -> score per singular value

    def restore(self, model: nn.Module) -> None:
        """Add the removed directions back and take the bias shift out: the model before the prune."""
        modules = {name: model.get_submodule(name) for name in self.corrections}
        apply_corrections(self.corrections, modules, sign=+1)
        self.bias_flags.undo(model)

    def summary(self) -> str:
        parts = [f"{k}: {self.removed[k]}/{self.total[k]}" for k in self.components]
        return f"eigenpruned {', '.join(parts)} singular values over {self.examples} examples"


def select_lowest(scores: dict[Component, Tensor], fraction: float) -> dict[Component, Tensor]:
    """Indices to remove: per kind, the ``floor(n * fraction)`` lowest scores over all its matrices.

    Ties go to the lower (block, head, index) first, so the choice is reproducible.
    """
    chosen: dict[Component, list[int]] = {c: [] for c in scores}
    for kind in {c.kind for c in scores}:
        entries = [(c, i) for c in scores if c.kind == kind for i in range(scores[c].numel())]
        flat = torch.cat([scores[c] for c in scores if c.kind == kind])
        k = int(len(entries) * fraction)
        order = torch.sort(flat, stable=True).indices[:k]
        for j in order.tolist():
            chosen[entries[j][0]].append(entries[j][1])
    return {c: torch.tensor(sorted(v), dtype=torch.long) for c, v in chosen.items()}


REDUCTIONS = ("max", "mean")


def _check(fraction: float, batch_size: int, reduction: str, model: nn.Module) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r}: must be one of {choices(REDUCTIONS)} (paper: 'max')")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"fraction={fraction!r}: the share of singular values removed per kind must be in [0, 1] (paper: 0.3)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"{type(model).__name__} has no parameters to eigenprune")


def _vocab_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise ComponentError(f"{type(model).__name__} has no config.vocab_size: pass a transformers causal LM")
    return int(size)


def eigenprune(
    model: nn.Module,
    prompts: Sequence[Prompt],
    answers: Sequence[str | int],
    *,
    corrupted: Sequence[Prompt] | None = None,
    tokenizer: Any = None,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    fraction: float = DEFAULT_FRACTION,
    blocks: str | None = None,
    batch_size: int = 16,
    reduction: str = "max",
) -> EigenpruneReport:
    """Eigenprune ``model`` in place for the task ``prompts -> answers`` and say what was removed.

    Args:
        prompts: text (with ``tokenizer``) or token ids; the answer is the token after the prompt.
        answers: one single-token answer per prompt (text or token id).
        corrupted: one corrupted prompt per clean prompt, of the same token length; None pairs each
            prompt with another of the same length (the reference code's batch roll).
        components: kinds among ``q k v o mlp_in mlp_out``; Q/K/V/O are decomposed per head.
        fraction: share of each kind's singular values removed (lowest attribution scores).
        blocks: the container of the transformer blocks, if discovery needs telling.
        reduction: how one direction's effects over examples and positions become its score:
            ``"max"`` (the paper's) or ``"mean"`` (an alternative, not from the paper).

    Returns:
        An ``EigenpruneReport``; ``report.restore(model)`` undoes the prune exactly.

    Raises:
        TaskError, ComponentError, ConfigError: bad input, refused before the model is touched.
    """
    _check(fraction, batch_size, reduction, model)
    kinds = (components,) if isinstance(components, str) else tuple(dict.fromkeys(components))  # "k" is one kind
    batches = encode_task(prompts, answers, corrupted, tokenizer, _vocab_size(model))
    found = find_components(model, kinds, blocks)
    modules = module_map(model, found)
    evidence: Evidence = gather_evidence(model, found, modules, batches, batch_size, reduction)
    removed = select_lowest({c: s.score for c, s in evidence.spectra.items()}, float(fraction))
    fixes = corrections(removed, evidence, modules)
    prefix, stack = find_blocks(model, blocks)  # before the weights change: a failure leaves them as they were
    apply_corrections(fixes, modules, sign=-1)
    try:
        flags = complete_biases(model, [n for n, f in fixes.items() if f.created_bias], prefix, len(stack))
    except BaseException:
        apply_corrections(fixes, modules, sign=1)
        raise
    created = [n for n, f in fixes.items() if f.created_bias]
    lost = unsaved_biases(model, created) if created and hasattr(model, "config") else []
    if lost:
        warnings.warn(
            f"eigenprune gave {', '.join(lost)} a bias that {type(model).__name__}.from_pretrained would not "
            "load back (its layers are built without one), so a saved copy would silently lose the mean "
            "ablation; use the model in memory, or report.restore(model) before saving",
            SecateursWarning,
            stacklevel=2,
        )
    return EigenpruneReport(
        components=kinds,
        fraction=float(fraction),
        examples=sum(len(b.answers) for b in batches),
        total={k: sum(s.s.numel() for c, s in evidence.spectra.items() if c.kind == k) for k in kinds},
        removed={k: sum(int(i.numel()) for c, i in removed.items() if c.kind == k) for k in kinds},
        removed_by_layer={n: f.rank for n, f in fixes.items()},
        created_biases=[n for n, f in fixes.items() if f.created_bias],
        corrections=fixes,
        bias_flags=flags,
        scores={c.name: s.score for c, s in evidence.spectra.items()},
    )
