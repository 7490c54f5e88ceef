"""Heads of fused query/key/value projections (Falcon, GPT-NeoX, BLOOM, MPT, Phi-3), Phi-3's fused
gate/up neurons, ALiBi slopes, and tensors transformers renames on save (fused MoE experts).

The zero-unit check is the specification: silence chosen heads (their rows of the fused projection,
their columns of the output projection), remove exactly those heads, and the logits must not move. A
head mapped to another head's rows of the fused weight, or a head that lost its ALiBi slope, moves them.
"""

from __future__ import annotations

import pytest
import torch

from secateurs import hf_zoo
from secateurs.structural import load_structured, save_structured
from secateurs.structural.hf import config_expressible
from secateurs.structural.hf_fused import alibi_quirks, layout_of

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

#: (model type, config changes): every row order and key/value sharing of the five families
VARIANTS = {
    "falcon-multi-query": ("falcon", {}),
    "falcon-new-architecture-gqa": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-per-head": ("falcon", {"multi_query": False, "num_kv_heads": 4}),
    "gpt_neox": ("gpt_neox", {}),
    "bloom": ("bloom", {}),
    "mpt": ("mpt", {}),
    "phi3": ("phi3", {}),
}


def _model(variant: str) -> torch.nn.Module:
    model_type, changes = VARIANTS[variant]
    arch = next(a for a in hf_zoo.architectures() if a.model_type == model_type)
    config = hf_zoo.tiny_config(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return getattr(transformers, arch.class_name)(config).eval()


def _prune(model, pattern: str, sparsity: float = 0.3):
    import secateurs

    secateurs.prune(model, "magnitude", sparsity, pattern=pattern, mode="remove", example_inputs=hf_zoo.inputs(model),
                    progress=False, structural={"latency": False})  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_silenced_heads_of_a_fused_projection_leave_the_logits_unchanged_when_removed(variant):
    model = _model(variant)
    attn = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    assert layout_of(attn)[0] is not None
    result = hf_zoo.zero_unit_check_model(model, "head")
    assert result["checked"] == 2 and result["exact"], result


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["falcon-new-architecture-gqa", "bloom", "phi3"])
def test_pruned_fused_heads_reload_exactly(variant, tmp_path):
    model = _model(variant)
    batch = hf_zoo.inputs(model)
    _prune(model, "head+channel")
    save_structured(model, tmp_path / "m")
    torch.testing.assert_close(hf_zoo.logits(load_structured(tmp_path / "m"), batch), hf_zoo.logits(model, batch),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_falcon_with_alibi_heads_is_refused_before_anything_changes():
    from secateurs.errors import StructureError

    model = _model("falcon-multi-query")
    model.config.alibi = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StructureError, match="alibi=True"):
        _prune(model, "head")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fused_gate_up_neurons_are_removed_in_pairs():
    model = _model("phi3")
    mlp = model.model.layers[0].mlp
    _prune(model, "channel", 0.25)
    assert mlp.gate_up_proj.out_features == 2 * mlp.down_proj.in_features == 2 * 48
    assert hf_zoo.zero_unit_check_model(_model("phi3"), "channel")["exact"]


def test_alibi_heads_keep_their_slopes_and_the_config_keeps_the_head_count():
    """BLOOM builds one ALiBi bias from the config's head count: fewer heads would get other slopes, so
    the pruned model is never described by a stock config, and without the kept slopes it computes
    something else (the check above would fail)."""
    model = _model("bloom")
    batch = hf_zoo.inputs(model)
    _prune(model, "head", 0.5)
    assert model.config.n_head == 4 and not config_expressible(model) and alibi_quirks(model)
    pruned = hf_zoo.logits(model, batch)
    attn = model.transformer.h[0].self_attention
    hook = next(iter(attn._forward_pre_hooks))
    kept = attn._forward_pre_hooks.pop(hook)
    bias = model.transformer.h[0].self_attention
    saved = bias.__dict__["_secateurs_alibi_heads"]
    assert len(saved) == 2
    try:  # the two kept heads swap slopes: other logits
        bias.__dict__["_secateurs_alibi_heads"] = saved[::-1]
        attn._forward_pre_hooks[hook] = kept
        assert not torch.allclose(hf_zoo.logits(model, batch), pruned)
    finally:
        bias.__dict__["_secateurs_alibi_heads"] = saved
    torch.testing.assert_close(hf_zoo.logits(model, batch), pruned)


def test_a_stock_config_with_renamed_expert_tensors_reloads_through_load_structured(tmp_path):
    """Mixtral's fused experts are saved per expert; a folder its config describes is reloaded by
    stock from_pretrained, which maps the names back, also when asked through load_structured."""
    arch = next(a for a in hf_zoo.architectures() if a.model_type == "mixtral")
    model = hf_zoo.build(arch)
    batch = hf_zoo.inputs(model)
    _prune(model, "head")
    assert config_expressible(model)
    save_structured(model, tmp_path / "m")
    torch.testing.assert_close(hf_zoo.logits(load_structured(tmp_path / "m"), batch), hf_zoo.logits(model, batch))


def test_moe_heads_whose_config_cannot_describe_them_reload_with_in_memory_tensor_names(tmp_path):
    """Qwen2-MoE with heads removed unevenly: saved under the in-memory names load_structured replays onto."""
    arch = next(a for a in hf_zoo.architectures() if a.model_type == "qwen2_moe")
    model = hf_zoo.build(arch)
    batch = hf_zoo.inputs(model)
    _prune(model, "head")
    save_structured(model, tmp_path / "m")
    torch.testing.assert_close(hf_zoo.logits(load_structured(tmp_path / "m"), batch), hf_zoo.logits(model, batch))


def test_alibi_slopes_survive_several_removals_and_their_replay(tmp_path):
    """Heads removed in two steps, then hidden channels (which update the attention again): the kept slopes
    compose, and load_structured, replaying every step in one surgery, rebuilds the same model."""
    model = _model("bloom")
    batch = hf_zoo.inputs(model)
    _prune(model, "head", 0.25)
    _prune(model, "head", 0.34)
    _prune(model, "hidden", 0.25)  # cuts the attention's input columns: its update runs again
    attn = model.transformer.h[0].self_attention
    assert attn.query_key_value.in_features == 24
    assert len(attn.__dict__["_secateurs_alibi_heads"]) == attn.num_heads == 2
    save_structured(model, tmp_path / "m")
    again = load_structured(tmp_path / "m")
    assert (
        again.transformer.h[0].self_attention.__dict__["_secateurs_alibi_heads"]
        == attn.__dict__["_secateurs_alibi_heads"]
    )
    torch.testing.assert_close(hf_zoo.logits(again, batch), hf_zoo.logits(model, batch), rtol=0, atol=1e-6)


def test_a_config_property_derived_from_other_fields_is_not_fitted():
    """FalconConfig.head_dim is a read-only property (hidden_size // num_attention_heads): fitting it
    would raise; the fields it derives from are fitted instead."""
    from secateurs.structural.hf_config import _fields

    fields = _fields(hf_zoo.tiny_config("falcon"))
    assert "head_dim" not in fields and "num_attention_heads" in fields and "hidden_size" in fields
