"""Make an eigenpruned Llama-family model survive ``save_pretrained`` / ``from_pretrained``.

The mean ablation gives bias-free projections (Llama's ``k_proj``, ``down_proj``) a bias. A
standard config says ``attention_bias=False`` / ``mlp_bias=False``, so ``from_pretrained`` would
build the layers without biases and silently drop the saved ones. Where such a flag exists, we set
it and give the sibling projections it governs (every block's attention, or MLP, layers) a zero
bias, so the saved model loads back exactly with plain transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..layout import Layout, layout_of

#: config flag -> the block part (attention or MLP) whose Linear layers it gives biases
_FLAGS = {"attention_bias": ("attn", "attention"), "mlp_bias": ("mlp", "feed_forward", "ffn")}


@dataclass
class BiasFlags:
    """What ``complete_biases`` changed, so ``undo`` can take it back."""

    flags: list[str] = field(default_factory=list)
    zero_biases: list[str] = field(default_factory=list)

    def undo(self, model: nn.Module) -> None:
        for name in self.zero_biases:
            model.get_submodule(name).bias = None
        for flag in self.flags:
            setattr(model.config, flag, False)


def _part_of(name: str, words: tuple[str, ...]) -> str | None:
    """The dotted prefix ending in the attention/MLP part that holds ``name``, if any."""
    pieces = name.split(".")
    for i, piece in enumerate(pieces[:-1]):
        if "norm" not in piece.lower() and any(w in piece.lower() for w in words):
            return ".".join(pieces[: i + 1])
    return None


def complete_biases(model: nn.Module, created: list[str], block_prefix: str, blocks: int) -> BiasFlags:
    """Set each bias flag the new biases need and give every layer under it a zero bias."""
    done = BiasFlags()
    config = getattr(model, "config", None)
    for flag, words in _FLAGS.items():
        if getattr(config, flag, None) is not False:
            continue
        parts = {_part_of(n, words) for n in created} - {None}
        if not parts:
            continue
        # the same part in every block: 'model.layers.3.self_attn' -> 'self_attn'
        suffixes = {p[len(block_prefix) + 1 :].split(".", 1)[1] for p in parts if p.startswith(block_prefix + ".")}
        for index in range(blocks):
            for suffix in suffixes:
                part = model.get_submodule(f"{block_prefix}.{index}.{suffix}")
                for child_name, child in part.named_children():
                    if layout_of(child) is Layout.LINEAR and child.bias is None:
                        child.bias = nn.Parameter(
                            torch.zeros(child.out_features, dtype=child.weight.dtype, device=child.weight.device),
                            child.weight.requires_grad,
                        )
                        done.zero_biases.append(f"{block_prefix}.{index}.{suffix}.{child_name}")
        setattr(config, flag, True)
        done.flags.append(flag)
    return done


def unsaved_biases(model: nn.Module, created: list[str]) -> list[str]:
    """The created biases that a model rebuilt from its config would not have (an architecture whose
    layers hard-code ``bias=False``, e.g. Qwen2's ``o_proj``): ``from_pretrained`` would drop them."""
    try:
        with torch.device("meta"):
            rebuilt = type(model)(model.config)
    except Exception:  # not a config-built model: nothing says how it reloads
        return list(created)
    out = []
    for name in created:
        try:
            bias = getattr(rebuilt.get_submodule(name), "bias", None)
        except AttributeError:
            bias = None
        if bias is None:
            out.append(name)
    return out
