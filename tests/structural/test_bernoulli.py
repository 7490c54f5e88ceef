"""Forward-only Bernoulli-mask structural pruning (Gao et al. 2024, arXiv:2406.10576)."""

from __future__ import annotations

import copy

import pytest
import torch

import secateurs
from secateurs.errors import ConfigError
from secateurs.structural.bernoulli import project_to_budget

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _calibration():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (2, 24), generator=g) for _ in range(3)]


def test_projection_meets_the_budget_within_bounds():
    theta = torch.tensor([0.9, 0.1, 0.5, 0.99, 0.3], dtype=torch.float64)
    cost = torch.tensor([1.0, 2.0, 1.0, 3.0, 0.5], dtype=torch.float64)
    out = project_to_budget(theta, cost, 3.0)
    assert float((out * cost).sum()) == pytest.approx(3.0, abs=1e-9)
    assert bool((out >= 1e-3).all() and (out <= 1 - 1e-3).all())
    with pytest.raises(ConfigError, match="outside what the units can hold"):
        project_to_budget(theta, cost, 100.0)


def test_search_runs_no_backward_pass_and_removes_the_budget(monkeypatch):
    model = _llama()
    seen = []
    model.lm_head.register_forward_hook(
        lambda m, a, o: seen.append((torch.is_grad_enabled(), any(p.requires_grad for p in model.parameters())))
    )

    def no_backward(*args, **kwargs):
        raise AssertionError("a backward pass ran")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    before = sum(p.numel() for p in model.parameters())
    report = secateurs.prune(model, "bernoulli", 0.3, mode="remove", calibration=_calibration(), progress=False,
                             method_options={"steps": 4, "samples": 3}, structural={"latency": False})  # fmt: skip
    searched = [s for s in seen if s == (False, False)]
    assert len(searched) >= 4 * 3  # every sampled pass: no grad mode, every parameter frozen
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())
    assert report.after.params < before
    with torch.no_grad():
        assert torch.isfinite(model(_calibration()[0]).logits).all()


def test_search_moves_the_probabilities_away_from_the_initialisation():
    model = _llama()
    from secateurs.structural.bernoulli import Bernoulli

    crit = Bernoulli(steps=6, samples=3, lr=0.1)
    secateurs.prune(copy.deepcopy(model), method=crit, sparsity=0.3, mode="remove", calibration=_calibration(),
                    progress=False, structural={"latency": False})  # fmt: skip
    assert len(crit.history_) == 6
    assert float((crit.theta_ - crit.initial_).abs().max()) > 0.05


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="samples must be an integer >= 2"):
        secateurs.PruneConfig(method="bernoulli", sparsity=0.3, mode="remove", method_options={"samples": 1})
    with pytest.raises(ConfigError, match="init must be one of"):
        secateurs.PruneConfig(method="bernoulli", sparsity=0.3, mode="remove", method_options={"init": "magic"})


def test_a_budget_that_would_empty_a_layer_keeps_whole_gqa_groups():
    model = _llama()
    structural = {"latency": False, "gqa": "kv_groups"}
    options = {"steps": 2, "samples": 2}
    secateurs.prune(model, "bernoulli", 0.9, mode="remove", calibration=_calibration(), progress=False,
                    method_options=options, structural=structural)  # fmt: skip
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.k_proj.out_features >= attention.head_dim  # at least one KV group is left
        assert attention.q_proj.out_features == 2 * attention.k_proj.out_features  # 2 query heads per KV head
        assert layer.mlp.up_proj.out_features >= 1
    with torch.no_grad():
        assert torch.isfinite(model(_calibration()[0]).logits).all()


