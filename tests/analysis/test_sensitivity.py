"""Layer sensitivity: every cell restores the model bit-exact; profiles save, load, resume and refuse."""

from __future__ import annotations

import json
import math

import pytest
import torch

import secateurs
from conftest import assert_unchanged, fingerprint, small_mlp
from secateurs.analysis import ProfileMismatchError, SensitivityProfile, sensitivity
from secateurs.analysis.cells import CellError
from secateurs.errors import ConfigError

GRID = (0.3, 0.7)


def test_every_mask_cell_restores_the_model_bit_exact_and_fills_the_grid(mlp, mlp_batches):
    before = fingerprint(mlp)
    profile = sensitivity(mlp, mlp_batches, method="wanda", sparsities=GRID, progress=False)
    assert_unchanged(mlp, before)
    assert [e.name for e in profile.entries] == ["0", "2"]  # the default scope leaves the classifier out
    assert not profile.missing() and len(profile.cells) == 4
    assert all(c.metric != profile.baseline for c in profile.cells)  # each cell really pruned something
    dense = profile.dense["params"]
    assert profile.cell("0", 0.7).params == dense - 32 * round(0.7 * 16)  # one layer alone, by rows


def test_every_removal_cell_restores_the_model_bit_exact_with_measured_latency(cnn, cnn_batches):
    before = fingerprint(cnn)
    profile = sensitivity(
        cnn,
        cnn_batches,
        targets="groups",
        sparsities=(0.5,),
        costs=("params", "macs", "latency"),
        latency_repeats=3,
        progress=False,
    )
    assert_unchanged(cnn, before)
    assert all(e.kind == "group" for e in profile.entries) and profile.entries
    for cell in profile.cells:
        assert cell.params < profile.dense["params"] and cell.macs <= profile.dense["macs"]
        assert cell.latency is not None and cell.latency > 0


def test_the_profile_round_trips_through_json_and_writes_csv_and_a_ranked_table(mlp, mlp_batches, tmp_path):
    profile = sensitivity(mlp, mlp_batches, sparsities=GRID, progress=False)
    profile.save(tmp_path / "p.json")
    again = SensitivityProfile.load(tmp_path / "p.json")
    assert again == profile
    profile.save(tmp_path / "p.csv")
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("target,kind,sparsity,loss") and len(rows) == 1 + 4
    table = profile.table()
    assert table.splitlines()[3].split()[0] == profile.ranked()[0][0].name
    with pytest.raises(secateurs.SecateursError, match="exists"):
        profile.save(tmp_path / "p.json")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsities": ()}, "non-empty grid"),
        ({"sparsities": (0.5, 1.0)}, r"1\.0 in the grid is outside"),
        ({"sparsities": (-0.1,)}, "outside"),
        ({"targets": "heads"}, "targets must be one of"),
        ({"costs": ("latency",)}, "latency cost needs targets='groups'"),
        ({"patern": "2:4"}, r"unknown keyword\(s\) 'patern' \(did you mean 'pattern'\?\)"),
    ],
)
def test_a_bad_grid_or_option_is_refused_before_any_cell(mlp, mlp_batches, kwargs, message):
    before = fingerprint(mlp)
    with pytest.raises(ConfigError, match=message):
        sensitivity(mlp, mlp_batches, progress=False, **kwargs)
    assert_unchanged(mlp, before)


@pytest.mark.parametrize(("value", "message"), [(float("nan"), "returned nan"), (torch.ones(2), "shape \\[2\\]")])
def test_a_nan_or_non_scalar_metric_names_the_cell_and_leaves_the_model_as_it_was(mlp, mlp_batches, value, message):
    calls = []

    def metric(model):
        calls.append(1)
        return 1.0 if len(calls) == 1 else value  # the dense baseline is fine, the first cell is not

    before = fingerprint(mlp)
    with pytest.raises(CellError, match=f"cell '0' at sparsity 0.3.*|{message}") as info:
        sensitivity(mlp, mlp_batches, metric=metric, sparsities=GRID, progress=False)
    assert "cell '0' at sparsity 0.3" in str(info.value)
    assert_unchanged(mlp, before)


