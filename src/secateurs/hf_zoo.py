"""Tiny random models of every architecture the installed ``transformers`` lists, for sweeps.

The list comes from transformers' auto mappings (causal LM, masked LM, sequence-to-sequence LM),
never from a hand-written list, so a new transformers release is swept as it is. Each model is
built from its own config class with small sizes (hidden 32, 2 layers, 4 heads, 2 KV heads where
the config has them); an architecture whose config or model refuses those sizes, or that needs
more than token ids to run, is reported as not built, with the reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# sequence-to-sequence first: an encoder-decoder is swept whole (cross-attention included), not as
# the decoder-only ForCausalLM variant some of them also have
MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            "MODEL_FOR_MASKED_LM_MAPPING_NAMES")  # fmt: skip
VOCAB = 64
MAX_PARAMETERS = 5_000_000  # a tiny config builds well under 1M; far above that, a nested config was missed

# every spelling transformers configs use for the same small sizes
TINY: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 8, "d_kv": 8,
    "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "d_ff": 64,
    "n_inner": 64, "ffn_hidden_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "n_ctx": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0, "tie_word_embeddings": True,
    "attn_implementation": "eager",
    # sizes tied to the layer count or head width whose defaults contradict the tiny ones
    "attention_types": [[["global", "local"], 1]], "rotary_dim": 4,
}  # fmt: skip


@dataclass
class Arch:
    model_type: str
    mapping: str
    class_name: str


def architectures(mappings: tuple[str, ...] = MAPPINGS) -> list[Arch]:
    """One entry per model type, from the first mapping of ``mappings`` that lists it."""
    from transformers.models.auto import modeling_auto

    seen: dict[str, Arch] = {}
    for mapping in mappings:
        for model_type, cls in getattr(modeling_auto, mapping).items():
            if model_type not in seen and isinstance(cls, str):
                seen[model_type] = Arch(model_type, mapping, cls)
    return list(seen.values())


def tiny_config(model_type: str) -> Any:
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    kwargs = {k: v for k, v in TINY.items() if k in known and k != "attn_implementation"}
    if "text_config" in known and getattr(default, "text_config", None) is not None:
        raise ValueError("a composite (multimodal) config; only text backbones are swept")
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    return config


def build(arch: Arch, seed: int = 0) -> nn.Module:
    """The tiny model in eval mode; raises with the reason when the architecture does not build."""
    import transformers

    cls = getattr(transformers, arch.class_name)
    config = tiny_config(arch.model_type)
    with torch.device("meta"):  # sized first: a config whose nested sub-configs keep full sizes is not built
        size = sum(p.numel() for p in cls(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(
            f"the tiny config of {arch.model_type} still has {size:,} parameters (sizes in nested sub-configs "
            f"are not shrunk); not built (the cap is {MAX_PARAMETERS:,})"
        )
    torch.manual_seed(seed)
    model = cls(config).eval()
    return model


def inputs(model: nn.Module, length: int = 8) -> dict[str, torch.Tensor]:
    """Token ids (and decoder ids for encoder-decoders) away from the special tokens."""
    ids = (torch.arange(2 * length).reshape(2, length) * 7 + 3).remainder(VOCAB - 3) + 3
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = ids[:, : length // 2]
    return out


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch, use_cache=False) if hasattr(model.config, "use_cache") else model(**batch)
    return out.logits if hasattr(out, "logits") else out[0]


def modeling_importable(arch: Arch) -> bool:
    try:
        importlib.import_module(f"transformers.models.{arch.model_type.replace('-', '_')}")
    except Exception:
        return False
    return True


PATTERNS = ("channel", "head", "head+channel")


def sweep_one(arch: Arch, pattern: str, folder: str, sparsity: float = 0.3) -> dict[str, Any]:
    """Prune ``arch``'s tiny model at ``sparsity`` with ``pattern``, save it, reload it (stock
    ``from_pretrained`` when the config expresses it, :func:`load_structured` otherwise) and compare
    logits. ``status``: 'ok', 'refused' (a typed secateurs error, its message in ``reason``) or
    'unbuilt' (the tiny model does not build or run: not an architecture to sweep)."""
    import secateurs
    from secateurs.errors import SecateursError
    from secateurs.structural import load_structured, save_structured

    try:
        model = build(arch)
        batch = inputs(model)
        logits(model, batch)
        with torch.no_grad():
            model(**batch)  # as prune() will call it (with the model's default cache): hybrid tiny models fail here
    except Exception as exc:
        return {"status": "unbuilt", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    before = sum(p.numel() for p in model.parameters())
    try:
        secateurs.prune(model, "magnitude", sparsity, pattern=pattern, mode="remove", example_inputs=batch,
                        progress=False, structural={"latency": False})  # fmt: skip
    except SecateursError as exc:
        return {"status": "refused", "reason": f"{type(exc).__name__}: {exc}"}
    after = sum(p.numel() for p in model.parameters())
    pruned = logits(model, batch)
    save_structured(model, folder)
    from secateurs.structural.hf import config_expressible

    stock = config_expressible(model)
    reloaded = type(model).from_pretrained(folder).eval() if stock else load_structured(folder)
    again = logits(reloaded, batch)
    return {
        "status": "ok", "params_before": before, "params_after": after,
        "reduction": 1 - after / before, "reload": "stock" if stock else "load_structured",
        "max_abs_diff": float((again - pruned).abs().max()), "exact": bool(torch.equal(again, pruned)),
        "zero_unit": zero_unit_check(arch, pattern, sparsity),
    }  # fmt: skip


KINDS = {"channel": ("channel",), "head": ("head",), "head+channel": ("channel", "head")}
NORMS = ("layer_norm", "layer_norm2d", "group_norm")


def zero_unit_check(arch: Arch, pattern: str, ratio: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """On a fresh model: zero every parameter slice that produces or consumes ``ratio`` of the units of
    each removable group of ``pattern``'s kind (a head's rows of the fused or separate q/k/v projections
    and its columns of the output projection; an MLP neuron's rows and columns: a query head that shares
    its key/value head still reads the shared values, so the consumer side is what silences it), then
    remove exactly those units. The logits must not change: a unit mapped to
    the wrong rows of a fused weight, or a head that lost its ALiBi slope, changes them. Groups whose
    channels pass through a norm are skipped (removing a channel changes the norm's statistics)."""
    return zero_unit_check_model(build(arch, seed), pattern, ratio, seed)


def zero_unit_check_model(model: nn.Module, pattern: str, ratio: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """:func:`zero_unit_check` on a given (tiny) model, which is modified."""
    from secateurs.structural import DependencyGraph
    from secateurs.structural.apply import apply_steps
    from secateurs.structural.handlers import handler_for

    batch = inputs(model)
    graph = DependencyGraph(model, batch)
    modules = dict(model.named_modules())

    def through_norm(group) -> bool:
        owners = {v.port.owner for v in group.ports if v.port.owner}
        if any("Norm" in type(modules[v.port.module]).__name__ for v in group.ports):  # OLMo 2's q_norm
            return True
        return any(getattr(handler_for(modules[o]), "name", "") in NORMS for o in owners)

    groups = [g for g in graph.groups if g.kind in KINDS[pattern] and g.units > 1 and not g.blocked]
    gen = torch.Generator().manual_seed(seed)
    removed: dict[str, list[int]] = {}
    for g in groups:
        per_row = g.units // g.rows  # query heads per KV group: every group loses the same number
        k = min(round(ratio * per_row), per_row - 1)
        if k and not through_norm(g):
            picks = [torch.randperm(per_row, generator=gen)[:k] for _ in range(g.rows)]
            removed[g.name] = [r * per_row + int(i) for r, chosen in enumerate(picks) for i in chosen]
    if not removed:
        return {"checked": 0, "exact": False, "max_abs_diff": None}
    with torch.no_grad():
        for name, units in removed.items():
            for view in graph[name].ports:
                port = view.port
                if port.role not in ("out", "in") or port.param.startswith("#"):
                    continue
                tensor = getattr(modules[port.module], port.param)
                hit = torch.isin(view.index, torch.tensor(units))
                tensor.index_fill_(port.dim, hit.nonzero().reshape(-1), 0.0)
    before = logits(model, batch)
    apply_steps(model, [graph.step(removed)], batch, check=True)
    after = logits(model, batch)
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    return {"checked": len(removed), "max_abs_diff": diff, "exact": bool(scale > 0 and diff <= 1e-5 * max(scale, 1.0))}