def test_leave_one_out_baseline_cancels_the_batch_and_natural_estimator_is_bounded():
    from secateurs.structural.bernoulli import Bernoulli

    theta = torch.tensor([0.5, 0.01, 0.99], dtype=torch.float64)
    masks = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 3.0], dtype=torch.float64)
    loo = Bernoulli(baseline="leave_one_out", estimator="natural")
    shifted = loo._gradient(masks, losses + 10.0, theta, moving=0.0)  # a harder batch: every loss + 10
    assert torch.allclose(loo._gradient(masks, losses, theta, moving=0.0), shifted)
    # closed form: L_k - L_other = (-1, +1); natural score m - theta
    expected = ((torch.tensor([-1.0, 1.0])[:, None]) * (masks - theta)).mean(0)
    assert torch.allclose(shifted, expected)
    assert float(shifted.abs().max()) <= 1.0  # no 1/(theta (1 - theta)) blow-up near the bounds
    plain = Bernoulli(baseline="moving_average", estimator="score")  # the paper's equation
    expected = ((losses - 2.5)[:, None] * (masks - theta) / (theta * (1 - theta))).mean(0)
    assert torch.allclose(plain._gradient(masks, losses, theta, moving=2.5), expected)
    authors = Bernoulli(baseline="moving_average", estimator="standardised")  # the authors' released code
    expected = ((losses - 2.5)[:, None] * (masks - theta) / (theta * (1 - theta)).sqrt()).mean(0)
    assert torch.allclose(authors._gradient(masks, losses, theta, moving=2.5), expected)
    with pytest.raises(ConfigError, match="baseline must be one of"):
        Bernoulli(baseline="median")
    with pytest.raises(ConfigError, match="estimator must be one of"):
        Bernoulli(estimator="adam")


