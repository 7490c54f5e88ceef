"""Remove the chosen singular directions and fold their mean contribution into the bias.

For a layer ``y = W x + b`` whose removed directions sum to ``D = sum_k s_k u_k v_k^T`` (each
placed in its component's rows and columns), eigenpruning writes ``W' = W - D`` and
``b' = b + D mean(x)``: the removed part is *mean-ablated* (replaced by its average output over
the task's clean positions) rather than zeroed, as the reference code does. The result is baked
into the dense weights; ``D`` is kept as a low-rank ``Correction`` so the change can be inspected
or undone exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError
from ..layout import Layout, layout_of
from .components import Component, weight_2d
from .effects import Evidence


@dataclass
class Correction:
    """The removed part of one layer: ``left @ right`` (``(out, rank) @ (rank, in)``) and its bias shift."""

    left: Tensor
    right: Tensor
    bias_shift: Tensor
    created_bias: bool

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def delta(self) -> Tensor:
        return self.left @ self.right


def corrections(
    removed: dict[Component, Tensor], evidence: Evidence, modules: dict[str, nn.Module]
) -> dict[str, Correction]:
    """``module name -> Correction`` for every layer losing at least one direction (computed, not applied)."""
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for c, index in removed.items():
        if index.numel() == 0:
            continue
        spectrum = evidence.spectra[c]
        out, inp = weight_2d(modules[c.module_name]).shape
        left = torch.zeros(out, index.numel(), dtype=torch.float64)
        right = torch.zeros(index.numel(), inp, dtype=torch.float64)
        left[c.rows] = spectrum.u[:, index] * spectrum.s[index]
        right[:, c.cols] = spectrum.vh[index]
        parts.setdefault(c.module_name, []).append((left, right))
    result = {}
    for name, pieces in parts.items():
        left = torch.cat([p[0] for p in pieces], dim=1)
        right = torch.cat([p[1] for p in pieces], dim=0)
        shift = left @ (right @ evidence.mean_inputs[name])
        if not (torch.isfinite(left).all() and torch.isfinite(shift).all()):
            raise NonFiniteError(f"the removed part of {name} is not finite: check the model's weights")
        result[name] = Correction(left, right, shift, created_bias=modules[name].bias is None)
    return result


def _write(module: nn.Module, weight_delta: Tensor, bias: Tensor | None) -> None:
    delta = weight_delta.T if layout_of(module) is Layout.TRANSPOSED else weight_delta
    with torch.no_grad():
        module.weight.copy_((module.weight.double() + delta.to(module.weight.device)).to(module.weight.dtype))
    if bias is None:
        module.bias = None
    elif module.bias is None:
        module.bias = nn.Parameter(bias.to(module.weight.dtype).to(module.weight.device), module.weight.requires_grad)
    else:
        with torch.no_grad():
            module.bias.copy_(bias.to(module.bias.dtype))


def apply_corrections(fixes: dict[str, Correction], modules: dict[str, nn.Module], sign: int = -1) -> None:
    """Subtract (``sign=-1``: prune) or add back (``+1``: restore) each correction, all or nothing."""
    saved = {
        n: (modules[n].weight.detach().clone(), None if modules[n].bias is None else modules[n].bias.detach().clone())
        for n in fixes
    }
    try:
        for name, fix in fixes.items():
            module = modules[name]
            old = torch.zeros_like(fix.bias_shift) if module.bias is None else module.bias.detach().double().cpu()
            bias = None if (sign > 0 and fix.created_bias) else old - sign * fix.bias_shift
            _write(module, sign * fix.delta(), bias)
    except BaseException:
        for name, (weight, bias) in saved.items():
            with torch.no_grad():
                modules[name].weight.copy_(weight)
            if bias is None:
                modules[name].bias = None  # a bias this call created goes again
            else:
                with torch.no_grad():
                    modules[name].bias.copy_(bias)
        raise
