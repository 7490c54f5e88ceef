"""Hugging Face transformers: attention heads (GQA included), config updates, example inputs.

transformers is never imported here: handlers are registered by class name and only
match models that already use it. Supported attention modules: BERT (and RoBERTa),
GPT-2 (fused ``Conv1D``), OPT, and the Llama family (Llama, Qwen2, Qwen3, Mistral, Gemma).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..blocks import BlockDiscoveryError, find_blocks
from .handlers import Conv1DHandler, Handler, handler_for, register_handler_by_name
from .heads import head_units as _head_units
from .surgery import Surgery
from .trace import Trace


def _width(module: nn.Module, axis: str) -> int:
    """in/out width of a Linear or transformers Conv1D."""
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return w.shape[0] if axis == "in" else w.shape[1]
    return w.shape[1] if axis == "in" else w.shape[0]


def _refresh(edit: Surgery, module: nn.Module) -> None:
    """Size attributes of a projection (Linear or Conv1D), by its own handler."""
    handler_for(module).update(module, "", edit, {})


class ProjectionAttentionHandler(Handler):
    """Attention with separate q/k/v(/o) Linear projections and ``view(..., -1, head_dim)``."""

    def __init__(self, name: str, q: str, k: str, v: str, o: str | None, head_dim: str) -> None:
        self.name, self.q, self.k, self.v, self.o, self.head_dim = name, q, k, v, o, head_dim

    def heads(self, module: nn.Module) -> tuple[int, int, int]:
        hd = getattr(module, self.head_dim)
        q, k = getattr(module, self.q), getattr(module, self.k)
        return q.out_features // hd, k.out_features // hd, hd

    def trace(self, t: Trace, name, module, args, kwargs, output):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        vec = t.channel(x, -1)
        heads, kv_heads, hd = self.heads(module)
        q_units, kv_units = _head_units(t, name, heads, kv_heads)
        q_rows = q_units.repeat_interleave(hd)
        for p in (self.q, self.k, self.v):
            t.port(f"{name}.{p}", "weight", 1, vec, "in", name)
        outs = [(self.q, q_rows)]
        if kv_units is not None:
            outs += [(self.k, kv_units.repeat_interleave(hd)), (self.v, kv_units.repeat_interleave(hd))]
        for p, rows in outs:
            t.port(f"{name}.{p}", "weight", 0, rows, "out", name)
            if getattr(module, p).bias is not None:
                t.port(f"{name}.{p}", "bias", 0, rows, "out", name)
        if self.o is None:  # BERT: the context vector leaves the module; the next Linear consumes the heads
            t.label(output[0], -1, q_rows)
            return
        o = getattr(module, self.o)
        t.port(f"{name}.{self.o}", "weight", 1, q_rows, "in", name)
        ids = t.source(name, f"{name}.{self.o}", o.out_features)
        t.port(f"{name}.{self.o}", "weight", 0, ids, "out", name)
        if o.bias is not None:
            t.port(f"{name}.{self.o}", "bias", 0, ids, "out", name)
        t.label(output[0], -1, ids)

    def update(self, module, name, edit, kept):
        for p in (self.q, self.k, self.v, self.o):
            if p is not None:
                _refresh(edit, getattr(module, p))
        heads, kv_heads, hd = self.heads(module)
        hidden = getattr(module, self.q).in_features
        for attr, value in (
            ("num_key_value_groups", heads // kv_heads), ("num_heads", heads), ("num_key_value_heads", kv_heads),
            ("num_attention_heads", heads), ("all_head_size", heads * hd), ("embed_dim", hidden),
        ):  # fmt: skip
            if hasattr(module, attr):
                edit.set(module, attr, value)


class GPT2AttentionHandler(Handler):
    """GPT-2: q, k and v fused in one ``Conv1D`` (``c_attn``), split by ``split_size``."""

    name = "hf_gpt2_attention"

    def heads(self, module: nn.Module) -> tuple[int, int, int]:
        return module.num_heads, module.num_heads, module.head_dim

    def trace(self, t: Trace, name, module, args, kwargs, output):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        vec = t.channel(x, -1)
        if module.is_cross_attention:
            t.block(vec, f"{name!r} is GPT-2 cross-attention, which is not supported; exclude it")
            return
        units = t.source(name, f"{name}:heads", module.num_heads, kind="head")
        rows = units.repeat_interleave(module.head_dim)
        t.port(f"{name}.c_attn", "weight", 0, vec, "in", name)
        t.port(f"{name}.c_attn", "weight", 1, rows.repeat(3), "out", name)
        t.port(f"{name}.c_attn", "bias", 0, rows.repeat(3), "out", name)
        t.port(f"{name}.c_proj", "weight", 0, rows, "in", name)
        ids = t.source(name, f"{name}.c_proj", module.c_proj.nf)
        t.port(f"{name}.c_proj", "weight", 1, ids, "out", name)
        t.port(f"{name}.c_proj", "bias", 0, ids, "out", name)
        t.label(output[0], -1, ids)

    def update(self, module, name, edit, kept):
        _refresh(edit, module.c_attn)
        _refresh(edit, module.c_proj)
        heads = module.c_proj.weight.shape[0] // module.head_dim
        edit.set(module, "num_heads", heads)
        edit.set(module, "split_size", heads * module.head_dim)
        edit.set(module, "embed_dim", module.c_attn.weight.shape[0])


_LLAMA = ProjectionAttentionHandler("hf_llama_attention", "q_proj", "k_proj", "v_proj", "o_proj", "head_dim")
_OPT = ProjectionAttentionHandler("hf_opt_attention", "q_proj", "k_proj", "v_proj", "out_proj", "head_dim")
_BERT = ProjectionAttentionHandler("hf_bert_self_attention", "query", "key", "value", None, "attention_head_size")
_GPT2 = GPT2AttentionHandler()

for _family in ("llama", "qwen2", "qwen3", "mistral", "gemma"):
    _cls = {"qwen2": "Qwen2", "qwen3": "Qwen3"}.get(_family, _family.capitalize())
    register_handler_by_name(f"transformers.models.{_family}.modeling_{_family}.{_cls}Attention", _LLAMA)
register_handler_by_name("transformers.models.opt.modeling_opt.OPTAttention", _OPT)
register_handler_by_name("transformers.models.bert.modeling_bert.BertSelfAttention", _BERT)
register_handler_by_name("transformers.models.roberta.modeling_roberta.RobertaSelfAttention", _BERT)
register_handler_by_name("transformers.models.gpt2.modeling_gpt2.GPT2Attention", _GPT2)


register_handler_by_name("transformers.pytorch_utils.Conv1D", Conv1DHandler())


# -- config -------------------------------------------------------------------------------------
_LLAMA_KEYS = {"hidden": "hidden_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
               "ffn": "intermediate_size", "layers": "num_hidden_layers", "head_dim": "head_dim",
               "ffn_module": "mlp.gate_proj", "attention": "self_attn"}  # fmt: skip
FAMILIES: dict[str, dict[str, str]] = {
    **{k: _LLAMA_KEYS for k in ("llama", "qwen2", "qwen3", "mistral", "gemma")},
    "opt": {"hidden": "hidden_size", "heads": "num_attention_heads", "ffn": "ffn_dim", "layers": "num_hidden_layers",
            "embed": "word_embed_proj_dim", "ffn_module": "fc1", "attention": "self_attn"},
    "gpt2": {"hidden": "n_embd", "heads": "n_head", "ffn": "n_inner", "layers": "n_layer", "ffn_module": "mlp.c_fc",
             "attention": "attn"},
    "bert": {"hidden": "hidden_size", "heads": "num_attention_heads", "ffn": "intermediate_size",
             "layers": "num_hidden_layers", "ffn_module": "intermediate.dense", "attention": "attention.self"},
}  # fmt: skip


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def example_inputs(model: nn.Module, length: int = 8) -> dict[str, torch.Tensor] | None:
    """A small batch of token ids for tracing a transformers model (None for other models)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not is_hf(model) or not vocab:
        return None
    ids = (torch.arange(length) * 7 + 3).remainder(vocab).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _layer_values(model: nn.Module, keys: dict[str, str]) -> dict[str, list[int]]:
    _, blocks = find_blocks(model)
    values: dict[str, list[int]] = {"heads": [], "kv_heads": [], "ffn": [], "hidden": [], "head_dim": []}
    for block in blocks:
        attn = block.get_submodule(keys["attention"])
        heads, kv_heads, hd = handler_for(attn).heads(attn)
        values["heads"].append(heads)
        values["kv_heads"].append(kv_heads)
        values["head_dim"].append(hd)
        values["ffn"].append(_width(block.get_submodule(keys["ffn_module"]), "out"))
        q = next(m for m in attn.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
        values["hidden"].append(_width(q, "in"))
    values["layers"] = [len(blocks)]
    return values


def sync_config(model: nn.Module, edit: Surgery) -> list[str]:
    """Write the pruned sizes into ``model.config`` where every layer agrees; return the keys that
    differ between layers (the config cannot express them; :func:`load_structured` rebuilds them).
    Not a transformers model: nothing to do."""
    if not is_hf(model):
        return []
    from . import hf_config

    config = getattr(model, "config", None)
    keys = FAMILIES.get(getattr(config, "model_type", None))
    heterogeneous: list[str] = []
    if keys is None:  # any other architecture: fit the size fields to the tensors, or write nothing
        update, heterogeneous = hf_config.fit(model, len(_blocks(model)))
    else:
        values = _layer_values(model, keys)
        update = {}
        for what, key in keys.items():
            if what not in values or not values[what]:
                continue
            distinct = set(values[what])
            if len(distinct) == 1:
                update[key] = distinct.pop()
            else:
                heterogeneous.append(key)
        if "embed" in keys:
            update[keys["embed"]] = model.get_input_embeddings().embedding_dim
    if update:
        proposed = copy.deepcopy(config)
        for key, value in update.items():
            setattr(proposed, key, value)
        quirks = hf_config.quirks(model, proposed)
        if quirks:  # a stock reload would silently differ: the saved config keeps the original sizes
            return [*heterogeneous, *quirks]
        for key, value in update.items():
            edit.set(config, key, value)
    _renumber_layers(model, edit)
    return heterogeneous


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The one stack of repeated blocks; none for an encoder-decoder (two stacks, whose layer counts
    the size fields fit and whose layers are never removed together)."""
    try:
        return find_blocks(model)[1]
    except BlockDiscoveryError:
        return []


def _renumber_layers(model: nn.Module, edit: Surgery) -> None:
    """After blocks were removed: every ``layer_idx`` is its new position (KV caches index by it)."""
    config = model.config
    blocks = _blocks(model)
    old_types = getattr(config, "layer_types", None)
    new_types = []
    for i, block in enumerate(blocks):
        old = next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), None)
        if old_types is not None and old is not None and old < len(old_types):
            new_types.append(old_types[old])
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                edit.set(module, "layer_idx", i)
    if old_types is not None and len(new_types) == len(blocks):
        edit.set(config, "layer_types", new_types)


def config_expressible(model: nn.Module) -> bool:
    """Does ``type(model)(model.config)`` have exactly this model's shapes? Then stock
    ``from_pretrained`` loads the saved model; otherwise :func:`load_structured` is needed."""
    if not is_hf(model):
        return False
    from .hf_config import build_meta, quirks

    fresh = build_meta(model, model.config)
    if fresh is None:
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return mine == theirs and not quirks(model, model.config)
