"""Small random transformers configs: heads, neurons, hidden dim and layers, each saved and reloaded."""

from __future__ import annotations

import json

import pytest
import torch

import secateurs
from secateurs.llm import prune_heads_and_neurons, remove_layers
from secateurs.structural import load_structured, save_structured

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 40


def _model(arch: str):
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "max_position_embeddings": 32}
    if arch == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, **common)  # fmt: skip
        return transformers.BertForMaskedLM(config)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(config)
    if arch == "opt":
        config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                        word_embed_proj_dim=32, **common)  # fmt: skip
        return transformers.OPTForCausalLM(config)
    cls = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    config = getattr(transformers, f"{cls}Config")(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        **common,
    )  # fmt: skip
    return getattr(transformers, f"{cls}ForCausalLM")(config)


IDS = {"input_ids": torch.arange(14).reshape(2, 7) % VOCAB}
ARCHS = ("bert", "gpt2", "opt", "llama", "qwen2")


@pytest.mark.parametrize("pattern", ["head", "channel", "hidden", "layer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_granularity_round_trips_through_save_and_load(arch, pattern, tmp_path):
    model = _model(arch).eval()
    before = sum(p.numel() for p in model.parameters())
    method = "random" if pattern == "layer" else "magnitude"
    secateurs.prune(model, method, 0.5, pattern=pattern, mode="remove", progress=False, structural={"latency": False})
    assert sum(p.numel() for p in model.parameters()) < before
    logits = model(**IDS).logits
    save_structured(model, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "pruning_plan.json").read_text())
    reloaded = load_structured(tmp_path / "m")
    assert torch.equal(reloaded(**IDS).logits, logits)
    if plan["config_expressible"]:  # every layer the same shape: stock from_pretrained works too
        stock = type(model).from_pretrained(tmp_path / "m").eval()
        assert torch.equal(stock(**IDS).logits, logits)


def test_uniform_pruning_updates_the_config_so_stock_loading_works(tmp_path):
    model = _model("llama").eval()
    secateurs.prune(model, "magnitude", 0.5, pattern="head+channel+hidden", mode="remove", progress=False,
                    structural={"latency": False, "gqa": "query_heads"})  # fmt: skip
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (
        16, 2, 2, 24, 8)  # fmt: skip
    save_structured(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "pruning_plan.json").read_text())["config_expressible"]


@pytest.mark.parametrize(("gqa", "heads", "kv_heads"), [("query_heads", 2, 2), ("kv_groups", 2, 1)])
def test_gqa_heads_stay_a_valid_grouping(gqa, heads, kv_heads):
    model = _model("llama").eval()
    secateurs.prune(model, "magnitude", 0.5, pattern="head", mode="remove", progress=False,
                    structural={"latency": False, "gqa": gqa})  # fmt: skip
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == heads * attn.head_dim
        assert attn.k_proj.out_features == attn.v_proj.out_features == kv_heads * attn.head_dim
        assert attn.num_key_value_groups == heads // kv_heads
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, kv_heads)
    model(**IDS).logits.sum().backward()


def test_query_head_pruning_takes_the_same_number_from_every_kv_group():
    model = _model("llama").eval()
    graph = secateurs.structural.DependencyGraph(model, IDS, gqa="query_heads")
    heads = [g for g in graph.groups if g.kind == "head"]
    assert heads and all(g.rows == 2 and g.units == 4 for g in heads)


def test_flap_model_with_added_biases_and_uneven_layers_reloads_from_its_plan(tmp_path):
    model = _model("llama").eval()
    calibration = [torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    report = prune_heads_and_neurons(model, 0.3, calibration=calibration, progress=False, latency=False)
    assert report.after.params < report.before.params
    assert any(layer.mlp.down_proj.bias is not None for layer in model.model.layers)  # compensation biases
    logits = model(**IDS).logits
    save_structured(model, tmp_path / "m")
    assert not json.loads((tmp_path / "m" / "pruning_plan.json").read_text())["config_expressible"]
    assert torch.equal(load_structured(tmp_path / "m")(**IDS).logits, logits)


def test_remove_layers_by_block_influence_updates_layer_indices_and_config():
    model = _model("llama").eval()
    calibration = [torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = remove_layers(model, 1, calibration=calibration, progress=False, latency=False)
    assert len(report.removed_blocks) == 1 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    out = model.generate(**IDS, max_new_tokens=3, do_sample=False)  # KV cache indexed by layer_idx
    assert out.shape == (2, 10)
