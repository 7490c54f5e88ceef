"""bench/sensitivity_cnn_latency.py's own pieces: the knapsack's grid flag and the cached latency table
(measured once per cell, reused by a rerun, re-measured on request)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "sensitivity_cnn_latency.py"


def _load_bench():
    import sys

    sys.path.insert(0, str(_PATH.parent))  # the script imports its neighbours (_common, structural_models)
    spec = importlib.util.spec_from_file_location("sensitivity_cnn_latency", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_the_grid_flag_sorts_dedupes_and_refuses_sparsities_outside_the_open_interval():
    assert bench._grid("0.5,0.2,0.5") == (0.2, 0.5)
    for bad in ("0.2,1.0", "0", "a,b", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._grid(bad)


def test_the_latency_table_has_one_ratio_per_cell_and_a_rerun_reads_it_back(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from secateurs.analysis.profile import Cell

    torch.manual_seed(0)
    model = bench.small_resnet(2).eval()
    inputs = torch.randn(2, 3, 8, 8)
    dense = sum(p.numel() for p in model.parameters())
    groups = ("0", "3.conv1", "5.conv2")  # the stem's channels (with the residual stream's), two blocks' insides
    profile = SimpleNamespace(cells=[Cell(target=g, sparsity=0.5, metric=0.0) for g in groups])
    calls = []

    def fake(dense_model, pruned, inputs, repeats):  # the parameters left stand in for a timing
        calls.append(sum(p.numel() for p in pruned.parameters()))
        return {"ratio": calls[-1] / dense}

    monkeypatch.setattr(bench, "_latency", fake)
    args = argparse.Namespace(grid=(0.5,), width=2, size=8, train_steps=0, batch=2, round_to=1, repeats=1,
                              cache=str(tmp_path), fresh_table=False, validation_fraction=0.0)  # fmt: skip
    table = bench._latency_table(model, profile, inputs, args)
    assert len(calls) == 3 and len(set(calls)) == 3 and max(calls) < dense  # each cell: its own group removed
    assert [table[f"{g}@0.5"] for g in groups] == [c / dense for c in calls]
    assert bench._latency_table(model, profile, inputs, args) == table
    assert len(calls) == 3  # read back, not measured again
    args.fresh_table = True
    assert bench._latency_table(model, profile, inputs, args) == table
    assert len(calls) == 6


def test_a_validation_split_holds_out_training_images_that_no_training_batch_contains():
    train, val, test = bench._digits(8, 0.2)
    train_x = torch.cat([x for x, _ in train])
    val_x = torch.cat([x for x, _ in val])
    assert len(train_x) + len(val_x) == 1347 and len(val_x) == 270  # a fifth of the training images
    assert sum(len(y) for _, y in test) == 450  # the test images untouched
    seen = {tuple(x.flatten().tolist()) for x in train_x}
    assert not any(tuple(x.flatten().tolist()) in seen for x in val_x)
    labels = torch.cat([y for _, y in val])
    assert set(labels.tolist()) == set(range(10))  # stratified: every class held out
    plain_train, no_val, _ = bench._digits(8)
    assert no_val is None and sum(len(y) for _, y in plain_train) == 1347


def test_a_validation_split_gets_its_own_model_cells_and_results_names():
    base = dict(width=32, size=32, train_steps=300, batch=8, bn_batches=10, grid=(0.25, 0.5, 0.75), round_to=1,
                cell_finetune=0, finetune_lr=1e-3, budget=0.5, relinearize=0, latency="macs", cache="c")  # fmt: skip
    plain = argparse.Namespace(**base, validation_fraction=0.0)
    held = argparse.Namespace(**base, validation_fraction=0.2)
    assert bench._table_dir(plain) != bench._table_dir(held)
    assert bench._result_name(plain) != bench._result_name(held)
    assert bench._result_name(held).endswith("_val0.2")