def _four_blocks():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_whole_block_masks_skip_blocks_during_the_search_and_remove_them(monkeypatch):
    from secateurs.structural.bernoulli import Bernoulli

    model = _four_blocks()
    skipped = []

    def no_backward(*args, **kwargs):
        raise AssertionError("a backward pass ran")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    crit = Bernoulli(steps=5, samples=3, lr=0.1, eval_every=0)  # the samples only: theta_ is what is kept
    original = crit._search

    def spy(model_, evidence, theta, cost, budget, apply, *rest):
        def watched(mask):
            skipped.append(mask.clone())
            apply(mask)

        return original(model_, evidence, theta, cost, budget, watched, *rest)

    crit._search = spy
    dense = copy.deepcopy(model)
    report = secateurs.prune(model, method=crit, sparsity=0.5, pattern="layer", mode="remove",
                             calibration=_calibration(), progress=False, structural={"latency": False})  # fmt: skip
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert report.after.params < report.before.params
    assert len(crit.history_) == 5 and len(skipped) == 15
    assert float(crit.theta_.sum()) == pytest.approx(2.0, abs=1e-6)  # the budget: 4 - 2 blocks in expectation
    kept = torch.argsort(crit.theta_, descending=True)[:2].sort().values.tolist()
    expected = [dense.model.layers[i] for i in kept]
    for got, want in zip(model.model.layers, expected):
        assert torch.equal(got.mlp.up_proj.weight, want.mlp.up_proj.weight)  # the two most probable blocks stay

    # a dropped block is the identity: with block 1 masked, the logits equal those of the model without it
    from secateurs.structural.bernoulli import _BlockSkip

    ids = _calibration()[0]
    skip = _BlockSkip(list(dense.model.layers))
    skip.set(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with torch.no_grad():
        masked = dense(ids).logits
    skip.remove()
    shallow = copy.deepcopy(dense)
    del shallow.model.layers[1]
    shallow.config.num_hidden_layers = 3
    for i, layer in enumerate(shallow.model.layers):
        layer.self_attn.layer_idx = i
    with torch.no_grad():
        assert torch.allclose(masked, shallow(ids).logits, atol=1e-5)


@pytest.mark.parametrize("method", ["random", "shortgpt", "bernoulli"])
def test_every_block_criterion_takes_the_removal_count(method):
    model = _four_blocks()
    options = {"method_options": {"steps": 2, "samples": 2}} if method == "bernoulli" else {}
    secateurs.prune(model, method, 0.25, pattern="layer", mode="remove", calibration=_calibration(), progress=False,
                    structural={"latency": False}, **options)  # fmt: skip
    assert len(model.model.layers) == 3


def test_a_block_criterion_without_the_removal_count_still_works():
    from secateurs.structural.criteria import GroupCriterion

    class Oldest(GroupCriterion):  # a third-party criterion written against the three-argument signature
        name = "oldest_block_test"
        granularities = ("layer",)
        default_pattern = "layer"

        def block_scores(self, model, blocks, evidence):
            return torch.arange(len(blocks), dtype=torch.float64)  # the first block scores lowest

    model = _four_blocks()
    second = model.model.layers[1]
    secateurs.prune(model, method=Oldest(), sparsity=0.25, pattern="layer", mode="remove", calibration=_calibration(),
                    progress=False, structural={"latency": False})  # fmt: skip
    assert len(model.model.layers) == 3 and model.model.layers[0] is second


def _toy_search(options: dict, seed: int, theta=None):
    """Eight units, keep three; dropping unit u costs ``w[u]`` (the best three: 5, 6, 7), on four batches of
    very different difficulty (an offset up to 3, ten times the largest unit effect)."""
    import types

    from torch import nn

    from secateurs.structural.bernoulli import Bernoulli

    w = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4], dtype=torch.float64)
    offsets = [0.0, 3.0, 1.0, 2.5]
    state = {}

    def loss_fn(model, batch):
        return torch.tensor(offsets[int(batch)] + float((w * (1 - state["m"])).sum()))

    ev = types.SimpleNamespace(batches=[torch.tensor(i) for i in range(4)], loss_fn=loss_fn,
                               generator=torch.Generator().manual_seed(seed), show_progress=False)  # fmt: skip
    cost = torch.ones(8, dtype=torch.float64)
    crit = Bernoulli(**options)
    start = project_to_budget(torch.full_like(cost, 0.5) if theta is None else theta, cost, 3.0, crit.eps)

    def top3(t):
        return torch.zeros(8, dtype=torch.float64).index_fill_(0, torch.argsort(t, descending=True)[:3], 1.0)

    out = crit._search(nn.Linear(1, 1), ev, start, cost, 3.0, lambda m: state.__setitem__("m", m), top3)
    return crit, out, top3


OLD_DEFAULTS = {
    "update": "max_normalised",
    "estimator": "score",
    "baseline": "moving_average",
    "eps": 1e-3,
    "lr": 0.05,
    "init_spread": 0.8,
    "eval_every": 0,
}  # the first implementation (before 2026-12-01)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_default_search_finds_the_known_optimum(seed):
    crit, out, _ = _toy_search({"steps": 150}, seed)  # from uniform probabilities
    assert sorted(torch.argsort(crit.theta_, descending=True)[:3].tolist()) == [5, 6, 7]  # the last probabilities
    assert sorted(torch.argsort(out, descending=True)[:3].tolist()) == [5, 6, 7]  # and the kept ones
    # the first implementation does not get there: the batch offsets swamp its moving baseline
    old, _, _ = _toy_search({**OLD_DEFAULTS, "steps": 150}, seed)
    assert sorted(torch.argsort(old.theta_, descending=True)[:3].tolist()) != [5, 6, 7]


