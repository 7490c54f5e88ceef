"""SparseGPT: reconstruction quality against Wanda and magnitude, exactness, N:M, damping retries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
from secateurs.hessian import CholeskyError, HessianAccumulator, inverse_factor
from secateurs.patterns import NM
from secateurs.solvers.sparsegpt import block_prune_counts, sparsegpt


def _layer_and_inputs(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """A layer and inputs whose channels differ in scale and are correlated, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=g))
    mixing = torch.randn(64, 64, generator=g) / 8
    scales = torch.exp(torch.randn(64, generator=g))
    x = (torch.randn(2048, 64, generator=g) @ (torch.eye(64) + mixing)) * scales
    return layer, x


def _prune(method: str, layer: nn.Linear, x: torch.Tensor, pattern: str) -> torch.Tensor:
    """One layer pruned through the pipeline (whole-model runner), zeros baked or reconstructed."""
    model = nn.Sequential(layer)
    sparsity = None if ":" in pattern else 0.5
    comparison = "layer" if method == "magnitude" else None  # the Wanda paper's magnitude baseline ranks per layer
    secateurs.prune(model, method, sparsity, pattern=pattern, comparison=comparison, calibration=[x],
                    mode="reconstruct" if method == "sparsegpt" else "bake", scope={"skip_last": False},
                    progress=False)  # fmt: skip
    return layer.weight.detach().clone()


