"""A transformers config that describes the pruned model, found for any architecture, or refused.

Per-family tables (:data:`.hf.FAMILIES`) say which config field holds which size for the families
written out by hand. For every other architecture the fields are *fitted*: the size fields the
config has (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size`` and their aliases ``n_head``, ``n_inner``, ``ffn_dim``, ``d_ff``,
``ffn_hidden_size``, ``d_kv`` ...) are changed one at a time to values the pruned tensors suggest,
and a candidate is kept when the model ``type(model)(config)`` builds (on the meta device: no
memory, no weights) has more tensors of exactly the pruned model's shapes. The result is accepted
only if *every* tensor matches.

Shapes are not everything: some architectures derive constants from sizes (Gemma multiplies its
embeddings by ``sqrt(hidden_size)``; an attention may scale by ``1/sqrt(hidden/heads)``). Every
float attribute of every module of the model the config builds is compared with the pruned model's;
one that differs means a stock reload would silently compute something else, so the config is not
written (the saved model then needs :func:`secateurs.structural.load_structured`, which rebuilds the
original and replays the cuts).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .hf_fused import alibi_quirks

SIZE_FIELDS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "ffn_dim",
    "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads", "decoder_attention_heads", "d_ff", "d_kv",
    "n_inner", "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "word_embed_proj_dim", "kv_channels", "num_hidden_layers", "num_layers", "num_decoder_layers",
    "encoder_layers", "decoder_layers",
)  # fmt: skip
MAX_ROUNDS = 3


def _fields(config: Any) -> list[str]:
    """The size fields ``config`` really has, aliases resolved (``n_head`` is ``num_attention_heads``)."""
    aliases = getattr(config, "attribute_map", {}) or {}
    out: list[str] = []
    for f in SIZE_FIELDS:
        real = aliases.get(f, f)
        if real in out or isinstance(getattr(type(config), real, None), property):  # derived (Falcon's head_dim)
            continue
        try:
            value = getattr(config, real)
        except Exception:  # absent, or a per-layer attribute read globally (Gemma 4 raises its own error)
            continue
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            out.append(real)
    return out


def build_meta(model: nn.Module, config: Any) -> nn.Module | None:
    """``type(model)(config)`` without memory, or None if that config does not build."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):  # save_pretrained leaves the dtype as its name, which __init__ rejects
        config = copy.deepcopy(config)
        config.dtype = getattr(torch, dtype.removeprefix("torch."), None)
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception:
        return None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch(target: dict[str, tuple[int, ...]], built: nn.Module | None) -> int:
    if built is None:
        return 1 << 30
    got = _shapes(built)
    return sum(got.get(k) != s for k, s in target.items()) + len(set(got) - set(target))


def _candidates(value: int | None, ratios: set[tuple[int, int]], dims: set[int], layers: int) -> list[int]:
    out = set()
    if value:
        for old, new in ratios:
            if (value * new) % old == 0:
                out.add(value * new // old)
    out |= dims
    if layers:
        out.add(layers)
    out.discard(value)
    return sorted(v for v in out if v > 0)[:12]


def fit(model: nn.Module, layers: int = 0) -> tuple[dict[str, int], list[str]]:
    """Config values under which ``type(model)`` has the pruned model's shapes: ``({field: value}, [])``,
    or ``({}, [reasons])`` when no change of the size fields gets every tensor right."""
    config = model.config
    target = _shapes(model)
    base = build_meta(model, config)
    if base is None:
        return {}, [f"{type(model).__name__} cannot be built from its own config"]
    if _mismatch(target, base) == 0:
        return {}, []
    before = _shapes(base)
    ratios, dims = set(), set()
    for k, shape in target.items():
        old = before.get(k)
        if old is None or len(old) != len(shape):
            continue
        for a, b in zip(old, shape):
            if a != b:
                ratios.add((a, b))
                dims.add(b)
    fields = _fields(config)
    best, best_score = copy.deepcopy(config), _mismatch(target, base)
    changed: dict[str, int] = {}
    for _ in range(MAX_ROUNDS):
        improved = False
        for f in fields:
            for value in _candidates(getattr(best, f), ratios, dims, layers if "layers" in f else 0):
                trial = copy.deepcopy(best)
                setattr(trial, f, value)
                score = _mismatch(target, build_meta(model, trial))
                if score < best_score:
                    best, best_score, improved = trial, score, True
                    changed[f] = value
            if best_score == 0:
                return changed, []
        if not improved:
            break
    built = _shapes(build_meta(model, best) or base)
    wrong = [f"{k}: {tuple(built.get(k, ()))} from the config, {s} in the model" for k, s in target.items()
             if built.get(k) != s][:3]  # fmt: skip
    return {}, [
        f"no values of the config's size fields {fields} give every tensor its pruned shape ({'; '.join(wrong)})"
    ]


def quirks(model: nn.Module, config: Any) -> list[str]:
    """Constants the modules built from ``config`` would compute differently from ``model``'s
    (float attributes and scalar buffers derived from sizes: Gemma's ``sqrt(hidden_size)``)."""
    built = build_meta(model, config)
    if built is None:
        return [f"{type(model).__name__} cannot be built from the updated config"]
    mine = dict(model.named_modules())
    out = alibi_quirks(model)
    for name, module in built.named_modules():
        ours = mine.get(name)
        if ours is None:
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or not isinstance(value, float) or isinstance(value, bool):
                continue
            have = getattr(ours, attr, None)
            if isinstance(have, float) and not math.isclose(have, value, rel_tol=1e-6):
                out.append(f"{name or type(model).__name__}.{attr} would be {value:g} instead of {have:g}")
    return out
