"""The command line does what the API does, and never clobbers files."""

from __future__ import annotations

import json

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
    assert {layer["name"]: round(layer["sparsity"], 3) for layer in data["layers"]}["1.weight"] == 0.5


def test_demo_quick_run_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "demo"
    torch.manual_seed(0)
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    methods = {row["method"] for row in data["results"]}
    assert {"dense", "2:4 magnitude + fine-tune"} <= methods
    assert len(data["results"]) == 12
    assert (out / "table.txt").exists() and (out / "demo.png").stat().st_size > 10_000
    dense = {r["model"]: r["accuracy"] for r in data["results"] if r["method"] == "dense"}
    assert min(dense.values()) > 0.8  # the models really learned
    assert main(["demo", "--quick", "--out", str(out)]) == 2  # never overwrite without --overwrite
