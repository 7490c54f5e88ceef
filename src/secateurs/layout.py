"""One canonical view of every prunable weight: ``(out, spatial, in)``.

Patterns, criteria and reports all speak about "output rows" and "input columns".
Layers store weights differently (Conv ``(O, I, *K)``, HF ``Conv1D`` ``(I, O)``,
Embedding ``(V, D)``), so each is mapped once, here, to a 3-D view whose last axis
is the input dimension. Keeping the input axis last and contiguous is what makes
N:M groups line up with how sparse tensor cores read weights (channels-last GEMM).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor, nn


class Layout(str, Enum):
    LINEAR = "linear"  # (out, in)
    CONV = "conv"  # (out, in/groups, *kernel)
    TRANSPOSED = "transposed"  # (in, out): transformers' Conv1D (GPT-2)
    EMBEDDING = "embedding"  # (num_embeddings, dim): rows are tokens


def hf_conv1d_class() -> type | None:
    """transformers' ``Conv1D`` if transformers is importable, else None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def layout_of(module: nn.Module) -> Layout | None:
    """The layout of ``module.weight``, or None for modules we cannot prune element-wise."""
    conv1d = hf_conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return Layout.TRANSPOSED
    if isinstance(module, nn.Linear):
        return Layout.LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Layout.CONV
    if isinstance(module, nn.Embedding):
        return Layout.EMBEDDING
    return None


def canonical_shape(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int, int]:
    """``(out, spatial, in)`` for a weight of ``shape`` stored in ``layout``."""
    if layout is Layout.CONV:
        spatial = 1
        for k in shape[2:]:
            spatial *= k
        return shape[0], spatial, shape[1]
    if layout is Layout.TRANSPOSED:
        return shape[1], 1, shape[0]
    return shape[0], 1, shape[1]


def channel_dims(layout: Layout) -> tuple[int, int]:
    """Which stored dimensions are the output and the input channels."""
    return (1, 0) if layout is Layout.TRANSPOSED else (0, 1)


def to_canonical(weight: Tensor, layout: Layout) -> Tensor:
    """View or copy ``weight`` as ``(out, spatial, in)``."""
    if layout is Layout.CONV:
        out, inp = weight.shape[:2]
        return weight.reshape(out, inp, -1).transpose(1, 2)
    if layout is Layout.TRANSPOSED:
        return weight.t().unsqueeze(1)
    return weight.unsqueeze(1)


def from_canonical(tensor: Tensor, layout: Layout, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_canonical`: back to the stored shape (contiguous)."""
    if layout is Layout.CONV:
        return tensor.transpose(1, 2).reshape(shape).contiguous()
    if layout is Layout.TRANSPOSED:
        return tensor.squeeze(1).t().contiguous()
    return tensor.squeeze(1).reshape(shape).contiguous()
