"""``allocation='sensitivity'`` without a profile: the front doors measure one on the model first, with the
run's own options, and prune exactly as with that profile given; bad options are refused before the model
is touched, and a failed analysis leaves it bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

import secateurs
from conftest import assert_unchanged, fingerprint, small_cnn, small_mlp
from secateurs.analysis import SensitivityProfile, sensitivity
from secateurs.analysis.cells import CellError
from secateurs.errors import ConfigError, DataRequiredError, StateError

from .test_cli_analyze import MODELS  # the CLI's importable model and batches, one copy

GRID = (0.2, 0.5, 0.8)


def _measurements(profile: SensitivityProfile | dict) -> list[tuple]:
    """What was measured (not how long it took)."""
    cells = profile["cells"] if isinstance(profile, dict) else [vars(c) for c in profile.cells]
    return [(c["target"], c["sparsity"], c["metric"], c["params"], c["macs"]) for c in cells]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_profile_measured_on_the_fly_prunes_bit_identically_to_the_same_profile_given(mlp_batches, tmp_path):
    fly, given = small_mlp(), small_mlp()
    options = {"sparsities": list(GRID), "out": str(tmp_path / "analysis")}
    report = secateurs.prune(fly, "wanda", 0.6, allocation="sensitivity", allocation_options=options,
                             calibration=mlp_batches, progress=False)  # fmt: skip
    profile = sensitivity(given, mlp_batches, method="wanda", sparsities=GRID, progress=False)
    expected = secateurs.prune(given, "wanda", 0.6, allocation="sensitivity", allocation_options={"profile": profile},
                               calibration=mlp_batches, progress=False)  # fmt: skip
    assert _same_state(fly, given)
    assert [layer.sparsity for layer in report.layers] == [layer.sparsity for layer in expected.layers]
    assert len({layer.sparsity for layer in report.layers}) > 1  # the profile really moved sparsity between layers
    # the measured profile is on the report (a valid recipe) and in out/, ready to reuse
    recorded = report.config["allocation_options"]["profile"]
    assert _measurements(recorded) == _measurements(profile)
    saved = SensitivityProfile.load(tmp_path / "analysis" / "profile.json")
    assert _measurements(saved) == _measurements(profile)
    again = small_mlp()
    secateurs.prune(again, **{**report.config, "allocation_options": {"profile": recorded}},
                    calibration=mlp_batches, progress=False)  # fmt: skip
    assert _same_state(again, fly)


def test_channel_removal_measures_groups_and_removes_as_with_the_profile_given(cnn_batches):
    fly, given = small_cnn(), small_cnn()
    common = dict(mode="remove", calibration=cnn_batches, structural={"latency": False}, progress=False)
    report = secateurs.prune(fly, "magnitude", 0.5, allocation="sensitivity",
                             allocation_options={"sparsities": [0.25, 0.5, 0.75]}, **common)  # fmt: skip
    profile = sensitivity(given, cnn_batches, targets="groups", sparsities=(0.25, 0.5, 0.75), progress=False)
    expected = secateurs.prune(given, "magnitude", 0.5, allocation="sensitivity",
                               allocation_options={"profile": profile}, **common)  # fmt: skip
    assert [e["kind"] for e in report.config["allocation_options"]["profile"]["entries"]] == ["group"] * 4
    assert report.after.params == expected.after.params < report.before.params
    assert [(g.name, g.units_after) for g in report.groups] == [(g.name, g.units_after) for g in expected.groups]
    assert _same_state(fly, given)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"sparsities": [0.5, 1.0]}, ConfigError, r"1\.0 in the grid is outside \(0, 1\) \(allocation_options"),
        ({"sparsities": []}, ConfigError, "non-empty grid"),
        ({"grid": [0.5]}, ConfigError, "unexpected keyword argument 'grid'.*valid: .*sparsities"),
        ({"metric": "bleu"}, ConfigError, "allocation_options.metric must be one of loss"),
        ({"local": True}, ConfigError, "local=True .* needs runner='blocks'"),
        ({"budget": {"latency": 0.5}}, ConfigError, "latency budget .* mode='remove'"),
        ({"profile": "p.json", "sparsities": [0.5]}, ConfigError, "sparsities say how to measure a profile"),
    ],
)
def test_bad_on_the_fly_options_are_refused_before_the_model_is_touched(mlp, mlp_batches, options, error, message):
    before = fingerprint(mlp)
    sparsity = None if "budget" in options else 0.5
    with pytest.raises(error, match=message):
        secateurs.prune(mlp, "magnitude", sparsity, allocation="sensitivity", allocation_options=options,
                        calibration=mlp_batches, progress=False)  # fmt: skip
    assert_unchanged(mlp, before)


def test_overrides_and_missing_calibration_are_refused_before_any_cell(mlp, mlp_batches):
    before = fingerprint(mlp)
    with pytest.raises(ConfigError, match=r"overrides .* cannot measure"):
        secateurs.prune(mlp, "magnitude", 0.5, allocation="sensitivity", overrides={"0": {"pattern": "2:4"}},
                        calibration=mlp_batches, progress=False)  # fmt: skip
    with pytest.raises(DataRequiredError, match="scores metric 'loss' on the calibration batches"):
        secateurs.prune(mlp, "magnitude", 0.5, allocation="sensitivity", progress=False)
    assert_unchanged(mlp, before)


def test_a_failing_analysis_leaves_the_model_bit_identical(mlp, mlp_batches):
    before = fingerprint(mlp)
    calls = []

    def metric(model):  # the dense baseline is fine; the second cell's metric is not a number
        calls.append(1)
        return float("nan") if len(calls) == 3 else 1.0

    with pytest.raises(CellError, match="returned nan"):
        secateurs.prune(mlp, "magnitude", 0.5, allocation="sensitivity",
                        allocation_options={"sparsities": list(GRID), "metric": metric},
                        calibration=mlp_batches, progress=False)  # fmt: skip
    assert_unchanged(mlp, before)
    assert len(calls) == 3


def test_the_pruner_measures_once_at_construction_on_the_dense_model(mlp_batches):
    schedule = {"kind": "linear", "start": 0, "end": 2, "every": 1}
    model, reference = small_mlp(), small_mlp()
    pruner = secateurs.Pruner(model, "magnitude", 0.6, allocation="sensitivity", schedule=schedule,
                              allocation_options={"sparsities": list(GRID)}, calibration=mlp_batches)  # fmt: skip
    profile = pruner.config.allocation_.profile
    assert isinstance(profile, SensitivityProfile) and not profile.missing()
    assert _measurements(profile) == _measurements(sensitivity(reference, mlp_batches, sparsities=GRID, progress=False))
    given = secateurs.Pruner(reference, "magnitude", 0.6, allocation="sensitivity", schedule=schedule,
                             allocation_options={"profile": profile})  # fmt: skip
    for _ in range(3):
        pruner.step()
        given.step()
    assert _same_state(model, reference)
    assert pruner.report().sparsity == pytest.approx(0.6, abs=3 / pruner.report().target_params)
    # resuming with a profile measured again (here on other batches) is refused, pointing at the saved one
    state = pruner.state_dict()
    again = secateurs.Pruner(small_mlp(), "magnitude", 0.6, allocation="sensitivity", schedule=schedule,
                             allocation_options={"sparsities": list(GRID)}, calibration=mlp_batches[:2])  # fmt: skip
    with pytest.raises(StateError, match=r"another sensitivity profile .*state\['config'\]") as caught:
        again.load_state_dict(state)
    assert len(str(caught.value)) < 400  # the profile is pointed at, not printed
    before = fingerprint(model)
    with pytest.raises(ConfigError, match=r"already carries a mask .*pass the profile that run measured"):
        secateurs.Pruner(model, "magnitude", 0.6, allocation="sensitivity", schedule=schedule,
                         allocation_options={"sparsities": list(GRID)}, calibration=mlp_batches)  # fmt: skip
    assert_unchanged(model, before)
    resumed = secateurs.Pruner(
        model,
        "magnitude",
        0.6,
        allocation="sensitivity",
        schedule=schedule,
        allocation_options={"profile": state["config"]["allocation_options"]["profile"]},
    )
    resumed.load_state_dict(state)
    assert resumed.step_count == pruner.step_count


def test_a_recipe_allocates_by_a_profile_measured_under_a_params_budget(mlp, mlp_batches, tmp_path):
    budget = int(0.5 * sum(p.numel() for p in mlp.parameters()))
    (tmp_path / "recipe.yaml").write_text(
        "method: magnitude\nallocation: sensitivity\n"
        f"allocation_options:\n  budget: {{params: {budget}}}\n  sparsities: [0.2, 0.4, 0.6, 0.8, 0.9]\n"
    )
    report = secateurs.prune(mlp, **secateurs.load_recipe(tmp_path / "recipe.yaml"), calibration=mlp_batches,
                             progress=False)  # fmt: skip
    assert abs(report.nonzeros - budget) <= 3  # rounding: one unit per layer
    assert report.config["allocation_options"]["budget"] == {"params": budget}


def test_the_cli_measures_the_profile_writes_it_and_prunes_as_with_it_given(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from secateurs.cli import main

    (tmp_path / "fly_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    common = ["prune", "fly_models:net", "--data", "fly_models:batches", "--sparsity", "0.6"]
    assert main([*common, "--allocation", "sensitivity", "--grid", "0.3,0.6,0.9", "--out", "fly"]) == 0
    written = json.loads((tmp_path / "fly" / "sensitivity_profile.json").read_text())
    assert written["grid"] == [0.3, 0.6, 0.9] and written["cells"]
    assert main([*common, "--profile", "fly/sensitivity_profile.json", "--out", "given"]) == 0
    fly, given = load_file(tmp_path / "fly" / "model.safetensors"), load_file(tmp_path / "given" / "model.safetensors")
    assert all(torch.equal(fly[k], given[k]) for k in given)
    assert not (tmp_path / "given" / "sensitivity_profile.json").exists()  # nothing was measured there
    assert main([*common, "--grid", "0.5", "--out", "nope"]) == 2  # --grid without a sensitivity allocation
    assert not (tmp_path / "nope").exists()


def test_the_block_runner_measures_local_block_errors_by_default_with_its_own_options(mlp, mlp_batches):
    """runner='blocks' on a Sequential (blocks=''): each scoped layer is a block, scored by its reconstruction
    error on its captured inputs (the blocks of other widths after the last measured one are never run)."""
    reference = small_mlp()
    report = secateurs.prune(mlp, "wanda", 0.5, runner="blocks", blocks="", allocation="sensitivity",
                             allocation_options={"sparsities": [0.3, 0.6]}, calibration=mlp_batches,
                             progress=False)  # fmt: skip
    recorded = report.config["allocation_options"]["profile"]
    assert recorded["metric"] == "local_error" and [e["name"] for e in recorded["entries"]] == ["0", "2"]
    explicit = sensitivity(reference, mlp_batches, method="wanda", targets="blocks", local=True, blocks="",
                           sparsities=(0.3, 0.6), progress=False)  # fmt: skip
    assert _measurements(recorded) == _measurements(explicit)


def test_a_method_given_as_a_criterion_object_measures_and_records_its_options(mlp_batches, tmp_path):
    """A criterion instance carries its own options: the cells must not be handed the run's method_options
    beside it, and the resumable directory records the instance as data (name and fields), not the object."""
    from secateurs.criteria import Wanda

    fly, given = small_mlp(), small_mlp()
    report = secateurs.prune(fly, Wanda(), 0.6, allocation="sensitivity", calibration=mlp_batches, progress=False,
                             allocation_options={"sparsities": list(GRID), "out": str(tmp_path / "a")})  # fmt: skip
    profile = sensitivity(given, mlp_batches, method="wanda", sparsities=GRID, progress=False)
    secateurs.prune(given, "wanda", 0.6, allocation="sensitivity", allocation_options={"profile": profile},
                    calibration=mlp_batches, progress=False)  # fmt: skip
    assert _same_state(fly, given)
    saved = json.loads((tmp_path / "a" / "profile.json").read_text())
    assert saved["settings"]["method"]["name"] == "wanda"
    json.dumps(report.config["allocation_options"]["profile"])  # the recorded profile is plain data


def test_prune_measures_on_the_fly_on_a_model_with_earlier_masks(mlp_batches):
    """Masks of an earlier prune stay and count toward the budget; measuring on top of them works with prune()
    (only a Pruner, which measures the dense model at construction, refuses a model that carries masks)."""
    model = small_mlp()
    secateurs.prune(model, "magnitude", 0.3, progress=False)
    report = secateurs.prune(model, "magnitude", 0.6, allocation="sensitivity", calibration=mlp_batches,
                             allocation_options={"sparsities": [0.4, 0.6, 0.8]}, progress=False)  # fmt: skip
    assert report.sparsity == pytest.approx(0.6, abs=0.02)
