"""Low-rank factorisation: exact SVD fold, whitened optimality, break-even refusal, real savings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.errors import ConfigError, DataRequiredError
from secateurs.lowrank import LowRankLinear, break_even_rank, factorize, svd_factors, whitening_factor


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 8))


def _correlated_inputs(n: int = 512, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, 16, generator=g) * torch.logspace(0, -2, 16)[:, None]  # strongly anisotropic
    return torch.randn(n, 16, generator=g) @ basis


def test_full_rank_factors_reproduce_the_weight_exactly():
    w = torch.randn(12, 7, dtype=torch.float64)
    f = svd_factors(w, 7)
    torch.testing.assert_close(f.up @ f.down, w, rtol=0, atol=1e-12)


def test_truncation_error_is_the_dropped_singular_values():
    w = torch.randn(12, 9, dtype=torch.float64)
    f = svd_factors(w, 4)
    err = (w - f.up @ f.down).square().sum()
    assert float(err) == pytest.approx(f.dropped_energy, rel=1e-10)
    assert f.dropped_energy == pytest.approx(float(torch.linalg.svdvals(w)[4:].square().sum()), rel=1e-10)


def test_whitened_factors_minimise_the_output_error_and_equal_the_dropped_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 8, generator=g, dtype=torch.float64)
    x = torch.randn(8, 200, generator=g, dtype=torch.float64) * torch.logspace(1, -1, 8, dtype=torch.float64)[:, None]
    s, _ = whitening_factor(x @ x.T, dampening=1e-12)
    white, plain = svd_factors(w, 3, s), svd_factors(w, 3)
    err_white = ((w - white.up @ white.down) @ x).square().sum()
    err_plain = ((w - plain.up @ plain.down) @ x).square().sum()
    assert float(err_white) == pytest.approx(white.dropped_energy, rel=1e-6)  # SVD-LLM theorem 3.2
    assert err_white < 0.8 * err_plain


def test_rank_at_or_above_break_even_is_refused_naming_it():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    assert break_even_rank(48, 40) == pytest.approx(21.818, abs=1e-3)
    with pytest.raises(ConfigError, match=r"break-even rank is 21.8, so use rank <= 21"):
        factorize(model, {"2": 22}, method="svd", scope={"skip_first": False})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_bad_options_are_refused():
    model = _mlp()
    with pytest.raises(ConfigError, match="exactly one of rank"):
        factorize(model, 4, ratio=0.5, method="svd")
    with pytest.raises(ConfigError, match="0 < ratio < 1"):
        factorize(model, ratio=1.5, method="svd")
    with pytest.raises(ConfigError, match="unknown low-rank method"):
        factorize(model, 4, method="asvd2")
    with pytest.raises(DataRequiredError, match="calibration"):
        factorize(model, 4, method="whitened")


def test_factorised_model_has_fewer_parameters_and_tracks_the_dense_one():
    model = _mlp()
    dense = copy.deepcopy(model)
    x = _correlated_inputs()
    report = factorize(model, ratio=0.6, method="whitened", calibration=[x[:256], x[256:]])
    assert [lay.name for lay in report.layers] == ["0", "2"]  # the last layer (the head) is skipped by default
    assert model[0].rank == 7 and model[2].rank == 13  # floor(0.6 * 12), floor(0.6 * 21.8)
    assert report.params_after == sum(p.numel() for p in model.parameters()) < report.params_before
    assert report.params_before - report.params_after == 16 * 48 - 7 * 64 + 48 * 40 - 13 * (48 + 40)
    torch.testing.assert_close(model[2].bias, dense[2].bias)
    cos = nn.functional.cosine_similarity(model(x), dense(x), dim=-1).mean()
    assert cos > 0.95


def test_whitened_beats_plain_svd_on_calibration_outputs_at_equal_rank():
    dense = _mlp()
    x = _correlated_inputs()
    scope = {"skip_first": False, "skip_last": False, "include": ["0", "2"]}
    errs = {}
    for method in ("svd", "whitened"):
        model = copy.deepcopy(dense)
        factorize(model, 4, method=method, calibration=[x], scope=scope)
        with torch.no_grad():
            errs[method] = float((model(x) - dense(x)).square().mean())
    assert errs["whitened"] < 0.7 * errs["svd"]


def test_transposed_conv1d_weights_factor_like_linear():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(24, 10)  # nf=24 outputs, nx=10 inputs, weight (10, 24)
    model = nn.Sequential(nn.Linear(10, 10), conv, nn.Linear(24, 2))
    x = torch.randn(64, 10)
    ref = conv(x)
    factorize(model, 6, method="svd", scope={"include": ["1"], "skip_first": False, "types": ["Conv1D"]})
    assert isinstance(model[1], LowRankLinear)
    full = svd_factors(conv.weight.detach().t(), 6)
    torch.testing.assert_close(model[1](x), (x.double() @ (full.up @ full.down).T + conv.bias.double()).float())
    assert float((model[1](x) - ref).abs().max()) < float(ref.abs().max())
