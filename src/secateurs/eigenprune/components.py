"""Which weight matrices eigenpruning decomposes, and where each one sits inside its layer.

Eigenpruning (Vergara-Browne, Soto, Aizawa 2024, arXiv:2404.03147) takes the SVD of each
attention head's slice of W_Q, W_K, W_V (its output rows), of W_O (its input columns), or of a
whole MLP input/output matrix. A ``Component`` names one such matrix as a row/column window of a
Linear or transformers ``Conv1D`` weight, always seen as ``(out, in)``, so GPT-2's fused
``c_attn`` and Llama's separate projections are handled by the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import find_blocks
from ..errors import ConfigError, choices
from ..layout import Layout, layout_of

#: the paper's component kinds (its code calls them q, k, v, result, pre, mlp_out)
KINDS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
_SEPARATE = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value")}
_OUTPUT = ("o_proj", "out_proj", "dense", "c_proj")
_FUSED_QKV = ("c_attn",)


class ComponentError(ConfigError):
    """The model's attention or MLP layers cannot be mapped onto eigenpruning's components."""


@dataclass(frozen=True, eq=False)  # hashed by identity: slices are unhashable before Python 3.12
class Component:
    """One decomposed matrix: ``weight_2d(module)[rows, cols]``."""

    kind: str
    module_name: str
    block: int
    head: int | None
    rows: slice
    cols: slice

    @property
    def name(self) -> str:
        where = f" head {self.head}" if self.head is not None else ""
        return f"{self.module_name} ({self.kind}{where})"


def weight_2d(module: nn.Module) -> Tensor:
    """The weight as ``(out, in)`` (a view: a Conv1D's ``(in, out)`` weight transposed)."""
    return module.weight.T if layout_of(module) is Layout.TRANSPOSED else module.weight


def _dims(module: nn.Module) -> tuple[int, int]:
    out, inp = weight_2d(module).shape
    return out, inp


@dataclass(frozen=True)
class _Heads:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


def _heads(model: nn.Module) -> _Heads:
    config = getattr(model, "config", None)
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise ComponentError(
            f"{type(model).__name__} has no transformers config with hidden_size and num_attention_heads; "
            "eigenpruning needs them to split Q/K/V/O by head (pass a transformers causal LM)"
        )
    head_dim = get("head_dim") or hidden // heads
    return _Heads(hidden, heads, get("num_key_value_heads") or heads, head_dim)


def _child(parent: nn.Module, names: Iterable[str]) -> tuple[str, nn.Module] | None:
    for name in names:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module) and layout_of(module) in (Layout.LINEAR, Layout.TRANSPOSED):
            return name, module
    return None


def _part(block: nn.Module, words: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name, child in block.named_children():
        if "norm" not in name.lower() and any(w in name.lower() for w in words):
            return name, child
    return None


def _attention(prefix: str, index: int, attn: nn.Module, geo: _Heads, kinds: set[str]) -> list[Component]:
    found: list[Component] = []
    fused = _child(attn, _FUSED_QKV)
    rows_per_head = geo.head_dim
    for kind, n in (("q", geo.heads), ("k", geo.kv_heads), ("v", geo.kv_heads)):
        if kind not in kinds:
            continue
        if fused is not None:
            name, module = fused
            offset = {"q": 0, "k": geo.heads * geo.head_dim, "v": (geo.heads + geo.kv_heads) * geo.head_dim}[kind]
        else:
            hit = _child(attn, _SEPARATE[kind])
            if hit is None:
                raise ComponentError(_missing(prefix, attn, kind))
            (name, module), offset = hit, 0
        out, _ = _dims(module)
        if out < offset + n * rows_per_head:
            raise ComponentError(f"{prefix}.{name} has {out} outputs, fewer than {n} {kind} heads of {rows_per_head}")
        for h in range(n):
            rows = slice(offset + h * rows_per_head, offset + (h + 1) * rows_per_head)
            found.append(Component(kind, f"{prefix}.{name}", index, h, rows, slice(None)))
    if "o" in kinds:
        hit = _child(attn, _OUTPUT)
        if hit is None:
            raise ComponentError(_missing(prefix, attn, "o"))
        name, module = hit
        found += [
            Component("o", f"{prefix}.{name}", index, h, slice(None), slice(h * geo.head_dim, (h + 1) * geo.head_dim))
            for h in range(geo.heads)
        ]
    return found


def _mlp(prefix: str, index: int, mlp: nn.Module, hidden: int, kinds: set[str]) -> list[Component]:
    """MLP input layers read the residual stream (``in == hidden``), the output layer writes it."""
    found = []
    for name, module in mlp.named_children():
        if layout_of(module) not in (Layout.LINEAR, Layout.TRANSPOSED):
            continue
        out, inp = _dims(module)
        kind = "mlp_in" if inp == hidden and out != hidden else "mlp_out" if out == hidden and inp != hidden else None
        if kind in kinds:
            found.append(Component(kind, f"{prefix}.{name}", index, None, slice(None), slice(None)))
    missing = kinds - {c.kind for c in found}
    if missing:
        raise ComponentError(f"found no {' / '.join(sorted(missing))} layer in {prefix}: {_children(mlp)}")
    return found


def find_components(model: nn.Module, kinds: Iterable[str], blocks: str | None = None) -> list[Component]:
    """Every matrix of the given kinds in every block, in block order.

    Raises:
        ComponentError: an unknown kind, or a block whose layers do not match the known layouts
            (Llama/Mistral/Qwen/OPT/Phi projections, GPT-2's fused ``c_attn``).
    """
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown or not kinds:
        raise ComponentError(f"components={sorted(kinds)!r}: each must be one of {choices(KINDS)}")
    prefix, stack = find_blocks(model, blocks)
    geo = _heads(model)
    found: list[Component] = []
    for index, block in enumerate(stack):
        here = f"{prefix}.{index}" if prefix else str(index)
        if kinds & {"q", "k", "v", "o"}:
            attn = _part(block, ("attn", "attention"))
            if attn is None:
                raise ComponentError(f"block {here} has no attention submodule: {_children(block)}")
            found += _attention(f"{here}.{attn[0]}", index, attn[1], geo, kinds)
        if kinds & {"mlp_in", "mlp_out"}:
            mlp = _part(block, ("mlp", "feed_forward", "ffn"))
            if mlp is None:
                raise ComponentError(f"block {here} has no MLP submodule: {_children(block)}")
            found += _mlp(f"{here}.{mlp[0]}", index, mlp[1], geo.hidden, kinds & {"mlp_in", "mlp_out"})
    return found


def _children(module: nn.Module) -> str:
    return ", ".join(f"{n} ({type(m).__name__})" for n, m in module.named_children()) or "no children"


def _missing(prefix: str, attn: nn.Module, kind: str) -> str:
    known = _SEPARATE.get(kind, _OUTPUT)
    return (
        f"no {kind} projection in {prefix}: looked for {', '.join(known + (_FUSED_QKV if kind != 'o' else ()))} "
        f"among {_children(attn)}; eigenpruning knows Llama/Mistral/Qwen/OPT/Phi and GPT-2 layouts"
    )


def module_map(model: nn.Module, components: Iterable[Component]) -> dict[str, nn.Module]:
    """``name -> module`` for the layers holding ``components``."""
    return {c.module_name: model.get_submodule(c.module_name) for c in components}


def decompose(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, Vh`` of ``matrix`` in float64: the fold must be exact to float32 rounding."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    return u, s, vh


def describe(components: list[Component]) -> dict[str, Any]:
    """How many matrices of each kind were found (for reports)."""
    counts: dict[str, int] = {}
    for c in components:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    return counts
