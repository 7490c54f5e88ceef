"""Torch-Pruning 1.6 side of ``structural_hf_zoo.py``; runs in ``bench/.envs/torch-pruning``.

Prunes the same tiny transformers models (built by ``secateurs/hf_zoo.py``, loaded by path so that
secateurs itself is not imported here) as Torch-Pruning's ``examples/LLMs/prune_llm.py`` does:
``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, ``num_heads`` per q/k/v projection,
``prune_num_heads=True, prune_head_dims=False``, the LM head ignored, then the attributes and config
fields that example fixes by hand (``num_heads``, ``num_key_value_heads``, ``num_key_value_groups``,
``hidden_size``, ``intermediate_size``). The residual stream is kept (layers writing it are ignored),
as on the secateurs side. One JSON line per architecture: for each pattern whether pruning ran,
whether the pruned model runs, and whether ``save_pretrained`` + stock ``from_pretrained`` gives the
same logits.

    SECATEURS_SRC=.../src/secateurs python _torch_pruning_hf_worker.py llama bart ...
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import traceback
import warnings

# this venv's torchvision is a CUDA build that cannot load beside torch+cpu, and transformers imports it
# when installed: hide it (text models never need it)
sys.modules.setdefault("torchvision", None)

import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from torch import nn  # noqa: E402

warnings.filterwarnings("ignore")
spec = importlib.util.spec_from_file_location("hf_zoo", os.path.join(os.environ["SECATEURS_SRC"], "hf_zoo.py"))
hf_zoo = importlib.util.module_from_spec(spec)
sys.modules["hf_zoo"] = hf_zoo  # dataclasses look their module up
spec.loader.exec_module(hf_zoo)

QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("q_lin", "k_lin", "v_lin"))
SPARSITY = 0.3


def _attention(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    found = []
    for m in model.modules():
        for names in QKV:
            if all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
                found.append((m, [getattr(m, n) for n in names]))
                break
    return found


def _prune(model: nn.Module, batch: dict, pattern: str) -> None:
    hidden = model.get_input_embeddings().embedding_dim
    attention = _attention(model)
    qkv = {id(p) for _, ps in attention for p in ps}
    num_heads = {}
    for m, (q, k, v) in attention:
        hd = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None) or m.key_value_proj_dim
        num_heads[q] = q.out_features // hd
        num_heads[k] = num_heads[v] = k.out_features // hd
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == hidden]
    ignored += [model.get_output_embeddings()] if model.get_output_embeddings() is not None else []
    if pattern == "channel":
        ignored += [m for m in model.modules() if id(m) in qkv]
    if pattern == "head":
        ignored += [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in qkv]
    pruner = tp.pruner.MetaPruner(
        model, example_inputs={**batch, "use_cache": False} if hasattr(model.config, "use_cache") else batch,
        output_transform=lambda out: out.logits if hasattr(out, "logits") else out[0],
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=SPARSITY, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=pattern != "channel",
        prune_head_dims=False, head_pruning_ratio=SPARSITY,
    )  # fmt: skip
    pruner.step()
    config = model.config
    for m, (q, k, _) in attention:  # the attribute fixes of examples/LLMs/prune_llm.py
        hd = num_heads and (getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
                            or m.key_value_proj_dim)  # fmt: skip
        heads, kv = q.out_features // hd, k.out_features // hd
        for attr, value in (("num_heads", heads), ("num_key_value_heads", kv), ("num_key_value_groups", heads // kv),
                            ("all_head_size", heads * hd), ("num_attention_heads", heads)):  # fmt: skip
            if hasattr(m, attr):
                setattr(m, attr, value)
        if hasattr(config, "num_attention_heads"):
            config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv
    for m in model.modules():
        up = getattr(m, "gate_proj", None) or getattr(m, "up_proj", None) or getattr(m, "fc1", None)
        if isinstance(up, nn.Linear) and hasattr(config, "intermediate_size"):
            config.intermediate_size = up.out_features


def one(arch: hf_zoo.Arch) -> dict:
    row = {"arch": arch.model_type}
    for pattern in ("channel", "head", "head+channel"):
        r = row[pattern] = {"pruned": False, "runs": False, "stock_reload": False}
        try:
            model = hf_zoo.build(arch)
            batch = hf_zoo.inputs(model)
            before = sum(p.numel() for p in model.parameters())
            _prune(model, batch, pattern)
            r["pruned"] = True
            r["reduction"] = 1 - sum(p.numel() for p in model.parameters()) / before
            logits = hf_zoo.logits(model, batch)
            r["runs"] = True
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                again = hf_zoo.logits(type(model).from_pretrained(d).eval(), batch)
            r["stock_reload"] = bool(torch.allclose(again, logits, atol=1e-5))
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if os.environ.get("TP_DEBUG"):
                traceback.print_exc()
    return row


if __name__ == "__main__":
    import transformers

    transformers.logging.set_verbosity_error()
    archs = {a.model_type: a for a in hf_zoo.architectures()}
    for name in sys.argv[1:]:
        if name in archs:
            print(json.dumps(one(archs[name])), flush=True)
