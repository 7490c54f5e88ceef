"""Attribution patching of singular values (eigenpruning's score, arXiv:2404.03147).

For a component ``M = sum_k s_k u_k v_k^T`` fed ``x`` (clean) or ``x'`` (corrupted), patching the
corrupted input through singular direction ``k`` alone changes the layer's output by
``s_k u_k (v_k . (x' - x))``. Attribution patching (Nanda 2023; Syed et al. 2023,
arXiv:2310.10348) estimates the resulting change of the task loss to first order with the clean
run's gradient ``g = dL/dy``:

    effect_k = s_k (g . u_k) (v_k . (x' - x))    per example and token position,

i.e. the gradient with respect to the direction's activation ``h_k = v_k . x`` times its change
from clean to corrupted (attribution patching applied to each singular direction). The score of ``k`` is the largest
effect over every example and position (the reference code's ``amax`` over batch and tokens); the
lowest scores are removed. ``reduction="mean"`` (not the paper's) averages instead: the expected
first-order change of the loss, lowest when corrupting the direction would *help* the task.
The loss is the cross-entropy of the answer at the last position.

Nothing is mutated: gradients are taken with ``torch.autograd.grad`` with respect to zero tensors
added to each layer's output, so no ``.grad`` is written and frozen weights work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NonFiniteError
from .components import Component, decompose, weight_2d
from .task import TaskBatch


@dataclass
class Spectrum:
    """One component's SVD and its score per singular value."""

    u: Tensor  # (rows, r) float64
    s: Tensor  # (r,)
    vh: Tensor  # (r, cols)
    score: Tensor  # (r,) float64, -inf until a batch is seen
    total: Tensor  # (r,) float64, summed effect (for reduction="mean")


@dataclass
class Evidence:
    """Everything the fold needs: each component's spectrum and each layer's mean input."""

    spectra: dict[Component, Spectrum]
    mean_inputs: dict[str, Tensor]  # module name -> (in,) float64, over every clean position


class _Recorder:
    """Forward hooks that keep each layer's input and make its output differentiable by a probe."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[str, Tensor] = {}
        self.probes: dict[str, Tensor] = {}
        self.probe = False

    def hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            self.inputs[name] = args[0].detach()
            if not self.probe:
                return None
            zero = torch.zeros_like(output, requires_grad=True)
            self.probes[name] = zero
            return output + zero

        return record

    @contextmanager
    def attached(self) -> Iterator[_Recorder]:
        handles = [m.register_forward_hook(self.hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0])[:, -1, :]


def gather_evidence(
    model: nn.Module,
    components: list[Component],
    modules: dict[str, nn.Module],
    batches: list[TaskBatch],
    batch_size: int,
    reduction: str = "max",
) -> Evidence:
    """SVD every component, then score each singular value over every task example."""
    spectra = {}
    for c in components:
        u, s, vh = decompose(weight_2d(modules[c.module_name])[c.rows, c.cols])
        spectra[c] = Spectrum(u, s, vh, torch.full_like(s, -torch.inf), torch.zeros_like(s))
    sums = {n: torch.zeros(weight_2d(m).shape[1], dtype=torch.float64) for n, m in modules.items()}
    count = 0
    recorder = _Recorder(modules)
    was_training = model.training
    model.eval()  # dropout would make clean and corrupted runs differ by noise
    try:
        with recorder.attached():
            for batch in batches:
                for start in range(0, len(batch.answers), batch_size):
                    part = slice(start, start + batch_size)
                    _score_chunk(
                        model, recorder, spectra, batch.clean[part], batch.corrupted[part], batch.answers[part], sums
                    )
                    count += batch.clean[part].numel()
    finally:
        model.train(was_training)
    if reduction == "mean":
        for spectrum in spectra.values():
            spectrum.score = spectrum.total / count
    return Evidence(spectra, {n: s / count for n, s in sums.items()})


def _score_chunk(
    model: nn.Module,
    recorder: _Recorder,
    spectra: dict[Component, Spectrum],
    clean: Tensor,
    corrupted: Tensor,
    answers: Tensor,
    sums: dict[str, Tensor],
) -> None:
    device = next(model.parameters()).device
    recorder.probe = False
    with torch.no_grad():
        _logits(model, corrupted.to(device))
    dirty = dict(recorder.inputs)
    recorder.probe = True
    with torch.enable_grad():
        logits = _logits(model, clean.to(device))
        # summed, not averaged: each example's gradient is its own, whatever the batch size
        loss = F.cross_entropy(logits.float(), answers.to(device), reduction="sum")
        names = list(recorder.probes)
        grads = dict(zip(names, torch.autograd.grad(loss, [recorder.probes[n] for n in names]), strict=True))
    recorder.probe = False
    recorder.probes.clear()
    for name in sums:
        sums[name] += recorder.inputs[name].double().sum(dim=(0, 1)).cpu()
    for c, spectrum in spectra.items():
        g = grads[c.module_name].double().cpu()[..., c.rows]
        delta = (dirty[c.module_name] - recorder.inputs[c.module_name]).double().cpu()[..., c.cols]
        effect = (g @ spectrum.u) * (delta @ spectrum.vh.T) * spectrum.s  # (n, length, r)
        if not torch.isfinite(effect).all():
            raise NonFiniteError(
                f"the attribution-patching effect of {c.name} is not finite: check the model's weights"
            )
        spectrum.score = torch.maximum(spectrum.score, effect.amax(dim=(0, 1)))
        spectrum.total += effect.sum(dim=(0, 1))
