"""Structural removal across transformers architectures, listed by transformers' own auto mappings.

Every architecture that builds from a tiny config (``secateurs.hf_zoo``) is pruned at 30% with
channel (FFN neurons), head and head+channel removal. Each run either succeeds, and then the model
reloaded from disk (stock ``from_pretrained`` when the updated config expresses every shape,
``load_structured`` otherwise) gives the pruned model's logits, or it is refused with a typed error
whose reason is one of :data:`REFUSALS`. The full sweep is slow; a few architectures run by default.
"""

from __future__ import annotations

import re

import pytest
import torch

from secateurs import hf_zoo
from secateurs.structural import load_structured, save_structured
from secateurs.structural.hf import config_expressible

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

#: the only reasons a run may be refused, each with why it is a refusal and not a bug
REFUSALS = {
    # the attention is not a layout any handler covers (fused QKV, T5's shared position bias, whole-width
    # q/k norms and fused MoE experts have theirs): the reshape into heads is refused, naming the module
    "unrecognised attention layout": r"splits a channel axis into several axes|splits channels into pieces of fixed",
    # the head pattern found no attention it can handle: the message names what it saw
    "no removable heads": r"nothing to remove at granularity head",
    # MoE routers pick experts with top-k: expert removal belongs to the MoE issue
    "MoE routing": r"unsupported op torch\.(topk|sort|argsort|scatter|index_add|bincount|one_hot)",
    # an op the graph cannot follow (recurrent/state-space kernels, custom ops) names itself
    "other unsupported op": r"unsupported op |the dependency graph could not follow ",
    # the trace of a module failed (Llama 4's router returns a tuple): refused naming the module
    "trace failure": r"tracing failed in '",
    # the pruned model was run and failed (a size read from an attribute the handler does not know):
    # the model is restored and the message names the module
    "forward check": r"the pruned model fails in",
}
# a hand-written handler, the generic one (BART: its own test below), a fused QKV with per-head rows and
# one with ALiBi slopes kept per head (tests/structural/test_hf_fused.py checks every fused family)
FAST = ("qwen3", "olmo", "gpt_neox", "bloom")


def _archs(names=None):
    return [a for a in hf_zoo.architectures() if names is None or a.model_type in names]


def _check(arch, pattern, tmp_path):
    result = hf_zoo.sweep_one(arch, pattern, str(tmp_path / f"{arch.model_type}-{pattern.replace('+', '_')}"))
    if result["status"] == "refused":
        reason = result["reason"]
        assert any(re.search(rx, reason) for rx in REFUSALS.values()), f"{arch.model_type}/{pattern}: {reason}"
    elif result["status"] == "ok":
        assert result["params_after"] < result["params_before"]
        assert result["max_abs_diff"] <= 1e-5, result
        zero = result["zero_unit"]
        assert zero["exact"] or zero["checked"] == 0, result  # 0: every group passes through a norm
    return result


@pytest.mark.parametrize("pattern", hf_zoo.PATTERNS)
@pytest.mark.parametrize("arch", _archs(FAST), ids=lambda a: a.model_type)
def test_fast_subset_prunes_and_reloads_exactly(arch, pattern, tmp_path):
    result = _check(arch, pattern, tmp_path)
    assert result["status"] == "ok", result  # these are known to work: a refusal is a regression


@pytest.mark.slow
@pytest.mark.parametrize("arch", _archs(), ids=lambda a: a.model_type)
def test_every_architecture_prunes_and_reloads_or_is_refused_for_a_listed_reason(arch, tmp_path):
    for pattern in hf_zoo.PATTERNS:
        if _check(arch, pattern, tmp_path)["status"] == "unbuilt":
            pytest.skip("the tiny config does not build or run with token ids alone")


def test_a_config_that_would_reload_differently_is_not_written(tmp_path):
    """Gemma scales its embeddings by sqrt(hidden_size): after removing hidden channels, a config
    with the new hidden_size has the right shapes but a stock reload would compute other logits."""
    import secateurs

    model = hf_zoo.build(next(a for a in hf_zoo.architectures() if a.model_type == "gemma"))
    batch = hf_zoo.inputs(model)
    secateurs.prune(model, "magnitude", 0.25, pattern="hidden", mode="remove", example_inputs=batch,
                    progress=False, structural={"latency": False})  # fmt: skip
    assert model.config.hidden_size == 32  # not written: it would change the embedding scale
    assert not config_expressible(model)
    save_structured(model, tmp_path / "m")
    torch.testing.assert_close(hf_zoo.logits(load_structured(tmp_path / "m"), batch), hf_zoo.logits(model, batch))


