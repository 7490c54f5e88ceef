"""``secateurs analyze``: a profile, a table and plots; resumable; its profile drives ``secateurs prune``."""

from __future__ import annotations

import json

import pytest

from secateurs.analysis import SensitivityProfile
from secateurs.cli import main

TRAINED = "analysis_models:net"
DATA = "analysis_models:batches"
MODELS = """
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
"""


@pytest.fixture(autouse=True)
def _models(tmp_path, monkeypatch):
    (tmp_path / "analysis_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)


def test_analyze_writes_a_profile_table_and_plots_and_a_rerun_resumes(tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", TRAINED, "--data", DATA, "--grid", "0.5,0.9", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "loss of the dense model" in printed and "wrote" in printed
    profile = SensitivityProfile.load(out / "profile.json")
    assert len(profile.cells) == 2 * len(profile.entries) and not profile.missing()
    assert (out / "profile.csv").exists()
    lines = (out / "cells.jsonl").read_text().splitlines()
    lines = lines[:1]  # as if interrupted after the first cell
    (out / "cells.jsonl").write_text("\n".join(lines) + "\n")
    assert main(args) == 0
    again = SensitivityProfile.load(out / "profile.json")
    assert [(c.target, c.sparsity, c.metric) for c in again.cells] == [
        (c.target, c.sparsity, c.metric) for c in profile.cells
    ]
    assert len((out / "cells.jsonl").read_text().splitlines()) == len(profile.cells)
    assert main(["analyze", TRAINED, "--data", DATA, "--grid", "0.3", "--out", str(out)]) == 2
    assert "another grid" in capsys.readouterr().err


def test_prune_allocates_by_the_profile_and_refuses_an_unreachable_budget(tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", TRAINED, "--data", DATA, "--grid", "0.3,0.6,0.9", "--out", str(out)]) == 0
    profile = str(out / "profile.json")
    pruned = tmp_path / "pruned"
    assert (
        main(["prune", TRAINED, "--data", DATA, "--sparsity", "0.6", "--profile", profile, "--out", str(pruned)]) == 0
    )
    report = json.loads((pruned / "report.json").read_text())
    assert report["config"]["allocation"] == "sensitivity"
    capsys.readouterr()
    code = main(
        [
            "prune",
            TRAINED,
            "--data",
            DATA,
            "--profile",
            profile,
            "--budget",
            "params=10",
            "--out",
            str(tmp_path / "nope"),
        ]
    )
    assert code == 2 and "reachable params is" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


@pytest.mark.slow  # matplotlib's import and rendering take seconds
def test_analyze_plots_curves_and_a_heatmap(tmp_path):
    out = tmp_path / "analysis"
    assert main(["analyze", TRAINED, "--data", DATA, "--grid", "0.5,0.9", "--out", str(out), "--plot"]) == 0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
