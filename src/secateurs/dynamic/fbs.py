"""Feature Boosting and Suppression (FBS; Gao et al. 2019, arXiv:1810.05331): per-input channel gating.

Each gated convolution gets a small saliency predictor (section 3.2): the input's channels are
subsampled to their mean magnitude, a fully connected layer and a ReLU predict one saliency per output
channel, and a winner-take-all keeps the ``k = ceil(density * C)`` largest (the others are exactly 0).
The kept channels of the convolution (with its BatchNorm) are multiplied by their saliency, which
boosts them. Training adds the lasso ``lambda * sum |g(x)|`` of the saliencies to the loss
(:meth:`FBS.penalty`), so predicted saliencies become sparse and informative. Driven by a
``Pruner(regularizer='fbs')`` instead, each gate adds the lasso's gradient to the saliencies during
the loss's own ``backward()`` (:attr:`FBSConv.lasso`): the penalty sits on activations, which only
the backward pass through them reaches, so this is how a plain loop, the Trainer callback and the
Lightning callback all train it without touching the loss.

At inference on one sample, only the selected output channels are computed, and only from the input
channels that are not zero (those the previous gate suppressed): the convolution runs on the slices
``weight[out_kept][:, in_nonzero]``, so the MACs saved are real work not done. The conv's weights and
BatchNorm are the user's own Parameters and buffers, so the saved model is a plain ``state_dict``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, StateError
from ..io import atomic_path
from ..loading import check_state_fits, read_safetensors
from ..spec import is_number

_KEY = "secateurs.fbs"


class _LassoGradient(torch.autograd.Function):
    """Identity forward; backward adds ``d(strength * sum|s| / batch) / ds`` to the incoming gradient,
    exactly what adding the lasso to the loss would send back through ``s``."""

    @staticmethod
    def forward(ctx, s: Tensor, strength: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(s)
        ctx.strength = strength
        return s.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (s,) = ctx.saved_tensors
        return grad + (ctx.strength / s.shape[0]) * torch.sign(s), None


class FBSConv(nn.Module):
    """A ``Conv2d`` (+ its ``BatchNorm2d``) whose output channels are gated per input by a saliency predictor."""

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d | None, density: float) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm
        self.density = density
        self.saliency = nn.Linear(conv.in_channels, conv.out_channels)
        nn.init.zeros_(self.saliency.weight)  # starts at saliency 1 everywhere: the dense layer, then learns
        nn.init.ones_(self.saliency.bias)
        self.saliency.to(conv.weight.device)
        self.train(conv.training)
        self.last_saliency: Tensor | None = None
        self.lasso = 0.0  # > 0: the lasso's gradient is added in backward (set by the 'fbs' regularizer)
        self.computed = 0  # MACs of the convolution actually computed (eval, counted per sample)
        self.full = 0  # MACs the dense convolution would have computed

    def __getstate__(self) -> dict:
        """Copies and pickles leave the last batch's saliencies behind (a non-leaf tensor of a graph)."""
        state = self.__dict__.copy()
        state["last_saliency"] = None
        return state

    @property
    def kept(self) -> int:
        return max(1, math.ceil(self.density * self.conv.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        s = F.relu(self.saliency(x.abs().mean((2, 3))))  # FBS eq. 6: g(x) = relu(W ss(x) + b)
        if self.lasso > 0 and self.training and s.requires_grad:
            s = _LassoGradient.apply(s, self.lasso)
        self.last_saliency = s
        top = s.topk(self.kept, dim=1)  # winner-take-all (eq. 7)
        gate = torch.zeros_like(s).scatter(1, top.indices, top.values)
        if not self.training and x.shape[0] == 1 and not torch.is_grad_enabled():
            return self._selected(x, top.indices[0], top.values[0])
        y = self.conv(x)
        if self.norm is not None:
            y = self.norm(y)
        if not self.training:
            self._count(x, y, int(x.shape[1]), self.kept, x.shape[0])
        return y * gate[:, :, None, None]

    def _selected(self, x: Tensor, out_idx: Tensor, values: Tensor) -> Tensor:
        """One sample: compute only the kept output channels, from the input channels that are not zero."""
        conv = self.conv
        in_idx = (x[0].abs().amax((1, 2)) > 0).nonzero().squeeze(1)
        weight = conv.weight.index_select(0, out_idx).index_select(1, in_idx)
        bias = None if conv.bias is None else conv.bias.index_select(0, out_idx)
        y = F.conv2d(x.index_select(1, in_idx), weight, bias, conv.stride, conv.padding, conv.dilation)
        if self.norm is not None:
            norm = self.norm
            scale = (norm.weight.index_select(0, out_idx) if norm.weight is not None else 1) / torch.sqrt(
                norm.running_var.index_select(0, out_idx) + norm.eps
            )
            shift = (
                norm.bias.index_select(0, out_idx) if norm.bias is not None else 0
            ) - norm.running_mean.index_select(0, out_idx) * scale
            y = y * scale[None, :, None, None] + shift[None, :, None, None]
        out = y.new_zeros(1, conv.out_channels, *y.shape[2:])
        out.index_copy_(1, out_idx, y * values[None, :, None, None])
        self._count(x, y, int(in_idx.numel()), int(out_idx.numel()), 1)
        return out

    def _count(self, x: Tensor, y: Tensor, n_in: int, n_out: int, samples: int) -> None:
        kh, kw = self.conv.kernel_size
        positions = int(y.shape[2] * y.shape[3])
        self.computed += samples * n_in * n_out * kh * kw * positions
        self.full += samples * self.conv.in_channels * self.conv.out_channels * kh * kw * positions

    def extra_repr(self) -> str:
        return f"density={self.density}, kept={self.kept}/{self.conv.out_channels}"


@dataclass
class FBSMacs:
    """Convolution MACs per sample over the gated layers: dense, computed, and the predictors' overhead."""

    dense: float
    computed: float
    predictors: float

    @property
    def reduction(self) -> float:
        """How many times fewer MACs the gated layers cost, predictors included."""
        return self.dense / (self.computed + self.predictors)


class FBS:
    """The gated convolutions of a model, and what training and reporting need from them."""

    def __init__(self, model: nn.Module, layers: dict[str, FBSConv], skip_first: bool = True) -> None:
        self.model, self.layers, self.skip_first = model, layers, skip_first

    def penalty(self, strength: float = 1e-8) -> Tensor:
        """FBS's lasso on the last forward's saliencies, ``strength * sum |g(x)|`` averaged over the batch:
        add it to the loss before ``backward()``."""
        missing = [n for n, layer in self.layers.items() if layer.last_saliency is None]
        if missing:
            raise StateError(f"no forward pass has run through {missing[0]} yet; compute the loss first")
        total = sum(layer.last_saliency.abs().sum(1).mean() for layer in self.layers.values())
        return strength * total

    def reset_counts(self) -> None:
        for layer in self.layers.values():
            layer.computed = layer.full = 0

    def macs(self, samples: int) -> FBSMacs:
        """MACs per sample counted since :meth:`reset_counts` over ``samples`` evaluated samples."""
        if samples < 1 or not any(layer.full for layer in self.layers.values()):
            raise StateError("no evaluation forward was counted; call reset_counts(), run the model in eval mode")
        dense = sum(layer.full for layer in self.layers.values()) / samples
        computed = sum(layer.computed for layer in self.layers.values()) / samples
        predictors = sum(layer.saliency.weight.numel() for layer in self.layers.values())
        return FBSMacs(dense, computed, float(predictors))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """The gated model's whole ``state_dict`` (convolutions, BatchNorms, predictors) in a safetensors
        file, with the density and gated layers as metadata; no pickle. Load with :func:`load_fbs`."""
        densities = {layer.density for layer in self.layers.values()}
        meta = {"density": densities.pop() if len(densities) == 1 else None, "layers": list(self.layers),
                "skip_first": self.skip_first}  # fmt: skip
        if meta["density"] is None:
            raise StateError("the gated layers have different densities; set one with set_density() before saving")
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(path, overwrite) as tmp:
            save_file(state, str(tmp), metadata={_KEY: json.dumps(meta)})
        return Path(path)

    def set_density(self, density: float) -> None:
        """Change how many channels each gate keeps (the winner-take-all's k) at run time."""
        check_density(density)
        for layer in self.layers.values():
            layer.density = float(density)


def check_density(density: float) -> None:
    if isinstance(density, bool) or not is_number(density) or not 0 < density <= 1:
        raise ConfigError(f"FBS density (the fraction of channels kept) must be in (0, 1], got {density!r}")


def add_fbs(
    model: nn.Module, density: float = 0.5, skip_first: bool = True, only: Collection[str] | None = None
) -> FBS:
    """Gate every ``Conv2d`` (``groups=1``) of ``model``'s ``nn.Sequential`` containers, with the
    ``BatchNorm2d`` right after it, by FBS at ``density`` (the fraction of output channels kept per input).

    ``skip_first`` leaves the first convolution dense (its input is the image, FBS gates the layers
    after it). Then train as usual, adding :meth:`FBS.penalty` to the loss. Refused, with the model
    unchanged, if no convolution can be gated. ``only`` restricts the gates to the convolutions of
    those names (what a ``Pruner``'s scope selects); the first convolution stays dense all the same.
    """
    check_density(density)
    found: list[tuple[nn.Sequential, int, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for i, child in enumerate(module):
                if isinstance(child, nn.Conv2d) and child.groups == 1:
                    found.append((module, i, f"{name}.{i}" if name else str(i)))
    if skip_first:
        found = found[1:]
    if only is not None:
        found = [f for f in found if f[2] in only]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no Conv2d (groups=1) inside an nn.Sequential"
            f"{' after the first' if skip_first else ''}{' among the layers in scope' if only is not None else ''} "
            "to gate with FBS"
        )
    layers: dict[str, FBSConv] = {}
    for container, i, name in found:
        conv = container[i]
        norm = container[i + 1] if i + 1 < len(container) and isinstance(container[i + 1], nn.BatchNorm2d) else None
        gated = FBSConv(conv, norm, float(density))
        container[i] = gated
        if norm is not None:
            container[i + 1] = nn.Identity()
        layers[name] = gated
    return FBS(model, layers, skip_first)


def load_fbs(model: nn.Module, path: str | os.PathLike) -> FBS:
    """Gate ``model`` (the dense architecture the file was saved from) as the file says and load its
    weights and predictors. Everything is checked on a copy first: a file that does not fit leaves the
    model as it was."""
    state, metadata = read_safetensors(path)
    try:
        meta = json.loads(metadata[_KEY])
        density, layers, skip_first = float(meta["density"]), list(meta["layers"]), bool(meta["skip_first"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds no FBS metadata ({exc}); was it written by FBS.save()?") from exc
    try:  # only the saved layers: a Pruner's scope may have gated fewer than add_fbs() would
        probe = add_fbs(copy.deepcopy(model), density, skip_first, only=layers)
    except ConfigError as exc:
        raise CheckpointError(f"{path} gates layers {layers}, which this model cannot gate ({exc})") from exc
    if list(probe.layers) != layers:
        raise CheckpointError(
            f"{path} gates layers {layers}, but this model's gated layers would be {list(probe.layers)}; "
            "is it the same architecture?"
        )
    check_state_fits(probe.model, state, str(path))
    fbs = add_fbs(model, density, skip_first, only=layers)
    fbs.model.load_state_dict(state, strict=False)  # strict already checked
    return fbs
