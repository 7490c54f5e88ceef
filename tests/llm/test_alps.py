"""ALPS (arXiv:2406.07831): exact sparsity and valid N:M, lower layer error than SparseGPT on the same layer
and data, fixed masks from other criteria, the iteration cap reported, and both runners."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
from secateurs.hessian import HessianAccumulator, eigen_factor, inverse_factor
from secateurs.llm import prune_llm
from secateurs.patterns import NM
from secateurs.solvers.alps import ALPSOptions, alps
from secateurs.solvers.sparsegpt import sparsegpt

from .conftest import tiny


def _layer_and_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and inputs whose channels differ in scale and are correlated, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 64, generator=g)
    mixing = torch.randn(64, 64, generator=g) / 8
    scales = torch.exp(torch.randn(64, generator=g))
    x = (torch.randn(2048, 64, generator=g) @ (torch.eye(64) + mixing)) * scales
    return weight, x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian


def _error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """The layer's relative reconstruction error ||X (W - W^)^T||^2 / ||X W^T||^2."""
    return float((x @ (pruned - dense).t()).square().sum() / (x @ dense.t()).square().sum())


@pytest.mark.parametrize("setting", [0.5, 0.7, 0.8, "2:4", "4:8"])
def test_alps_is_exact_and_reconstructs_better_than_sparsegpt_on_the_same_layer_and_data(setting):
    weight, x = _layer_and_inputs()
    h = _hessian(x)
    nm = NM(*map(int, setting.split(":"))) if isinstance(setting, str) else None
    sparsity = None if nm else setting
    result = alps(weight, eigen_factor(h), sparsity, nm)
    obs, _, _ = sparsegpt(weight, inverse_factor(h), sparsity, nm, blocksize=128)
    if nm is None:
        assert int((result.weight == 0).sum()) == round(sparsity * weight.numel())
    else:
        assert (
            NM.is_valid(nm, result.keep.reshape(1, 1, -1)) and int(result.keep.sum()) == weight.numel() * nm.n // nm.m
        )
    assert torch.equal(result.weight != 0, result.keep)
    assert result.converged and result.iterations > 0
    ours, theirs = _error(x, weight, result.weight), _error(x, weight, obs)
    assert ours < 0.9 * theirs, (ours, theirs)


def test_the_iteration_cap_still_gives_an_exact_mask_and_says_so():
    weight, x = _layer_and_inputs(1)
    options = ALPSOptions(max_iterations=3, update_every=3)
    result = alps(weight, eigen_factor(_hessian(x)), 0.7, options=options)
    assert not result.converged and result.iterations == 3 and result.support_change > 0
    assert int((result.weight == 0).sum()) == round(0.7 * weight.numel())

    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    report = secateurs.prune(model, "alps", 0.7, calibration=[x], scope={"skip_last": False}, progress=False,
                             solver_options={"max_iterations": 3})  # fmt: skip
    (layer,) = report.not_converged
    assert layer.solver["iterations"] == 3 and not layer.solver["converged"]
    assert "iteration cap (3 iterations)" in "\n".join(report.details.lines("uniform"))
    assert report.sparsity == pytest.approx(0.7, abs=1e-3)


def test_a_wanda_mask_is_kept_and_alps_finds_better_weights_for_it():
    weight, x = _layer_and_inputs(2)

    def pruned(**kwargs) -> torch.Tensor:
        model = nn.Sequential(nn.Linear(64, 48, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(weight)
        secateurs.prune(model, "wanda", 0.6, calibration=[x], scope={"skip_last": False}, progress=False, **kwargs)
        return model[0].weight.detach().clone()

    wanda, obs, ours = (
        pruned(mode="bake"),
        pruned(mode="reconstruct", solver="sparsegpt"),
        pruned(mode="reconstruct", solver="alps"),
    )
    assert torch.equal(ours != 0, wanda != 0)  # the criterion's mask, kept
    assert _error(x, weight, ours) < _error(x, weight, obs) < _error(x, weight, wanda)


def test_alps_runs_through_the_block_runner_and_prune_on_any_model(segments):
    model = tiny("llama")
    report = prune_llm(model, "alps", 0.6, calibration=segments, progress=False)
    for layer in report.layers:
        assert layer.nonzeros == layer.params - round(0.6 * layer.params), layer.name
    assert report.config["solver"] == "alps" and all("iterations" in r.solver for r in report.details.solved)
    with torch.no_grad():
        assert torch.isfinite(model(segments[:2]).logits).all()
    model = tiny("llama")
    report = prune_llm(model, "alps", pattern="2:4", calibration=segments, progress=False)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            assert NM(2, 4).is_valid(module.weight.detach().reshape(1, 1, -1) != 0), name

    model = tiny("llama")
    report = prune_llm(model, "alps", 0.6, allocation="owl", calibration=segments, progress=False)  # OWL on top
    assert len(set(report.block_sparsities)) > 1 and report.sparsity == pytest.approx(0.6, abs=0.01)

    cnn = secateurs.testing.small_cnn()
    report = secateurs.prune(cnn, "alps", 0.5, calibration=secateurs.testing.calibration(batches=2), progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3) and report.config["mode"] == "reconstruct"


def test_alps_options_are_checked_and_the_criterion_has_no_mask_mode():
    with pytest.raises(secateurs.ConfigError, match=r"solver_options\.max_iterations"):
        secateurs.prune(nn.Sequential(nn.Linear(4, 4)), "alps", 0.5, solver_options={"max_iterations": 0},
                        calibration=[torch.randn(8, 4)], progress=False)  # fmt: skip
    with pytest.raises(secateurs.ConfigError, match="alps"):
        secateurs.prune(nn.Sequential(nn.Linear(4, 4)), "alps", 0.5, mode="mask", calibration=[torch.randn(8, 4)],
                        progress=False)  # fmt: skip


def test_nothing_to_prune_and_an_already_settled_support_end_at_once():
    weight, x = _layer_and_inputs(3)
    factor = eigen_factor(_hessian(x))
    result = alps(weight, factor, 0.0)
    assert result.iterations == 0 and result.converged and bool(result.keep.all())
    torch.testing.assert_close(result.weight, weight, rtol=1e-4, atol=1e-4)  # the dense solution is the dense weight
    diagonal = alps(torch.diag(torch.arange(1.0, 9.0)), eigen_factor(torch.eye(8)), 0.5)  # H = I: magnitude is optimal
    assert diagonal.converged and diagonal.iterations <= 4 * 3
    assert bool(diagonal.keep.diagonal().all()) and int(diagonal.keep.sum()) == 32
    torch.testing.assert_close(diagonal.weight, torch.diag(torch.arange(1.0, 9.0)))