def test_an_interrupted_analysis_keeps_its_finished_cells_and_a_rerun_measures_only_the_rest(
    mlp, mlp_batches, tmp_path
):
    out = tmp_path / "analysis"
    seen = []

    def metric(model):
        seen.append(1)
        if len(seen) == 4:  # dense + 2 cells, then the user presses Ctrl-C
            raise KeyboardInterrupt
        return float(sum(p.abs().sum() for p in model.parameters()))

    before = fingerprint(mlp)
    with pytest.raises(KeyboardInterrupt):
        sensitivity(mlp, mlp_batches, metric=metric, sparsities=GRID, out=out, progress=False)
    assert_unchanged(mlp, before)
    finished = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert len(finished) == 2
    seen.clear()
    seen.append("past the interrupt")
    profile = sensitivity(mlp, mlp_batches, metric=metric, sparsities=GRID, out=out, progress=False)
    assert len(seen) - 1 == 2  # 4 cells, 2 reused; the dense baseline is reused too
    assert not profile.missing() and SensitivityProfile.load(out / "profile.json") == profile
    with pytest.raises(ConfigError, match="another grid"):
        sensitivity(mlp, mlp_batches, metric=metric, sparsities=(0.5,), out=out, progress=False)


def test_a_resume_on_other_calibration_batches_is_refused_naming_them(mlp, mlp_batches, tmp_path):
    """Cells scored on other batches (another nsamples, seed or max_batches) must not be mixed with new ones."""
    out = tmp_path / "analysis"
    sensitivity(mlp, mlp_batches, sparsities=(0.5,), out=out, progress=False)
    sensitivity(mlp, mlp_batches, sparsities=(0.5,), out=out, progress=False)  # the same batches: resumed
    fewer = mlp_batches[:-1]
    with pytest.raises(ConfigError, match=r"another settings\.batches\.calibration\.count \(3 vs 2\)"):
        sensitivity(mlp, fewer, sparsities=(0.5,), out=out, progress=False)
    shifted = [(x + 1, y) for x, y in mlp_batches]
    with pytest.raises(ConfigError, match=r"another settings\.batches\.calibration"):
        sensitivity(mlp, shifted, sparsities=(0.5,), out=out, progress=False)


def test_two_local_processes_give_the_same_profile_as_one(mlp, mlp_batches):
    one = sensitivity(mlp, mlp_batches, sparsities=GRID, progress=False)
    two = sensitivity(mlp, mlp_batches, sparsities=GRID, workers=2, backend="processes", progress=False)
    assert [(c.target, c.sparsity, c.metric, c.params, c.macs) for c in one.cells] == [
        (c.target, c.sparsity, c.metric, c.params, c.macs) for c in two.cells
    ]


# -- allocation='sensitivity' --------------------------------------------------------------------------
@pytest.fixture
def profile(mlp, mlp_batches):
    return sensitivity(mlp, mlp_batches, sparsities=(0.2, 0.4, 0.6, 0.8, 0.9), progress=False)


def test_prune_with_a_profile_meets_the_sparsity_and_spares_the_sensitive_layer(mlp, mlp_batches, profile):
    report = secateurs.prune(
        mlp,
        "magnitude",
        0.6,
        allocation="sensitivity",
        allocation_options={"profile": profile},
        calibration=mlp_batches,
        progress=False,
    )
    assert report.sparsity == pytest.approx(0.6, abs=3 / report.target_params)
    ranked = [e.name for e, _ in profile.ranked()]
    by_layer = {layer.name: layer.sparsity for layer in report.layers}
    assert by_layer[f"{ranked[0]}.weight"] <= by_layer[f"{ranked[-1]}.weight"]


def test_a_params_budget_replaces_the_sparsity_and_is_met(mlp, mlp_batches, profile, tmp_path):
    profile.save(tmp_path / "p.json")
    budget = int(profile.dense["params"] * 0.5)
    report = secateurs.prune(
        mlp,
        "magnitude",
        allocation="sensitivity",
        calibration=mlp_batches,
        progress=False,
        allocation_options={"profile": str(tmp_path / "p.json"), "budget": {"params": budget}},
    )
    assert report.nonzeros <= budget + 3  # rounding: one unit per layer
    assert report.nonzeros >= budget - 3


def test_an_unreachable_budget_states_the_range_and_leaves_the_model_alone(mlp, mlp_batches, profile):
    before = fingerprint(mlp)
    with pytest.raises(ConfigError, match=r"reachable params is \d+ to \d+"):
        secateurs.prune(
            mlp,
            "magnitude",
            allocation="sensitivity",
            calibration=mlp_batches,
            progress=False,
            allocation_options={"profile": profile, "budget": {"params": 10}},
        )
    assert_unchanged(mlp, before)
    with pytest.raises(ConfigError, match=r"sparsity=0\.5 would be ignored"):
        secateurs.prune(
            mlp,
            "magnitude",
            0.5,
            allocation="sensitivity",
            allocation_options={"profile": profile, "budget": {"params": 400}},
        )