def test_the_kept_probabilities_are_the_best_measured_deterministic_mask():
    # a search that wanders (the old max-normalised step, moving baseline) from a start that keeps the optimum
    start = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9, 0.9], dtype=torch.float64)
    options = {"steps": 60, "update": "max_normalised", "estimator": "score", "baseline": "moving_average",
               "eps": 1e-3, "lr": 0.2, "eval_every": 5}  # fmt: skip
    crit, out, _ = _toy_search(options, 0, start)
    measured = [loss for _, _, loss in crit.trace_]
    assert len(measured) == 1 + 60 // 5 and crit.trace_[0][0] == 0
    assert crit.best_loss_ == min(measured) <= measured[0]
    assert measured[-1] > crit.best_loss_  # the search did end on a worse mask: the rule is what kept the best
    assert sorted(torch.argsort(out, descending=True)[:3].tolist()) == [5, 6, 7]
    off, _, _ = _toy_search({**options, "eval_every": 0}, 0, start)  # without the rule: the last probabilities
    assert off.best_loss_ is None and off.trace_ == []


def test_the_search_measures_exactly_the_model_that_remove_builds():
    from secateurs.structural.bernoulli import Bernoulli, search_loss

    model = _llama()
    crit = Bernoulli(steps=6, samples=3, eval_every=2)
    secateurs.prune(model, method=crit, sparsity=0.3, mode="remove", calibration=_calibration(), progress=False,
                    structural={"latency": False, "gqa": "kv_groups"})  # fmt: skip
    assert [s for s, _, _ in crit.trace_] == [0, 2, 4, 6]
    with torch.no_grad():
        cut = sum(float(search_loss(model, b)) for b in _calibration()) / len(_calibration())
    # mean ablation during the search == removal with bias compensation afterwards, to float tolerance
    assert cut == pytest.approx(crit.best_loss_, abs=1e-4)
    assert crit.best_loss_ <= crit.trace_[0][2]


def test_the_best_mask_rule_is_off_with_a_solver_the_search_does_not_model():
    from secateurs.errors import SecateursWarning
    from secateurs.structural.bernoulli import Bernoulli

    crit = Bernoulli(steps=4, samples=2, eval_every=2)
    with pytest.warns(SecateursWarning, match="solver='bias_compensation'"):
        secateurs.prune(_llama(), method=crit, sparsity=0.3, mode="remove", calibration=_calibration(), progress=False,
                        solver="none", structural={"latency": False, "gqa": "kv_groups"})  # fmt: skip
    assert crit.trace_ == [] and crit.best_loss_ is None


def test_a_larger_mask_never_replaces_the_initial_one_however_low_its_loss_but_an_equal_one_does():
    # removal rounds whole units, so the measured masks differ in size; keeping more units lowers the loss for
    # that alone, and the rule must not buy a lower loss with parameters the budget does not have
    import types

    from torch import nn

    from secateurs.structural.bernoulli import Bernoulli

    w = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4], dtype=torch.float64)
    state = {}
    ev = types.SimpleNamespace(batches=[torch.tensor(0)], generator=torch.Generator().manual_seed(0),
                               loss_fn=lambda model, batch: torch.tensor(float((w * (1 - state["m"])).sum())),
                               show_progress=False)  # fmt: skip
    cost = torch.ones(8, dtype=torch.float64)
    calls = []

    def chosen(t):  # the initial mask keeps 3 units (not the best 3); the next keeps the best 4, the last the best 3
        calls.append(1)
        keep = [[0, 1, 7], [4, 5, 6, 7], [5, 6, 7]][len(calls) - 1]
        return torch.zeros(8, dtype=torch.float64).index_fill_(0, torch.tensor(keep), 1.0)

    crit = Bernoulli(steps=10, samples=3, eval_every=5)
    start = project_to_budget(torch.full_like(cost, 0.5), cost, 3.0, crit.eps)
    out = crit._search(nn.Linear(1, 1), ev, start, cost, 3.0, lambda m: state.__setitem__("m", m), chosen)
    measured = [loss for _, _, loss in crit.trace_]
    assert crit.kept_ == [3.0, 4.0, 3.0]
    assert measured[1] < measured[2] < measured[0]  # the larger mask has the lowest loss of all
    # it is passed over; the later mask of the initial size with a lower loss than the initial one is kept
    assert crit.best_loss_ == measured[2] and not torch.equal(out, start)
