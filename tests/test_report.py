"""Reports count what changed: per layer, totals, MACs, bytes, collapse."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.patterns import NM, Element
from secateurs.report import compressed_bytes


def test_per_layer_and_total_counts(cnn):
    report = prune(cnn, "magnitude", 0.5, example_inputs=torch.zeros(1, 3, 6, 6))
    all_params = sum(p.numel() for p in cnn.parameters())
    assert report.params == all_params
    assert report.target_params == sum(layer.params for layer in report.layers)
    assert report.nonzeros == sum(int((p != 0).sum()) for p in cnn.parameters()) - report.target_params // 2
    for layer in report.layers:
        assert layer.nonzeros == layer.params - round(0.5 * layer.params)


def test_effective_macs_drop_by_the_density_of_each_pruned_layer(mlp):
    report = prune(mlp, "magnitude", 0.75, example_inputs=torch.zeros(1, 16))
    assert report.macs_dense == 16 * 32 + 32 * 24 + 24 * 4
    assert report.macs_effective == 16 * 32 // 4 + 32 * 24 // 4 + 24 * 4


def test_two_four_report_checks_pattern_validity(cnn):
    report = prune(cnn, "magnitude", pattern="2:4")
    assert all(layer.pattern_valid for layer in report.layers)
    assert report.bytes_compressed < report.bytes_dense


def test_compressed_size_estimates():
    # 2:4 on 64 fp32 weights: 32 values (128 B) + 2-bit indices (8 B)
    assert compressed_bytes(NM(2, 4), (4, 1, 16), 32, 4) == 136
    # element: bitmask (8 B) + 10 values (40 B)
    assert compressed_bytes(Element(), (4, 1, 16), 10, 4) == 48
    # never more than dense
    assert compressed_bytes(Element(), (4, 1, 16), 64, 4) == 256


def test_layer_collapse_and_disconnection_are_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    report = prune(model, "magnitude", allocation={"2": 0.0}, example_inputs=torch.zeros(1, 4))
    assert report.connected is True and not report.collapsed_layers
    with torch.no_grad():
        model[2].parametrizations.weight.original.zero_()
    report = prune(model, "magnitude", 0.0, example_inputs=torch.zeros(1, 4), allow_collapse=True)
    assert report.collapsed_layers == ["2.weight"]
    assert report.connected is False
    assert "LAYER COLLAPSE" in report.table() and "DISCONNECTED" in report.table()


def test_dead_rows_and_columns_are_counted(mlp):
    report = prune(mlp, "magnitude", 0.5, pattern="output_channel")
    first = report.layers[0]
    assert first.dead_outputs == 16 and first.dead_inputs == 0


def test_json_output_holds_layers_totals_and_config(mlp, tmp_path):
    report = prune(mlp, "magnitude", 0.5, allocation="global")
    path = tmp_path / "report.json"
    report.to_json(path)
    data = json.loads(path.read_text())
    assert data["config"]["method"] == "magnitude" and data["config"]["allocation"] == "global"
    assert data["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [layer["name"] for layer in data["layers"]] == ["0.weight", "2.weight"]