def test_generic_attention_keeps_grouped_query_heads_valid():
    """Attention modules without a hand-written handler (Qwen3's is hand-registered; BART's self- and
    cross-attention are not) get the generic one; cross-attention heads really leave."""
    import secateurs
    from secateurs.structural.handlers import handler_for
    from secateurs.structural.hf_attention import GENERIC

    arch = next(a for a in hf_zoo.architectures() if a.model_type == "qwen3")
    model = hf_zoo.build(arch)
    attn = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    assert handler_for(attn) is not None
    bart = hf_zoo.build(
        hf_zoo.Arch("bart", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "BartForConditionalGeneration")
    )
    cross = bart.model.decoder.layers[0].encoder_attn
    assert handler_for(cross) is GENERIC  # cross-attention, no hand-written handler
    secateurs.prune(bart, "magnitude", 0.5, pattern="head", mode="remove", example_inputs=hf_zoo.inputs(bart),
                    progress=False, structural={"latency": False})  # fmt: skip
    assert cross.q_proj.out_features == cross.k_proj.out_features == 16


def test_a_norm_over_the_whole_query_width_is_cut_with_the_heads(tmp_path):
    """OLMo 2 normalises the whole query (key) projection: that norm's weight loses the removed heads'
    entries, and the pruned model reloads exactly."""
    import secateurs

    model = hf_zoo.build(next(a for a in hf_zoo.architectures() if a.model_type == "olmo2"))
    batch = hf_zoo.inputs(model)
    attn = model.model.layers[0].self_attn
    weight = attn.q_norm.weight.detach().clone().reshape(4, 8)
    secateurs.prune(model, "magnitude", 0.5, pattern="head", mode="remove", example_inputs=batch, progress=False,
                    structural={"latency": False})  # fmt: skip
    assert attn.q_proj.out_features == attn.q_norm.weight.shape[0] == 16
    kept = attn.q_norm.weight.detach().reshape(2, 8)
    assert all(any(torch.equal(row, old) for old in weight) for row in kept)
    save_structured(model, tmp_path / "m")
    torch.testing.assert_close(hf_zoo.logits(load_structured(tmp_path / "m"), batch), hf_zoo.logits(model, batch))


def test_t5_heads_leave_every_layer_of_a_stack_that_shares_the_position_bias(tmp_path):
    """T5's first layer computes a per-head position bias every later layer of its stack reads: head h
    is one unit across the stack, so the bias keeps matching every layer, and the model reloads."""
    import secateurs

    model = hf_zoo.build(next(a for a in hf_zoo.architectures() if a.model_type == "t5"))
    batch = hf_zoo.inputs(model)
    first = model.encoder.block[0].layer[0].SelfAttention
    table = first.relative_attention_bias.weight.detach().clone()
    secateurs.prune(model, "magnitude", 0.25, pattern="head", mode="remove", example_inputs=batch, progress=False,
                    structural={"latency": False})  # fmt: skip
    encoder = [b.layer[0].SelfAttention for b in model.encoder.block]
    assert {a.n_heads for a in encoder} == {3} and first.relative_attention_bias.weight.shape == (32, 3)
    assert all(any(torch.equal(col, old) for old in table.T) for col in first.relative_attention_bias.weight.T)
    save_structured(model, tmp_path / "m")
    torch.testing.assert_close(hf_zoo.logits(load_structured(tmp_path / "m"), batch), hf_zoo.logits(model, batch))
    assert hf_zoo.zero_unit_check_model(hf_zoo.build(next(a for a in hf_zoo.architectures()
                                                          if a.model_type == "t5")), "head")["exact"]  # fmt: skip


def test_vision_transformer_heads_and_neurons_are_removed_and_reload(tmp_path):
    """transformers' ViT (patch embedding, CLS token, position table): the generic handler takes its
    query/key/value attention; heads and MLP neurons leave and the model reloads exactly."""
    import secateurs

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=5)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32)}
    before = sum(p.numel() for p in model.parameters())
    secateurs.prune(model, "magnitude", 0.3, pattern="head+channel", mode="remove", example_inputs=batch,
                    progress=False, structural={"latency": False})  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) < before
    assert model.vit.layers[0].attention.q_proj.out_features < 32
    save_structured(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(load_structured(tmp_path / "m")(**batch).logits, model(**batch).logits)