def test_a_profile_of_another_model_is_refused_naming_the_first_mismatch(profile, mlp_batches):
    other = torch.nn.Sequential(
        torch.nn.Linear(16, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 4)
    )
    before = fingerprint(other)
    with pytest.raises(ProfileMismatchError, match=r"'0.weight' has shape \[40, 16\], the profile recorded \[32, 16\]"):
        secateurs.prune(other, "magnitude", 0.5, allocation="sensitivity", allocation_options={"profile": profile})
    assert_unchanged(other, before)


def test_the_pruner_and_a_recipe_take_the_sensitivity_allocation(mlp, mlp_batches, profile, tmp_path):
    profile.save(tmp_path / "p.json")
    (tmp_path / "recipe.yaml").write_text(
        "method: magnitude\nsparsity: 0.5\nallocation: sensitivity\n"
        f"allocation_options:\n  profile: {tmp_path / 'p.json'}\n"
    )
    report = secateurs.prune(mlp, **secateurs.load_recipe(tmp_path / "recipe.yaml"), progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=3 / report.target_params)
    pruner = secateurs.Pruner(
        small_mlp(),
        "magnitude",
        0.5,
        allocation="sensitivity",
        allocation_options={"profile": profile},
        schedule={"kind": "linear", "start": 0, "end": 2, "every": 1},
    )
    for _ in range(3):
        pruner.step()
    assert math.isclose(pruner.report().sparsity, 0.5, abs_tol=3 / 1200)


def test_channel_removal_allocates_groups_by_a_profile_under_a_params_budget(cnn, cnn_batches):
    profile = sensitivity(cnn, cnn_batches, targets="groups", sparsities=(0.25, 0.5, 0.75), progress=False)
    budget = int(0.7 * profile.dense["params"])
    report = secateurs.prune(cnn, "magnitude", mode="remove", allocation="sensitivity", calibration=cnn_batches,
                             allocation_options={"profile": profile, "budget": {"params": budget}},
                             structural={"latency": False}, progress=False)  # fmt: skip
    # removal shares weights between neighbouring groups, so the additive prediction is close, not exact
    # (fit_budget re-measures); every group was sized by the profile
    assert abs(report.after.params - budget) / budget < 0.1
    assert {g.name for g in report.groups} == {e.name for e in profile.entries}


def test_no_public_name_of_the_analysis_package_is_shadowed_by_a_submodule():
    """``from secateurs.analysis import fit_budget, sensitivity`` imported the module ``sensitivity``
    once a submodule of that name existed; no module may share a public name."""
    from pathlib import Path

    import secateurs.analysis as analysis

    root = Path(analysis.__file__).parent
    assert not [n for n in analysis.__all__ if (root / f"{n}.py").exists()]
    assert callable(analysis.sensitivity) and callable(analysis.saliency)


def test_a_metric_that_changes_the_model_changes_it_for_no_cell_nor_the_dense_baseline(mlp, mlp_batches):
    """A metric may recalibrate or fine-tune what it scores (the CNN bench re-estimates BatchNorm); the dense
    baseline is measured in a trial like every cell, so the user's model comes back as it was."""
    before = fingerprint(mlp)
    seen = []

    def drifting_loss(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        seen.append(float(next(model.parameters()).sum()))
        return float(sum(p.sum() for p in model.parameters()))

    sensitivity(mlp, mlp_batches, sparsities=(0.5,), metric=drifting_loss, progress=False)
    assert_unchanged(mlp, before)
    assert len(seen) == 3  # the baseline and both cells ran, each on the model as it was


def test_keywords_a_cell_sets_itself_are_refused_or_dropped_by_name(cnn, cnn_batches, mlp, mlp_batches):
    before = fingerprint(cnn)
    with pytest.raises(ConfigError, match=r"mode='bake' does not apply"):
        sensitivity(cnn, cnn_batches, targets="groups", sparsities=(0.5,), mode="bake", progress=False)
    with pytest.raises(ConfigError, match="drop allocation="):
        sensitivity(cnn, cnn_batches, targets="groups", sparsities=(0.5,), allocation="uniform", progress=False)
    with pytest.raises(ConfigError, match="drop sparsity="):
        sensitivity(mlp, mlp_batches, sparsities=(0.5,), sparsity=0.5, progress=False)
    assert_unchanged(cnn, before)
    said = sensitivity(cnn, cnn_batches, targets="groups", sparsities=(0.5,), mode="remove", progress=False)
    plain = sensitivity(cnn, cnn_batches, targets="groups", sparsities=(0.5,), progress=False)
    assert [c.metric for c in said.cells] == [c.metric for c in plain.cells]
