"""Torch-Pruning 1.6.1 side of ``structural_vs_torch_pruning.py``; runs in ``bench/.envs/torch-pruning``.

Prunes one model of ``structural_models.MODELS`` the way Torch-Pruning's own examples do
(``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, uniform ratio, ``num_heads`` /
``prune_num_heads`` for attention, attributes fixed by hand afterwards as in
``examples/transformers/prune_hf_bert.py`` and ``examples/LLMs/prune_llm.py``), measures it
exactly as the secateurs side does, and prints one JSON line.

    python _torch_pruning_worker.py --model resnet_like [--minilm-fidelity]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from importlib.metadata import version

import torch
import torch_pruning as tp
from torch import nn

from structural_models import (
    MODELS,
    build,
    copy_model,
    embedding_fidelity,
    measure,
    minilm_tokenizer,
    output_shape,
    run,
)  # fmt: skip


def _attention_settings(model: nn.Module, name: str, ratio: float) -> dict:
    """num_heads per projection and the layers whose outputs are the residual stream (kept, since
    only heads and FFN neurons are removed, as on the secateurs side)."""
    num_heads, ignored = {}, []
    for m in model.modules():
        kind = type(m).__name__
        if isinstance(m, nn.MultiheadAttention):
            num_heads[m] = m.num_heads
            ignored.append(m.out_proj)
        elif isinstance(m, nn.TransformerEncoderLayer):
            ignored.append(m.linear2)
        elif kind == "BertSelfAttention":
            for p in (m.query, m.key, m.value):
                num_heads[p] = m.num_attention_heads
        elif kind in ("BertSelfOutput", "BertOutput"):
            ignored.append(m.dense)
        elif kind == "LlamaAttention":
            num_heads[m.q_proj] = model.config.num_attention_heads
            num_heads[m.k_proj] = num_heads[m.v_proj] = model.config.num_key_value_heads
            ignored.append(m.o_proj)
        elif kind == "LlamaMLP":
            ignored.append(m.down_proj)
    for attr in ("head", "pooler", "lm_head"):
        if isinstance(getattr(model, attr, None), nn.Module):
            ignored.append(getattr(model, attr))
    return {"num_heads": num_heads, "ignored_layers": ignored, "prune_num_heads": True, "prune_head_dims": False,
            "head_pruning_ratio": ratio}  # fmt: skip


def _fix_attributes(model: nn.Module, pruner: tp.pruner.MetaPruner) -> None:
    """What Torch-Pruning's examples do by hand after pruning transformers."""
    for m in model.modules():
        kind = type(m).__name__
        if kind == "BertSelfAttention":
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
        elif kind == "LlamaAttention":
            heads, kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
            m.num_key_value_groups = heads // kv
            model.config.num_attention_heads, model.config.num_key_value_heads = heads, kv
        elif kind == "LlamaMLP":
            model.config.intermediate_size = m.gate_proj.out_features


def prune(name: str, model: nn.Module) -> float:
    _, inputs, granularity, ratio = MODELS[name]
    example = inputs(1)
    kwargs = {"importance": tp.importance.GroupMagnitudeImportance(p=2), "pruning_ratio": ratio,
              "global_pruning": False}  # fmt: skip
    if granularity == "channel":
        kwargs["ignored_layers"] = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    else:
        kwargs.update(_attention_settings(model, name, ratio))
        if name == "minilm":
            kwargs["output_transform"] = lambda out: out.last_hidden_state.sum()
        if name == "llama_gqa":
            kwargs["output_transform"] = lambda out: out.logits.sum()
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, example, **kwargs)
    pruner.step()
    _fix_attributes(model, pruner)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.mha.set_fastpath_enabled(False)  # as on the secateurs side (see the main script)
    dense = build(args.model)
    model = copy_model(dense)
    result: dict = {"tool": f"torch-pruning {version('torch-pruning')}", "model": args.model}
    try:
        result["seconds"] = prune(args.model, model)
        x = MODELS[args.model][1](2)
        with torch.no_grad():
            a, b = run(dense, x), run(model, x)
        result["same_output_shape"] = output_shape(a) == output_shape(b)
        result.update(measure(args.model, dense, model))
        if args.model == "minilm":
            result["fidelity"] = embedding_fidelity(dense, model, minilm_tokenizer())
        result["ok"] = True
    except Exception as exc:  # a failure is a result: record it
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:600]
        result["trace"] = traceback.format_exc()[-1500:]
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
