"""Uniform removal at the knapsack's latency in ``bench/sensitivity_cnn_latency.py``.

Uniform's latency is a step function of its sparsity (channel counts rounded), so the bench
evaluates the measured uniform points just slower and just faster than the knapsack and
interpolates their accuracies at its latency; it must never extrapolate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from sensitivity_cnn_latency import _brackets, _interpolated

ROUNDS = [{"sparsity": 0.45, "ratio": 0.41}, {"sparsity": 0.225, "ratio": 0.76}, {"sparsity": 0.394, "ratio": 0.487},
          {"sparsity": 0.387, "ratio": 0.643}, {"sparsity": 0.38, "ratio": 0.689}]  # fmt: skip


def _row(name: str, ratio: float, acc: float) -> dict:
    return {"allocation": name, "ratio": ratio, "accuracy_raw": acc, "accuracy": acc, "accuracy_finetuned": acc}


def test_the_tightest_measured_points_on_each_side_bracket_the_target():
    sides = _brackets(ROUNDS, 0.55)
    assert sides["slower"]["sparsity"] == 0.387 and sides["faster"]["sparsity"] == 0.394
    assert set(_brackets(ROUNDS, 0.3)) == {"slower"}  # every uniform point is slower: no faster side


def test_accuracies_are_interpolated_in_latency_and_never_extrapolated():
    ours = _row("sensitivity (knapsack)", 0.6, 0.9)
    rows = [ours, _row("uniform 0.387 (slower)", 0.7, 0.98), _row("uniform 0.394 (faster)", 0.5, 0.78)]
    got = _interpolated(rows)
    assert got["weight_of_slower"] == pytest.approx(0.5) and got["accuracy"] == pytest.approx(0.88)
    outside = _interpolated([_row("sensitivity (knapsack)", 0.75, 0.9), *rows[1:]])
    assert "reason" in outside and "accuracy" not in outside
    assert "reason" in _interpolated(rows[:2])
