"""Activation sparsity (TEAL, CATS): thresholds, allocation, run-time target, saving, refusals, kernel paths."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs.dynamic import activation_sparsity, kernel, load_activation_sparsity, sparsify_activations
from secateurs.dynamic.layers import DynamicLinear
from secateurs.errors import CheckpointError, ConfigError, NonFiniteError, SecateursWarning, StateError
from secateurs.io import OutputExistsError

from .conftest import assert_same_bits, state_bits, tiny


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def calibrated():
    """One greedy calibration shared by the tests that only set targets on it (each sets the one it needs)."""
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    return sparsify_activations(tiny("llama"), ids, batch_size=4, use_kernel=False, step=0.2, max_sparsity=0.8)


def test_sparsity_zero_is_the_dense_model_exactly(llama, segments):
    dense = _logits(llama, segments)
    sparse = sparsify_activations(llama, segments, batch_size=4, step=0.2, max_sparsity=0.8)
    assert torch.equal(_logits(llama, segments), dense)
    sparse.set_sparsity(0.5)
    assert not torch.allclose(_logits(llama, segments), dense)
    sparse.set_sparsity(0.0)
    assert torch.equal(_logits(llama, segments), dense)
    single = segments[:1, :1]
    assert torch.equal(_logits(llama, single), _logits(tiny("llama"), single))  # batch-1 path, same weights


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_thresholds_reach_the_target_on_calibration_data_within_one_percent(llama, segments, allocation):
    sparse = sparsify_activations(llama, segments, batch_size=4, allocation=allocation, use_kernel=False, step=0.1)
    for target in (0.25, 0.5, 0.7):
        sparse.set_sparsity(target)
        sparse_layers = sparse.layer_sparsities()
        dense_measured = _dense_input_sparsity(llama, sparse, segments)
        for name, asked in sparse_layers.items():
            assert abs(dense_measured[name] - asked) < 0.01, (name, asked, dense_measured[name])
        weighted = sum(sparse_layers[n] * p for n, p in zip(sparse.calibration.layers, sparse.calibration.params))
        assert abs(weighted / sum(sparse.calibration.params) - target) < 0.01


def _dense_input_sparsity(model, sparse, segments):
    """What each threshold zeroes of the layer's input in the dense model (the calibration activations)."""
    thresholds = sparse.thresholds()
    previous = sparse.sparsity
    sparse.set_sparsity(0.0)
    seen = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: seen.setdefault(name, []).append(a[0].abs().flatten())
        )
        for name in thresholds
    ]
    _logits(model, segments)
    for handle in handles:
        handle.remove()
    sparse.set_sparsity(previous)
    return {
        n: float((torch.cat(seen[n]) <= (t if t is not None else -1)).float().mean()) for n, t in thresholds.items()
    }


def test_greedy_allocation_spreads_the_target_unevenly_and_measures_it(calibrated, segments):
    calibrated.set_sparsity(0.5)
    layers = calibrated.layer_sparsities()
    assert max(layers.values()) - min(layers.values()) > 0.05  # not uniform
    measured = calibrated.measure(segments, batch_size=4)
    assert abs(measured["<weighted>"] - 0.5) < 0.05  # in the sparse model the inputs drift a little


def test_target_changes_at_run_time_without_recalibrating(calibrated, segments):
    quantiles = calibrated.calibration.quantiles.clone()
    errors = []
    dense = _logits(calibrated.set_sparsity(0.0).model, segments)  # the fixture is shared: start dense
    for target in (0.25, 0.5, 0.7):
        calibrated.set_sparsity(target)
        errors.append(float((_logits(calibrated.model, segments) - dense).pow(2).mean()))
    assert errors == sorted(errors) and errors[0] > 0
    assert torch.equal(calibrated.calibration.quantiles, quantiles)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, "half", True])
