"""The block runner on every kind of stack: encoder-decoders (one stack per run, named, or a refusal that
names them), image inputs, and reports that say how much of the model was in scope (mixture-of-experts
fused expert weights, embeddings)."""

from __future__ import annotations

import pytest
import torch

import secateurs
from secateurs.blocks import BlockDiscoveryError
from secateurs.llm import prune_llm

transformers = pytest.importorskip("transformers")
SEGMENTS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _bart():
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config).eval()


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def test_an_encoder_decoder_is_refused_until_a_stack_is_named_and_both_stacks_prune():
    model = _bart()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BlockDiscoveryError, match=r"2 stacks .*'model.decoder.layers'.*'model.encoder.layers'"):
        prune_llm(model, "wanda", 0.5, calibration=SEGMENTS, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    encoder = prune_llm(model, "wanda", 0.5, calibration=SEGMENTS, blocks="model.encoder.layers", progress=False)
    decoder = prune_llm(model, "wanda", 0.5, calibration=SEGMENTS, blocks="model.decoder.layers", progress=False)
    assert {len(encoder.layers), len(decoder.layers)} == {12, 20}  # q/k/v/o/fc1/fc2 (+ cross-attention q/k/v/o)
    assert encoder.sparsity == decoder.sparsity == 0.5


def test_a_t5_decoder_is_calibrated_on_the_same_tokens_when_no_decoder_inputs_are_given():
    model = _t5()
    report = prune_llm(model, "sparsegpt", 0.5, calibration=SEGMENTS, blocks="decoder.block", progress=False)
    assert report.sparsity == 0.5 and all("decoder" in layer.name for layer in report.layers)


def test_image_calibration_runs_through_the_block_runner():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)  # fmt: skip
    images = torch.randn(4, 3, 32, 32)
    for run in (
        lambda m: prune_llm(m, "wanda", 0.5, calibration=images, batch_size=2, progress=False),
        lambda m: secateurs.prune(
            m, "sparsegpt", 0.5, runner="blocks", calibration=[images[:2], images[2:]], progress=False
        ),
    ):
        model = transformers.ViTModel(config).eval()
        report = run(model)
        assert len(report.layers) == 12 and report.sparsity == 0.5
        with torch.no_grad():
            assert torch.isfinite(model(images).last_hidden_state).all()


def test_a_report_says_what_share_of_the_model_was_in_scope_and_counts_the_fused_experts():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    report = prune_llm(model, "wanda", 0.5, calibration=SEGMENTS, progress=False, min_expert_tokens=1)
    # the fused 3-D experts are targets (issue 16: they used to be left out, so 'pruned to 50%' kept them dense)
    assert report.sparsity == 0.5 and report.coverage > 0.25
    names = [t["name"] for t in report.left_out]
    assert not any(".experts." in n for n in names) and "model.embed_tokens.weight" in names
    assert any(layer.name.startswith("model.layers.0.mlp.experts.0.") for layer in report.layers)
    text = report.table()
    assert "coverage: " in text and "largest weights left out: model.embed_tokens.weight" in text
    assert report.to_dict()["coverage"] == pytest.approx(report.coverage)
