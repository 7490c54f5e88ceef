"""Sensitivity analysis of language models: block cells restore the model bit-exact (local and whole-model
modes, masks and SparseGPT's reconstruction), and prune_llm allocates by the profile."""

from __future__ import annotations

import pytest

from secateurs.analysis import sensitivity
from secateurs.llm import prune_llm

from .conftest import assert_same_bits, state_bits


def _batches(segments):
    return [segments[:4], segments[4:]]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_local_block_cells_restore_the_model_bit_exact(llama, segments, method):
    before = state_bits(llama)
    profile = sensitivity(
        llama, _batches(segments), method=method, targets="blocks", local=True, sparsities=(0.5, 0.8), progress=False
    )
    assert_same_bits(before, state_bits(llama))
    assert [e.name for e in profile.entries] == ["model.layers.0", "model.layers.1"]
    for entry in profile.entries:  # a block's reconstruction error grows with its sparsity
        assert 0 < profile.cell(entry.name, 0.5).metric < profile.cell(entry.name, 0.8).metric


def test_whole_model_block_cells_measure_perplexity_and_restore_the_model(llama, segments):
    before = state_bits(llama)
    evaluation = [{"input_ids": b, "labels": b} for b in _batches(segments)]
    profile = sensitivity(
        llama,
        _batches(segments),
        method="wanda",
        targets="blocks",
        runner="blocks",
        metric="perplexity",
        evaluation=evaluation,
        sparsities=(0.7,),
        costs=(),
        progress=False,
    )
    assert_same_bits(before, state_bits(llama))
    assert profile.baseline > 1 and all(c.metric > 1 for c in profile.cells)


def test_prune_llm_allocates_blocks_by_the_profile_and_meets_the_sparsity(llama, segments):
    profile = sensitivity(
        llama,
        _batches(segments),
        method="wanda",
        targets="blocks",
        local=True,
        sparsities=(0.5, 0.6, 0.7, 0.8, 0.9),
        progress=False,
    )
    report = prune_llm(
        llama,
        "wanda",
        0.7,
        allocation="sensitivity",
        allocation_options={"profile": profile},
        calibration=segments,
        seqlen=32,
        nsamples=8,
        progress=False,
    )
    assert report.sparsity == pytest.approx(0.7, abs=0.01)
    damage = {e.name: mean for e, mean in profile.ranked()}
    fragile, robust = max(damage, key=damage.get), min(damage, key=damage.get)
    assert report.details.layer_sparsities[fragile] <= report.details.layer_sparsities[robust]


def test_prune_llm_measures_a_local_blocks_profile_when_none_is_given(llama, segments):
    """No profile: prune_llm measures the blocks' reconstruction errors (local, the block runner's default) on
    its own calibration batches, records the profile, and prunes exactly as with that profile given."""
    import copy

    from secateurs.analysis import SensitivityProfile

    twin = copy.deepcopy(llama)
    common = dict(calibration=segments, seqlen=32, nsamples=8, progress=False)
    report = prune_llm(llama, "wanda", 0.7, allocation="sensitivity",
                       allocation_options={"sparsities": [0.5, 0.7, 0.9]}, **common)  # fmt: skip
    profile = SensitivityProfile.from_dict(report.config["allocation_options"]["profile"])
    assert profile.metric == "local_error" and [e.name for e in profile.entries] == ["model.layers.0", "model.layers.1"]
    assert report.sparsity == pytest.approx(0.7, abs=0.01)
    prune_llm(twin, "wanda", 0.7, allocation="sensitivity", allocation_options={"profile": profile}, **common)
    assert_same_bits(state_bits(llama), state_bits(twin))


def test_a_distributed_run_refuses_to_measure_a_profile_on_every_rank(llama, segments, monkeypatch):
    from types import SimpleNamespace

    import secateurs.llm.api as llm_api
    from secateurs.errors import ConfigError

    monkeypatch.setattr(llm_api, "detect", lambda *args: SimpleNamespace(world=2, writer=True))
    monkeypatch.setattr(llm_api, "agree", lambda *args: None)
    before = state_bits(llama)
    with pytest.raises(ConfigError, match=r"distributed run \(2 ranks\) would measure it once per rank"):
        prune_llm(llama, "wanda", 0.5, allocation="sensitivity", calibration=segments, seqlen=32, progress=False)
    assert_same_bits(before, state_bits(llama))


def test_a_device_run_refuses_to_measure_its_profile_off_that_device(llama, segments):
    """device= moves the prune's blocks, not the analysis's cells: measuring them on the CPU while the prune runs
    on an accelerator would be silently many times slower, so it is refused before anything changes; on the
    model's own device it measures as usual."""
    from secateurs.errors import ConfigError

    before = state_bits(llama)
    with pytest.raises(ConfigError, match=r"its cells run where the model is \(cpu\), not on device='meta'"):
        prune_llm(llama, "wanda", 0.5, allocation="sensitivity", calibration=segments, seqlen=32, device="meta",
                  progress=False)  # fmt: skip
    assert_same_bits(before, state_bits(llama))
    report = prune_llm(llama, "wanda", 0.7, allocation="sensitivity", allocation_options={"sparsities": [0.5, 0.9]},
                       calibration=segments, seqlen=32, nsamples=8, device="cpu", progress=False)  # fmt: skip
    assert report.sparsity == pytest.approx(0.7, abs=0.01)