def test_a_target_outside_zero_one_is_refused(calibrated, bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        calibrated.set_sparsity(bad)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        sparsify_activations(tiny("llama"), torch.zeros(2, 4, dtype=torch.long), sparsity=bad)


def test_a_target_above_the_greedy_path_is_refused(calibrated):
    with pytest.raises(ConfigError, match="max_sparsity"):
        calibrated.set_sparsity(0.95)


def test_a_model_never_calibrated_is_refused():
    with pytest.raises(StateError, match="no activation sparsity"):
        activation_sparsity(tiny("llama"))


def test_nan_calibration_activations_are_refused_naming_the_layer_and_the_model_is_unchanged(llama, segments):
    before = state_bits(llama)
    llama.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    poisoned = state_bits(llama)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.down_proj"):
        sparsify_activations(llama, segments, batch_size=4)
    assert all(type(m) is not DynamicLinear for m in llama.modules())
    assert_same_bits(state_bits(llama), poisoned)
    assert before.keys() == poisoned.keys()


def test_save_and_load_round_trip_without_pickle(calibrated, segments, tmp_path):
    calibrated.set_sparsity(0.4)
    want = _logits(calibrated.model, segments)
    path = calibrated.save(tmp_path / "act.safetensors")
    with pytest.raises(OutputExistsError):
        calibrated.save(path)
    fresh = tiny("llama")
    loaded = load_activation_sparsity(fresh, path, use_kernel=False)
    assert loaded.sparsity == 0.4 and loaded.allocation == "greedy"
    assert torch.equal(_logits(fresh, segments), want)
    assert activation_sparsity(fresh) is loaded
    loaded.set_sparsity(0.6)  # the distributions came with it


def test_loading_onto_another_architecture_is_refused_before_anything_changes(calibrated, tmp_path):
    path = calibrated.save(tmp_path / "act.safetensors")
    other = tiny("qwen2")
    other.model.layers[0].mlp.down_proj = nn.Linear(32, 32, bias=False)  # wrong width
    before = state_bits(other)
    with pytest.raises(CheckpointError, match="down_proj"):
        load_activation_sparsity(other, path)
    assert all(type(m) is not DynamicLinear for m in other.modules())
    assert_same_bits(state_bits(other), before)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        load_activation_sparsity(tiny("llama"), tmp_path / "junk.safetensors")


def test_remove_restores_plain_linear_layers_and_the_state_dict(llama, segments):
    before = state_bits(llama)
    sparse = sparsify_activations(llama, segments, batch_size=4, allocation="uniform", sparsity=0.5)
    assert set(llama.state_dict()) == set(before)
    sparse.remove()
    assert all(type(m) is not DynamicLinear for m in llama.modules())
    assert all(m.weight.is_contiguous() for m in llama.modules() if isinstance(m, nn.Linear))
    assert_same_bits(state_bits(llama), before)
    with pytest.raises(StateError):
        sparse.set_sparsity(0.2)


def test_calibrating_twice_is_refused(calibrated, segments):
    with pytest.raises(StateError, match="already has activation sparsity"):
        sparsify_activations(calibrated.model, segments)


def test_cats_thresholds_the_gate_activation_only(llama, segments):
    sparse = sparsify_activations(llama, segments, batch_size=4, method="cats", sparsity=0.5)
    assert sparse.allocation == "uniform"
    assert all(n.endswith("mlp.act_fn") for n in sparse.calibration.layers)
    measured = sparse.measure(segments, batch_size=4)
    assert abs(measured["<weighted>"] - 0.5) < 0.02


def test_a_model_without_blocks_or_options_out_of_range_are_refused(segments):
    with pytest.raises(ConfigError):
        sparsify_activations(nn.Sequential(nn.Linear(4, 4)), [torch.zeros(1, 4)], blocks="nope")
    with pytest.raises(ConfigError, match="method"):
        sparsify_activations(tiny("llama"), segments, method="dejavu")
    with pytest.raises(ConfigError, match="calibration"):
        sparsify_activations(tiny("llama"), [])


def test_the_speed_target_picks_the_lowest_sparsity_that_reaches_it(calibrated):
    clock = iter(range(100))
    rates = {0.0: 10.0, 0.25: 15.0, 0.4: 25.0}

    def step():
        next(clock)

    import secateurs.dynamic.activation as activation

    original = activation._median_seconds
    activation._median_seconds = lambda s, r: 1.0 / rates[calibrated.sparsity]
    try:
        assert calibrated.sparsity_for_speed(20.0, step, levels=(0.0, 0.25, 0.4)) == 0.4
        assert calibrated.sparsity == 0.4
        with pytest.raises(ConfigError, match=r"25\.0 tokens/s at 0\.4"):
            calibrated.sparsity_for_speed(100.0, step, levels=(0.0, 0.25, 0.4))
    finally:
        activation._median_seconds = original


# --- the kernel paths -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 300),
    n_out=st.integers(1, 300),
    quantile=st.floats(0.0, 0.99),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_reference_sparse_path_equals_the_dense_matmul_on_the_thresholded_input(n_in, n_out, quantile, bias, seed):
    _check_path(n_in, n_out, quantile, bias, seed, use_kernel=False)


def _check_path(n_in, n_out, quantile, bias, seed, use_kernel):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, n_in, generator=g)
    weight = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    threshold = float(torch.quantile(x.abs(), quantile))
    want = kernel.thresholded_linear(x, weight, b, threshold)
    kernel.to_input_major(weight)
    got = kernel.sparse_input_linear(x, weight, b, threshold, use_kernel=use_kernel)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * math.sqrt(n_in))


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    n_in=st.integers(1, 600),
    n_out=st.integers(1, 2100),
    quantile=st.floats(0.0, 0.99),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_compiled_kernel_equals_the_dense_matmul_on_the_thresholded_input(n_in, n_out, quantile, bias, seed):
    if kernel.compiled() is None:
        pytest.skip(f"the kernel cannot be built here: {kernel.kernel_notice()}")
    _check_path(n_in, n_out, quantile, bias, seed, use_kernel=True)


def test_a_kernel_that_cannot_be_built_is_one_notice_and_the_reference_result(monkeypatch):
    monkeypatch.setattr(kernel, "_state", {})
    monkeypatch.setattr(kernel, "cache_dir", lambda: (_ for _ in ()).throw(OSError("no compiler here")))
    monkeypatch.delenv("SECATEURS_KERNEL", raising=False)
    x, weight = torch.randn(64), torch.randn(32, 64)
    want = kernel.thresholded_linear(x, weight, None, 0.3)
    kernel.to_input_major(weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = kernel.sparse_input_linear(x, weight, None, 0.3)
        again = kernel.sparse_input_linear(x, weight, None, 0.3)
    notices = [w for w in caught if issubclass(w.category, SecateursWarning)]
    assert len(notices) == 1 and "no compiler here" in str(notices[0].message)
    assert "\n" not in str(notices[0].message)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)


def test_a_kernel_failing_its_self_check_is_not_used(monkeypatch):
    class Wrong:
        @staticmethod
        def sparse_input_gemv(x, wt, threshold, bias):
            return torch.zeros(wt.shape[1])

    assert "max error" in kernel._self_check(Wrong())