@pytest.mark.parametrize("pattern", ["element", "2:4"], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_wanda_than_magnitude(pattern):
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        layer, x = _layer_and_inputs()
        dense_out = x @ layer.weight.detach().t()
        pruned = _prune(method, layer, x, pattern)
        errors[method] = float((dense_out - x @ pruned.t()).norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_reconstruction_improves_a_fixed_wanda_mask():
    """The solver on its own (mode='reconstruct' with another criterion's mask): same mask as Wanda's,
    smaller output error, because the surviving weights absorb the pruned ones' contribution."""
    layer, x = _layer_and_inputs()
    dense_out = x @ layer.weight.detach().t()
    wanda = _prune("wanda", layer, x, "element")
    layer, x = _layer_and_inputs()
    secateurs.prune(nn.Sequential(layer), "wanda", 0.5, calibration=[x], mode="reconstruct", solver="sparsegpt",
                    scope={"skip_last": False}, progress=False)  # fmt: skip
    solved = layer.weight.detach()
    assert torch.equal(solved == 0, wanda == 0)
    # here the mask matters most (input scales differ 20x); the update still takes a tenth off the error
    assert float((dense_out - x @ solved.t()).norm()) < 0.95 * float((dense_out - x @ wanda.t()).norm())


def test_sparsegpt_meets_the_layer_sparsity_exactly_for_any_block_size():
    layer, x = _layer_and_inputs()
    h = HessianAccumulator(64)
    h.add(x)
    for blocksize in (1, 7, 64, 128):
        for sparsity in (0.3, 0.5, 0.77):
            new, keep, _ = sparsegpt(layer.weight, inverse_factor(h.hessian), sparsity, None, blocksize)
            assert int((~keep).sum()) == round(sparsity * keep.numel())
            assert torch.equal(new == 0, ~keep)


def test_cumulative_block_counts_add_up_to_the_layer_total():
    counts = block_prune_counts(rows=7, columns=300, blocksize=128, sparsity=0.37)
    assert len(counts) == 3 and sum(counts) == round(0.37 * 7 * 300)


def test_sparsegpt_n_m_is_valid_and_uses_every_slot():
    layer, x = _layer_and_inputs()
    h = HessianAccumulator(64)
    h.add(x)
    new, keep, _ = sparsegpt(layer.weight, inverse_factor(h.hessian), None, NM(4, 8), blocksize=20)
    assert (keep.reshape(-1, 8).sum(1) == 4).all()
    assert torch.equal(new != 0, keep)


def test_obs_loss_estimates_the_added_error():
    """The OBS estimate sum(w^2 / 2[H^-1]_qq) tracks the true ||(W - W^) X||^2 / n (the H scale)."""
    layer, x = _layer_and_inputs()
    h = HessianAccumulator(64)
    h.add(x)
    new, _, loss = sparsegpt(layer.weight.detach(), inverse_factor(h.hessian, 1e-6), 0.5)
    true = float(((layer.weight.detach() - new) @ x.t()).square().sum()) / x.shape[0]
    assert loss == pytest.approx(true, rel=0.05)


def test_a_singular_hessian_is_retried_with_more_dampening_and_reported():
    hessian = torch.tensor([[1.0, 10.0], [10.0, 1.0]])  # indefinite: eigenvalues 11 and -9
    factor = inverse_factor(hessian, dampening=0.01)
    assert factor.retries == 3  # 0.01 -> 0.1 -> 1 -> 10 x mean(diag H)
    assert factor.dampening == pytest.approx(10.0)


def test_a_hessian_that_never_factors_raises_instead_of_falling_back():
    hessian = torch.tensor([[1.0, 1e6], [1e6, 1.0]])
    with pytest.raises(CholeskyError, match=r"not positive definite.*retries"):
        inverse_factor(hessian, dampening=0.01, max_retries=2)


def test_inputs_that_never_fire_are_pruned_first():
    hessian = torch.diag(torch.tensor([4.0, 0.0, 2.0, 1.0]))
    factor = inverse_factor(hessian)
    assert factor.dead.tolist() == [False, True, False, False]
    _, keep, _ = sparsegpt(torch.ones(3, 4), factor, 0.25)
    assert not keep[:, 1].any() and keep[:, [0, 2, 3]].all()


def test_hessian_is_twice_the_mean_outer_product():
    x = torch.randn(10, 3)
    h = HessianAccumulator(3)
    h.add(x[:4])
    h.add(x[4:])
    torch.testing.assert_close(h.hessian, 2 * x.t() @ x / 10)


@pytest.mark.parametrize("value", [0, -0.01, True, float("nan"), float("inf"), "0.01"])
def test_dampening_is_checked_the_same_wherever_it_is_set(value):
    """One check for the criterion's, the solver's and the inverse's dampening: the same message, naming the option."""
    expected = r"must be a number in \(0, inf\), got .*SparseGPT uses 0.01"
    with pytest.raises(secateurs.ConfigError, match="method_options.dampening " + expected):
        secateurs.PruneConfig(method="sparsegpt", sparsity=0.5, mode="mask", method_options={"dampening": value})
    with pytest.raises(secateurs.ConfigError, match="solver_options.dampening " + expected):
        secateurs.PruneConfig(method="sparsegpt", sparsity=0.5, solver_options={"dampening": value})
    with pytest.raises(secateurs.ConfigError, match="^dampening " + expected):
        inverse_factor(torch.eye(2), dampening=value)


@pytest.mark.parametrize("mode", ["mask", "bake", "reconstruct"])
def test_raised_dampening_is_reported_whether_the_criterion_or_the_solver_factors(mode):
    """Two calibration samples for 16 inputs and a tiny dampening: the Cholesky fails and is retried. The
    OBS saliency of mode='mask'/'bake' reports it as the solver of mode='reconstruct' does."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    option = "solver_options" if mode == "reconstruct" else "method_options"
    report = secateurs.prune(model, "sparsegpt", 0.5, mode=mode, scope=["0"], calibration=[x], progress=False,
                             **{option: {"dampening": 1e-10}})  # fmt: skip
    (raised,) = report.dampening_raised
    assert raised.name == "0.weight" and raised.retries >= 1 and raised.dampening > 1e-10
    assert any(line.startswith("NOTE 0.weight: Hessian not positive definite") for line in report.details.lines(None))


def test_scoring_factors_a_hessian_shared_by_q_k_v_once(segments, monkeypatch):
    from secateurs.llm import prune_llm

    from .conftest import tiny

    calls = []
    cholesky = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or cholesky(*a, **k))
    report = prune_llm(tiny("llama"), "sparsegpt", 0.5, mode="mask", calibration=segments, progress=False)
    # per block, 4 Hessians (q/k/v share one, gate/up one, o_proj and down_proj their own) for 7 layers;
    # each factored once: a Cholesky of H + lambda I, then one of its inverse
    assert len(calls) == 2 * 4 * 2 and len(report.details.solved) == 2 * 7


def test_a_layer_scored_and_solved_with_hessians_is_reported_once_with_the_larger_retries():
    """A SparseGPT-scored override reconstructed by the solver: one result per layer, keeping the solver's loss
    and the scoring's raised dampening."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    report = secateurs.prune(model, "magnitude", 0.5, mode="reconstruct", solver="sparsegpt", scope=["0"],
                             overrides={"0": {"method": "sparsegpt", "method_options": {"dampening": 1e-10}}},
                             calibration=[x], progress=False)  # fmt: skip
    (result,) = report.details.solved
    assert result.name == "0.weight" and result.retries >= 1 and result.loss is not None
