"""Subspace node pruning (arXiv:2405.17506): triangular orthogonalisation, least-squares fold, removal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secateurs
from secateurs.errors import ConfigError
from secateurs.solvers.subspace import least_squares_fold
from secateurs.structural.subspace import pivoted_orthogonal_variance, tail_fractions


def _activations(n: int = 400, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.5
    )


def test_least_squares_fold_equals_the_closed_form_regression():
    x = _activations()
    w = torch.randn(3, 6, dtype=torch.float64)
    kept = torch.tensor([True, False, True, True, False, True])
    mean = x.mean(0)
    covariance = (x - mean).T @ (x - mean) / x.shape[0]
    new, delta = least_squares_fold(w.reshape(3, 1, 6), covariance, mean, kept, dampening=0.0)
    # closed form: regress the dense outputs on the kept activations and a constant
    design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    beta = torch.linalg.lstsq(design, x @ w.T).solution  # (K + 1, O)
    torch.testing.assert_close(new.reshape(3, 6)[:, kept], beta[:-1].T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(delta, beta[-1], rtol=1e-8, atol=1e-8)
    assert bool((new.reshape(3, 6)[:, ~kept] == 0).all())


def test_a_unit_that_is_a_combination_of_others_is_ranked_last_with_zero_residual():
    x = _activations(d=5)
    x = torch.cat([x, (2 * x[:, 1] - x[:, 3]).unsqueeze(1)], 1)  # unit 5 = 2 u1 - u3
    cov = torch.cov(x.T)
    order, values = pivoted_orthogonal_variance(cov, torch.ones(6, dtype=torch.float64))
    assert values[-1] < 1e-9 * values[0]
    assert bool((values[:-1] >= values[1:] - 1e-12).all())  # non-increasing: a triangular factorisation
    scores = tail_fractions(order, values)
    assert float(scores.max()) == pytest.approx(1.0)
    # the Cholesky of the pivoted covariance has the residual variances on its squared diagonal
    chol = torch.linalg.cholesky(cov[order[:5]][:, order[:5]])
    torch.testing.assert_close(torch.diagonal(chol).square(), values[:5], rtol=1e-8, atol=1e-10)


def _redundant_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Identity(), nn.Linear(12, 4))
    with torch.no_grad():  # hidden unit 11 = unit 2 + unit 5 (a linear layer's outputs: exactly predictable)
        model[0].weight[11] = model[0].weight[2] + model[0].weight[5]
        model[0].bias[11] = model[0].bias[2] + model[0].bias[5]
    return model


def test_removing_a_predictable_neuron_through_the_pipeline_keeps_outputs_exact():
    model = _redundant_mlp()
    dense = copy.deepcopy(model)
    x = torch.randn(256, 8)
    report = secateurs.prune(model, "subspace", 1 / 12, mode="remove", pattern="channel", calibration=[x],
                             allocation="uniform", scope={"include": ["0"]})  # fmt: skip
    assert model[0].out_features == 11 and model[2].in_features == 11
    assert report.after.params < report.before.params
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)


def test_redundant_conv_channels_are_removed_and_reconstructed_exactly(cnn):
    torch.manual_seed(0)
    cnn.eval()
    with torch.no_grad():  # channels 6 and 7 of the first conv repeat channels 0 and 1 (BatchNorm at its init)
        cnn[0].weight[6:8] = cnn[0].weight[0:2]
        cnn[0].bias[6:8] = cnn[0].bias[0:2]
    x = torch.randn(64, 3, 6, 6)
    errors = {}
    for solver in ("subspace_reconstruction", "none"):
        model = copy.deepcopy(cnn)
        secateurs.prune(model, "subspace", 0.25, mode="remove", pattern="channel", calibration=[x[:32], x[32:]],
                        solver=solver, scope={"exclude": ["5", "8"]})  # fmt: skip
        assert model[0].out_channels == 6 and model[3].in_channels == 6
        with torch.no_grad():
            errors[solver] = float((model(x) - cnn(x)).square().mean())
    assert errors["subspace_reconstruction"] < 1e-10 < errors["none"]


def test_a_unit_feeding_a_flatten_is_refused_with_the_way_out(cnn):
    before = copy.deepcopy(cnn.state_dict())
    with pytest.raises(ConfigError, match="through a reshape"):
        secateurs.prune(cnn, "subspace", 0.3, mode="remove", pattern="channel", calibration=[torch.randn(8, 3, 6, 6)],
                        scope={"exclude": ["3"]})  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
