"""The KL-scale selection of ``bench/training_sparse_vd.py``: chosen on training images only.

The selection is only honest if the validation split is disjoint from what the model trains on,
the same on every call, and never touches the test set; and if the rule picks what it says.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from secateurs.demo.data import load_digits
from training_sparse_vd import merge_runs, result_name, select_scale, validation_split


def _rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """The (image, label) pairs as a multiset: sklearn's digits hold a few duplicate images."""
    return Counter((bytes(r.numpy().tobytes()), int(label)) for r, label in zip(x.flatten(1), y))


def test_validation_split_is_disjoint_and_covers_the_training_images():
    data = load_digits()
    fit, val = validation_split(data, 0.2, seed=0)
    assert len(val.x_train) == pytest.approx(0.2 * len(data.x_train), abs=1)
    # a partition: every training image lands on exactly one side, as many times as it occurs
    assert _rows(fit.x_train, fit.y_train) + _rows(val.x_train, val.y_train) == _rows(data.x_train, data.y_train)


def test_validation_split_never_uses_the_test_images():
    data = load_digits()
    fit, val = validation_split(data, 0.2, seed=0)
    assert torch.equal(fit.x_test, data.x_test)  # the held-out test set is passed through untouched
    assert torch.equal(val.x_train, val.x_test)  # the 'test' side of the validation set is the validation images
    assert not (_rows(val.x_train, val.y_train) - _rows(data.x_train, data.y_train))


def test_validation_split_is_deterministic_and_stratified():
    data = load_digits()
    a, _ = validation_split(data, 0.2, seed=0)
    b, _ = validation_split(data, 0.2, seed=0)
    c, _ = validation_split(data, 0.2, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    _, val = validation_split(data, 0.2, seed=0)
    share = torch.bincount(val.y_train, minlength=10) / torch.bincount(data.y_train, minlength=10)
    assert torch.all((share - 0.2).abs() < 0.03)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_validation_split_refuses_an_empty_side(fraction):
    with pytest.raises(ValueError, match="validation fraction"):
        validation_split(load_digits(), fraction, seed=0)


def test_select_scale_takes_the_largest_scale_within_tolerance():
    assert select_scale({1.0: 1.5, 0.5: 0.4, 0.25: 0.0, 0.1: 0.0}, 0.5) == (0.5, True)
    assert select_scale({1.0: 0.5, 0.5: 0.0}, 0.5) == (1.0, True)  # the bound is inclusive
    assert select_scale({1.0: 0.7, 0.5: 2.0, 0.25: 0.2}, 0.5) == (0.25, True)  # not monotone: still the largest


def test_select_scale_reports_a_miss_instead_of_hiding_it():
    assert select_scale({1.0: 3.0, 0.5: 1.1, 0.1: 1.1}, 0.5) == (0.5, False)  # smallest drop, larger scale on ties
    with pytest.raises(ValueError):
        select_scale({}, 0.5)


def test_result_name_records_the_kl_grid_and_keeps_the_old_protocol_file():
    def args(**kw):
        base = {"kl_scales": [1.0], "validation_fraction": None, "lr_schedules": ["constant", "linear"],
                "seeds": [0, 1, 2], "dense_steps": 1500, "vd_steps": 3000}  # fmt: skip
        return argparse.Namespace(**(base | kw))

    assert result_name(args()) == "training_sparse_vd"
    assert result_name(args(kl_scales=[0.25])) == "training_sparse_vd_kl0.25"
    assert (
        result_name(args(kl_scales=[1.0, 0.1], validation_fraction=0.2, lr_schedules=["linear"]))
        == "training_sparse_vd_kl1-0.1_val0.2_lr-linear"
    )
    # a partial or shortened run never lands on the three-seed protocol's file
    assert result_name(args(seeds=[1])) == "training_sparse_vd_s1"
    assert result_name(args(vd_steps=300)) == "training_sparse_vd_d1500_v300"


def _run(scales, dense=0.97, **changes):
    args = {"seeds": [0], "dense_steps": 1500, "vd_steps": 3000, "lr_schedules": ["linear"], "kl_scales": scales,
            "validation_fraction": 0.2, "split_seed": 0, "tolerance": 0.5} | changes  # fmt: skip
    rows = [{"phase": "select", "seed": 0, "kl_scale": s, "dense_accuracy": dense, "dense_val_accuracy": dense}
            for s in scales]  # fmt: skip
    return {"args": args, "rows": rows}


def test_merge_runs_joins_a_grid_extended_by_a_second_run():
    args, rows = merge_runs([_run([1.0, 0.1]), _run([0.05])])
    assert args["kl_scales"] == [1.0, 0.1, 0.05]
    assert [r["kl_scale"] for r in rows] == [1.0, 0.1, 0.05]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (_run([0.05], vd_steps=100), "differ in"),
        (_run([0.1]), "share KL scales"),
        (_run([0.05], dense=0.5), "dense models differ"),
    ],
)
def test_merge_runs_refuses_runs_of_different_protocols(second, message):
    with pytest.raises(ValueError, match=message):
        merge_runs([_run([1.0, 0.1]), second])
