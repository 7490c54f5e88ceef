"""The command line does what the API does, and never clobbers files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secateurs.cli import main
from secateurs.demo.models import digits_mlp

MODEL = "secateurs.demo.models:digits_mlp"
TRAINED = "secateurs.demo:trained_mlp"  # global magnitude on the untrained MLP empties a layer (refused)


def test_prune_writes_baked_weights_masks_report_and_recipe(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", TRAINED, "--method", "magnitude", "--sparsity", "0.8", "--allocation", "global",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "targets:" in capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == ["masks.safetensors", "model.safetensors", "recipe.json", "report.json"]
    model = digits_mlp()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert json.loads((out / "recipe.json").read_text())["allocation"] == "global"


def test_prune_with_a_recipe_calibration_data_and_flag_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: wanda\nsparsity: 0.3\n")
    out = tmp_path / "out"
    args = ["prune", MODEL, "--recipe", str(recipe), "--sparsity", "0.5", "--data",
            "secateurs.demo.data:calibration_batches", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "wanda" and report["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_prune_refuses_an_existing_output_unless_overwrite(tmp_path, capsys, monkeypatch):
    import secateurs.cli.prune as cli_prune

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["prune", MODEL, "--sparsity", "0.5", "--out", str(out)]
    with monkeypatch.context() as m:  # refused before the model is even loaded, not after pruning
        m.setattr(cli_prune, "load_model", lambda *a: pytest.fail("loaded the model before refusing --out"))
        assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()


def test_bad_flags_give_a_one_line_error_not_a_traceback(tmp_path, capsys):
    assert main(["prune", MODEL, "--method", "nope", "--sparsity", "0.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secateurs prune: error:") and "unknown method 'nope'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_report_reads_back_weights_and_masks(tmp_path, capsys):
    out = tmp_path / "out"
    main(["prune", MODEL, "--sparsity", "0.5", "--out", str(out)])
    capsys.readouterr()
    json_path = tmp_path / "report.json"
    assert main(["report", MODEL, "--weights", str(out / "model.safetensors"), "--input-shape", "1,8,8",
                 "--json", str(json_path)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "MACs:" in text
    data = json.loads(json_path.read_text())
    assert {layer["name"]: round(layer["sparsity"], 3) for layer in data["layers"]}["fc1.weight"] == 0.5


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """One quick demo run (the slowest thing in the suite) shared by the demo tests."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    torch.manual_seed(0)
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_quick_run_writes_table_json_and_plot(demo_out):
    out = demo_out
    data = json.loads((out / "results.json").read_text())
    methods = {row["method"] for row in data["results"]}
    assert {"dense", "2:4 magnitude + fine-tune"} <= methods
    assert len(data["results"]) == 12
    assert (out / "table.txt").exists() and (out / "demo.png").stat().st_size > 10_000
    dense = {r["model"]: r["accuracy"] for r in data["results"] if r["method"] == "dense"}
    assert min(dense.values()) > 0.8  # the models really learned
    assert all(r["train_seconds"] > 0 and r["prune_seconds"] >= 0 for r in data["results"])
    table = (out / "table.txt").read_text()
    assert "450 held-out images (one image = 0.22 points)" in table and "sparsity: of the pruned layers" in table
    assert main(["demo", "--quick", "--out", str(out)]) == 2  # never overwrite without --overwrite


# what each demo row ran: (method, sparsity, allocation, schedule kind) of the pruning call itself
DEMO_CONFIGS = {
    "global magnitude 90% + fine-tune": ("magnitude", 0.9, "global", None),
    "2:4 magnitude + fine-tune": ("magnitude", 0.5, "uniform", None),
    "SNIP 90% at init, then train": ("snip", 0.9, "global", None),
    "SynFlow 90% at init, then train": ("synflow", 0.9, "global", None),
    "lottery ticket (3 IMP rounds, rewind)": ("magnitude", 0.9, "global", "lottery"),
}


def test_demo_reports_record_the_config_that_ran(demo_out):
    from secateurs import PruneConfig

    reports = json.loads((demo_out / "results.json").read_text())["reports"]
    for model in ("mlp", "cnn"):
        assert reports[model]["dense"]["config"] == {}  # nothing was pruned
        for method, (name, sparsity, allocation, schedule) in DEMO_CONFIGS.items():
            config = reports[model][method]["config"]
            PruneConfig(**config)  # a valid recipe
            assert (config["method"], config["sparsity"], config["allocation"]) == (name, sparsity, allocation), method
            assert (config["schedule"] or {}).get("kind") == schedule, method


def test_a_factory_in_the_current_folder_is_found_without_pythonpath(tmp_path, monkeypatch):
    import sys

    (tmp_path / "first_hour_models.py").write_text(
        "import torch\nfrom secateurs.demo import train_batches, trained_mlp\n\n"
        "def net():\n    return trained_mlp()\n\n"
        "def calibration():\n    return train_batches()[:2]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "first_hour_models", raising=False)
    path_before = list(sys.path)
    args = ["prune", "first_hour_models:net", "--method", "wanda", "--sparsity", "0.5",
            "--data", "first_hour_models:calibration", "--out", "out"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["config"]["method"] == "wanda"
    assert sys.path == path_before  # the folder is importable while the user's code runs, not afterwards


def test_a_factory_that_cannot_be_imported_says_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "no_such_models:net", "--sparsity", "0.5", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "the model 'no_such_models:net' cannot be imported" in err and str(tmp_path) in err


@pytest.fixture
def removed_mlp(tmp_path) -> Path:
    out = tmp_path / "removed"
    assert main(["prune", TRAINED, "--method", "magnitude", "--sparsity", "0.5", "--mode", "remove",
                 "--input-shape", "1,8,8", "--out", str(out)]) == 0  # fmt: skip
    return out


@pytest.mark.parametrize("weights", ["removed", "removed/model.safetensors"])
def test_report_reads_a_structurally_pruned_output_through_its_plan(removed_mlp, weights, capsys):
    capsys.readouterr()
    assert main(["report", MODEL, "--weights", str(removed_mlp.parent / weights), "--input-shape", "1,8,8"]) == 0
    text = capsys.readouterr().out
    assert "1 removal step(s) replayed" in text
    assert "150x64" in text  # Linear(64, 300) lost half its 300 neurons


def test_a_plain_structural_output_named_alone_says_to_name_its_factory(removed_mlp, capsys):
    capsys.readouterr()
    assert main(["report", str(removed_mlp)]) == 2
    assert f"package.module:factory --weights {removed_mlp}" in capsys.readouterr().err


def test_weights_of_another_shape_are_a_one_line_error_naming_the_tensors(removed_mlp, tmp_path, capsys):
    import shutil

    alone = tmp_path / "alone.safetensors"
    shutil.copy(removed_mlp / "model.safetensors", alone)  # the plan left behind
    capsys.readouterr()
    assert main(["report", MODEL, "--weights", str(alone)]) == 2
    err = capsys.readouterr().err
    assert (
        "does not fit" in err and "fc1.weight: file (150, 64) vs model (300, 64)" in err and "pruning_plan.json" in err
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_threads_sets_torch_threads_and_a_bad_value_is_refused_first(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        args = ["prune", TRAINED, "--sparsity", "0.5", "--threads", "2", "--out", str(tmp_path / "o")]
        assert main(args) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert main(["prune", TRAINED, "--sparsity", "0.5", "--threads", "0", "--out", str(tmp_path / "p")]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err
