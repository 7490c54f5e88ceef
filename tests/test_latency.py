"""Latency is reported with its spread and thread count, dense and pruned are timed alternately,
and noise is called noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
from secateurs.evaluation import LatencyComparison, Spread, compare_latency, measure_latency
from secateurs.structural.report import Measure, StructuralReport


def test_spread_gives_median_quartiles_and_range():
    s = Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.low, s.high, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s.relative_iqr == pytest.approx(2 / 3)


class Recorder(nn.Module):
    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log, self.linear = name, log, nn.Linear(4, 4)

    def forward(self, x):
        self.log.append(self.name)
        return self.linear(x)


def test_dense_and_pruned_are_timed_alternately_after_warmup():
    log: list[str] = []
    result = compare_latency(Recorder("d", log), Recorder("p", log), torch.zeros(1, 4), repeats=4, warmup=2)
    assert log == ["d", "d", "p", "p"] + ["d", "p"] * 4
    assert result.dense_s.n == result.pruned_s.n == result.speedup.n == 4
    assert result.threads == torch.get_num_threads() and result.interleaved


def test_measure_latency_restores_train_mode():
    model = nn.Linear(4, 4).train()
    assert measure_latency(model, torch.zeros(1, 4), repeats=3).median > 0
    assert model.training


def _report(speedup: Spread, macs_after: int = 500) -> StructuralReport:
    timing = LatencyComparison(Spread.of([2e-3] * 3), Spread.of([1e-3] * 3), speedup, threads=2)
    return StructuralReport([], Measure(100, 1000), Measure(50, macs_after), 0.1, latency=timing)


def test_a_clean_measurement_prints_spread_and_threads_without_warnings():
    report = _report(Spread.of([1.9, 2.0, 2.0, 2.1]))
    text = report.table()
    assert "latency: median of 3 runs each, alternating, 2 thread(s)" in text and "IQR" in text
    assert "speed-up 2.00x" in text and "efficiency 1.00" in text
    assert report.latency_warnings == [] and "WARNING" not in text


def test_a_wide_spread_is_called_noise():
    report = _report(Spread.of([1.0, 1.5, 2.0, 2.5, 3.0]))
    assert any("latency is noisy here" in w for w in report.latency_warnings)
    assert "WARNING: latency is noisy" in report.table()


def test_a_speedup_well_beyond_the_macs_reduction_is_called_implausible():
    report = _report(Spread.of([26.3, 26.4, 26.5]), macs_after=260)  # 3.8x fewer MACs, "26x faster"
    assert report.latency_efficiency > 1.2
    assert any("implausible" in w for w in report.latency_warnings)
    assert report.to_dict()["latency_warnings"] == report.latency_warnings


def test_a_removal_report_times_a_dense_copy_against_the_pruned_model():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    report = secateurs.prune(model, "magnitude", 0.75, mode="remove", example_inputs=torch.randn(4, 64), progress=False)
    assert report.latency.interleaved and report.latency.speedup.n == 20
    assert report.before.latency_s == report.latency.dense_s.median
    assert model[0].out_features == 64  # the copy was timed, the model itself was pruned


class NoCopy(nn.Sequential):
    def __deepcopy__(self, memo):
        raise TypeError("holds a handle that cannot be copied")


def test_a_model_that_cannot_be_copied_is_timed_one_after_the_other_and_says_so():
    model = NoCopy(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    report = secateurs.prune(model, "magnitude", 0.5, mode="remove", example_inputs=torch.randn(2, 8), progress=False)
    assert not report.latency.interleaved
    assert any("one after the other" in w and "cannot be copied" in w for w in report.latency_warnings)
