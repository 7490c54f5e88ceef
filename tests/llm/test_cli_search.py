"""`secateurs prune <hf-dir> --search spdy`: the searched allocation is the one pruned, its profile is written
and reproduces the prune under --profile, and bad search flags are refused before anything is written."""

from __future__ import annotations

import json

import pytest

from secateurs.cli import main

FLAGS = ["--method", "wanda", "--nsamples", "8", "--seqlen", "32", "--format", "hf"]


def test_search_spdy_prunes_the_searched_allocation_and_its_profile_reproduces_it(model_dir, calib, tmp_path, capsys):
    searched = tmp_path / "searched"
    args = ["prune", str(model_dir), *FLAGS, "--sparsity", "0.6", "--calib", str(calib), "--search", "spdy",
            "--search-evaluations", "4", "--out", str(searched)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    line = next(t for t in printed.splitlines() if t.startswith("spdy search: block sparsities"))
    chosen = [float(v) for v in line.split("block sparsities ")[1].split(";")[0].split()]
    assert len(set(chosen)) > 1  # not the uniform allocation: the check below tells the searched one apart
    report = json.loads((searched / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.6, abs=0.01)  # each row of 32 columns rounds its count
    for layer in report["layers"]:  # every layer of block b at the searched sparsity of block b
        block = int(layer["name"].split(".")[2])
        assert layer["sparsity"] == pytest.approx(chosen[block], abs=0.02), layer["name"]
    profile = json.loads((searched / "search_profile.json").read_text())
    assert profile["metric"] == "spdy_damage" and profile["settings"]["evaluations"] == 4
    again = tmp_path / "again"  # the written profile, passed back with --profile, prunes the same weights
    assert main(["prune", str(model_dir), *FLAGS, "--sparsity", "0.6", "--calib", str(calib), "--profile",
                 str(searched / "search_profile.json"), "--out", str(again)]) == 0  # fmt: skip
    assert (again / "model.safetensors").read_bytes() == (searched / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "0.6", "--search", "obc"], "--search must be one of spdy, got 'obc'"),
        (["--search", "spdy"], "sparsity is required"),
        (["--sparsity", "0.6", "--search", "spdy", "--owl"], "drop --owl"),
        (["--sparsity", "0.6", "--search", "spdy", "--allocation", "erk"], "drop allocation 'erk'"),
        (["--sparsity", "0.6", "--search-evaluations", "3"], "--search-evaluations applies to --search spdy"),
        (["--sparsity", "0.6", "--search", "spdy", "--search-evaluations", "0"], "must be an integer >= 1, got 0"),
    ],
)
def test_bad_search_flags_are_refused_before_anything_is_written(model_dir, calib, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["prune", str(model_dir), *FLAGS, "--calib", str(calib), *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_search_refuses_a_factory_model_and_points_to_analyze(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "secateurs.demo:trained_mlp", "--data", "secateurs.demo.data:calibration_batches",
            "--sparsity", "0.5", "--search", "spdy", "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    assert "secateurs analyze" in capsys.readouterr().err and not out.exists()


def test_search_that_loses_to_uniform_prunes_uniformly_and_says_so(model_dir, calib, tmp_path, capsys, monkeypatch):
    import types

    from secateurs.llm import search

    found = types.SimpleNamespace(sparsities={"a": 0.5, "b": 0.7}, loss=2.0, uniform_loss=1.0, profile=None)
    monkeypatch.setattr(search, "search_allocation", lambda *a, **k: found)
    out = tmp_path / "out"
    args = ["prune", str(model_dir), *FLAGS, "--sparsity", "0.6", "--calib", str(calib), "--search", "spdy",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "pruning uniformly" in capsys.readouterr().err
    assert not (out / "search_profile.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert len({round(layer["sparsity"], 2) for layer in report["layers"]}) == 1  # one sparsity everywhere
