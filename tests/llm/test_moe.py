"""Mixture-of-experts: expert removal (REAP, frequency, random) on tiny Mixtral / Qwen2-MoE / Qwen3-MoE with a
save/load round trip, the top-k refusal, unknown MoE blocks refused, and pruning inside the fused experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import ConfigError, DataRequiredError
from secateurs.llm import prune_llm
from secateurs.llm.moe import MOE_BLOCKS, MoESpec, expert_statistics, find_moe_blocks, prune_experts, register_moe

from .conftest import CONTEXT, HIDDEN, VOCAB, assert_same_bits, state_bits

transformers = pytest.importorskip("transformers")

MOE = {
    "mixtral": ("Mixtral", {"num_local_experts": 8, "intermediate_size": 32}),
    "qwen2_moe": (
        "Qwen2Moe",
        {
            "num_experts": 8,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
        },
    ),
    "qwen3_moe": ("Qwen3Moe", {"num_experts": 8, "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
}


def tiny_moe(name: str, seed: int = 0) -> nn.Module:
    prefix, extra = MOE[name]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, num_experts_per_tok=2, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("arch", "saliency"),
    [
        ("mixtral", "reap"),
        pytest.param("mixtral", "frequency", marks=pytest.mark.slow),
        pytest.param("mixtral", "random", marks=pytest.mark.slow),
        ("qwen2_moe", "reap"),
        ("qwen3_moe", "reap"),
    ],
)
def test_expert_removal_runs_and_round_trips_through_save_pretrained(arch, saliency, tokens, tmp_path):
    model = tiny_moe(arch)
    before = find_moe_blocks(model)
    routers = {b.name: b.router.weight.detach().clone() for b in before}
    fused = {b.name: b.experts.down_proj.detach().clone() for b in before}
    report = prune_experts(model, 0.25, saliency=saliency, calibration=tokens)
    assert report.experts_before == 8 and report.experts_after == 6
    for b in find_moe_blocks(model):
        kept = report.kept[b.name]
        assert len(kept) == 6 and b.num_experts == 6 and b.router.weight.shape[0] == 6
        torch.testing.assert_close(b.router.weight, routers[b.name][kept])  # the router's rows go with the experts
        torch.testing.assert_close(b.experts.down_proj, fused[b.name][kept])
    assert getattr(model.config, report.config_key) == 6
    with torch.no_grad():
        logits = model(tokens[:2]).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens[:2]).logits, logits)
    if arch == "qwen2_moe":  # the shared expert is not routed, so it is kept whole
        assert model.model.layers[0].mlp.shared_expert.down_proj.weight.shape == (HIDDEN, 64)


def test_reap_ranks_an_expert_whose_output_is_silenced_lowest(tokens):
    model = tiny_moe("mixtral")
    stats = expert_statistics(model, [tokens])
    block = find_moe_blocks(model)[0]
    busiest = int(stats[block.name].tokens.argmax())
    with torch.no_grad():
        block.experts.down_proj[busiest].mul_(1e-3)  # routed as often as ever, but contributes almost nothing
    report = prune_experts(model, count=1, saliency="reap", calibration=tokens)
    assert report.removed[block.name] == [busiest]
    frequency = prune_experts(tiny_moe("mixtral"), count=1, saliency="frequency", calibration=tokens)
    assert frequency.removed[block.name] != [busiest]  # frequency alone keeps it


def test_removing_so_many_that_fewer_than_top_k_remain_is_refused_untouched(tokens):
    model = tiny_moe("qwen3_moe")
    bits = state_bits(model)
    with pytest.raises(ConfigError, match=r"at most 6 may be removed"):
        prune_experts(model, count=7, saliency="random")
    with pytest.raises(ConfigError, match="exactly one of fraction"):
        prune_experts(model, 0.25, count=2, saliency="random")
    with pytest.raises(ConfigError, match="needs calibration"):
        prune_experts(model, 0.25, saliency="reap")
    assert_same_bits(bits, state_bits(model))
    assert model.config.num_experts == 8


class ToyExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8, 8))


class ToyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = ToyExperts()

    def forward(self, x):
        return x + torch.einsum("btd,edf->btf", x, self.experts.weight) * self.router(x).softmax(-1).mean()


class OldStyleMoE(nn.Module):
    """The older layout: a router and a ModuleList of per-expert Linear MLPs, each called on its routed tokens."""

    def __init__(self, experts: int = 4, width: int = 16) -> None:
        super().__init__()
        self.gate = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, width))
                                     for _ in range(experts))  # fmt: skip
        self.seen = [0] * experts

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.gate(flat).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, position = torch.where(index == e)
            self.seen[e] += len(token)
            out.index_add_(0, token, expert(flat[token]) * weights[token, position, None])
        return x + out.reshape(x.shape)


def test_an_unknown_moe_block_is_refused_by_name_with_the_hook_to_register_it(tokens):
    model = nn.Sequential(ToyMoE())
    with pytest.raises(ConfigError, match=r"'0' \(ToyMoE\).*register_moe\(.*ToyMoE"):
        prune_experts(model, count=1, saliency="random")
    with pytest.raises(ConfigError, match=r"ToyMoE"):  # its fused experts would stay dense: refused
        prune_llm(model, "magnitude", 0.5, blocks="", progress=False)
    old = nn.Sequential(OldStyleMoE(), OldStyleMoE())
    with pytest.raises(ConfigError, match=r"OldStyleMoE.*register_moe"):  # removal needs to know the router
        prune_experts(old, count=1, saliency="random")
    # inside per-expert Linear experts, pruning needs nothing more: each expert's statistics are its routed tokens
    x = torch.randn(64, 8, 16, generator=torch.Generator().manual_seed(0))
    report = prune_llm(old, "wanda", 0.5, blocks="", calibration=[x[i : i + 8] for i in range(0, 64, 8)],
                       progress=False)  # fmt: skip
    expert_layers = [r for r in report.layers if ".experts." in r.name]
    assert len(expert_layers) == 2 * 4 * 2
    assert all(r.nonzeros == r.params // 2 for r in expert_layers)
    register_moe(ToyMoE, MoESpec(router="router"))
    try:  # registered, but not the fused layout: still a clear refusal, naming what is missing
        with pytest.raises(ConfigError, match="has no 'gate_up_proj'"):
            find_moe_blocks(model)
    finally:
        MOE_BLOCKS.pop(f"{ToyMoE.__module__}.{ToyMoE.__qualname__}")


@pytest.mark.parametrize(
    "method", ["wanda", pytest.param("sparsegpt", marks=pytest.mark.slow), pytest.param("alps", marks=pytest.mark.slow)]
)
def test_a_mixtral_pruned_to_half_prunes_every_expert_to_half(method, tokens):
    """Before this, the fused 3-D expert parameters were not targets: a Mixtral 'pruned to 50%' kept every
    expert dense."""
    model = tiny_moe("mixtral")
    report = prune_llm(model, method, 0.5, calibration=tokens, progress=False, min_expert_tokens=1)
    names = [layer.name for layer in report.layers]
    assert sum(".experts." in n for n in names) == 2 * 8 * 2  # 2 blocks x 8 experts x (gate_up, down)
    for b in find_moe_blocks(model):
        for e in range(b.num_experts):
            for weight in (b.experts.gate_up_proj[e], b.experts.down_proj[e]):
                assert int((weight == 0).sum()) == weight.numel() // 2, (b.name, e)
    assert isinstance(model.model.layers[0].mlp.experts, transformers.models.mixtral.modeling_mixtral.MixtralExperts)
    with torch.no_grad():
        assert torch.isfinite(model(tokens[:2]).logits).all()


def test_expert_removal_without_calibration_reaching_the_experts_is_refused_untouched():
    model = tiny_moe("mixtral")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(DataRequiredError, match="no calibration token reached"):
        prune_experts(model, 0.25, saliency="reap", calibration=torch.zeros(0, 16, dtype=torch.long))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(ConfigError, match="min_expert_tokens"):
        prune_llm(model, "wanda", 0.5, calibration=torch.zeros(1, 8, dtype=torch.long), min_expert_tokens=0)


def test_routers_and_the_shared_expert_gate_are_left_dense(tokens):
    """Pruning a router or Qwen2-MoE's shared-expert gate changes where tokens go, not one expert's weights."""
    model = tiny_moe("qwen2_moe")
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("shared_expert_gate.weight",
                                                                                     "mlp.gate.weight"))}  # fmt: skip
    assert any("shared_expert_gate" in n for n in kept)
    report = prune_llm(model, "wanda", 0.5, calibration=tokens, progress=False, min_expert_tokens=1)
    assert not any(n.endswith(("shared_expert_gate", "mlp.gate")) for n in (layer.name for layer in report.layers))
    params = dict(model.named_parameters())
    for name, value in kept.items():
        assert torch.equal(params[name], value), name


def test_n_m_inside_experts_and_statistics_counted_by_routed_tokens(tokens):
    model = tiny_moe("qwen3_moe")
    stats = expert_statistics(model, [tokens])
    block = find_moe_blocks(model)[0]
    counts = stats[block.name].tokens
    assert int(counts.sum()) == tokens.numel() * 2  # every token goes to top-2 experts
    prune_llm(model, "wanda", pattern="2:4", calibration=tokens, progress=False, min_expert_tokens=1)
    for b in find_moe_blocks(model):
        for weight in (b.experts.gate_up_proj, b.experts.down_proj):
            groups = (weight != 0).reshape(-1, 4).sum(-1)
            assert bool((groups <= 2).all())


def test_an_expert_with_too_few_tokens_falls_back_to_magnitude_and_is_reported(tokens):
    model = tiny_moe("mixtral")
    counts = expert_statistics(model, [tokens])
    block = find_moe_blocks(model)[0]
    fewest = int(counts[block.name].tokens.argmin())
    threshold = int(counts[block.name].tokens.min()) + 1
    dense = block.experts.gate_up_proj[fewest].detach().clone()
    report = prune_llm(model, "sparsegpt", 0.5, calibration=tokens, progress=False, min_expert_tokens=threshold)
    name = f"{block.name}.experts.{fewest}"
    assert name in report.details.fallbacks and "magnitude" in report.details.fallbacks[name]
    pruned = block.experts.gate_up_proj[fewest]
    kept = pruned != 0
    assert int(kept.sum()) == dense.numel() // 2
    assert torch.equal(pruned[kept], dense[kept])  # magnitude: the survivors are untouched ...
    assert float(dense[kept].abs().min()) >= float(dense[~kept].abs().max())  # ... and the largest
    assert any(name in line for line in report.details.lines("uniform"))
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


def test_mask_mode_is_refused_on_fused_experts_before_anything_changes(tokens):
    model = tiny_moe("mixtral")
    bits = state_bits(model)
    with pytest.raises(ConfigError, match="mode='bake' or 'reconstruct'"):
        prune_llm(model, "wanda", 0.5, mode="mask", calibration=tokens, progress=False)
    assert_same_bits(bits, state_bits(model))


def test_an_unmeasured_sensitivity_profile_is_refused_on_fused_experts_before_anything_changes(tokens):
    model = tiny_moe("mixtral")
    bits = state_bits(model)
    with pytest.raises(ConfigError, match="fused mixture-of-experts weights, which the analysis does not unfuse"):
        prune_llm(model, "wanda", 0.5, allocation="sensitivity", calibration=tokens, progress=False)
    assert_same_bits(bits, state_bits(model))
