"""Loading a structurally pruned model is all or nothing, and a refused removal leaves no plan."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from structural_nets import resnet_like
from torch import nn

import secateurs
from conftest import assert_unchanged, fingerprint
from secateurs import StateError, StructureError
from secateurs.errors import CheckpointError
from secateurs.structural import load_structured, plan_of, save_structured

X = torch.randn(1, 3, 8, 8)


def _saved(tmp_path, width: int = 8):
    model = resnet_like(width=width).eval()
    secateurs.prune(model, "magnitude", 0.5, mode="remove", example_inputs=X, progress=False,
                    structural={"latency": False})  # fmt: skip
    save_structured(model, tmp_path / "m")
    return model, tmp_path / "m"


def _edit_weights(path, edit) -> None:
    file = path / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update({k: torch.zeros(3) for k in list(s)[-1:]}), r"shape mismatch"),
        (lambda s: s.pop(next(iter(s))), r"missing"),
        (lambda s: s.update({"extra.weight": torch.zeros(2)}), r"unexpected extra.weight"),
    ],
    ids=["wrong-shape", "missing", "unexpected"],
)
def test_weights_that_do_not_fit_leave_the_given_model_exactly_as_it_was(tmp_path, edit, match):
    _, path = _saved(tmp_path)
    _edit_weights(path, edit)
    fresh = resnet_like(width=8)
    before = fingerprint(fresh)
    with pytest.raises(CheckpointError, match=match):
        load_structured(path, fresh)
    assert_unchanged(fresh, before)  # not resized, not partly loaded
    assert plan_of(fresh) is None


def test_a_truncated_weights_file_is_a_typed_error(tmp_path):
    _, path = _saved(tmp_path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    fresh = resnet_like(width=8)
    before = fingerprint(fresh)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_structured(path, fresh)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda p: "{not json", CheckpointError, "not valid JSON"),
        (lambda p: json.dumps({**p, "steps": [{"cuts": "x"}]}), CheckpointError, "malformed"),
        (lambda p: json.dumps(_keep(p, "0-999")), StructureError, "not sorted, unique positions"),
        (lambda p: json.dumps(_keep(p, "3,1")), StructureError, "not sorted, unique positions"),
        (lambda p: json.dumps({**p, "base": {"hf_class": "pipeline", "config": {}}}), StateError, "no model class"),
    ],
    ids=["not-json", "malformed", "index-out-of-range", "unsorted", "not-a-model-class"],
)
def test_a_corrupted_plan_is_refused_before_the_model_changes(tmp_path, edit, error, match):
    _, path = _saved(tmp_path)
    plan_file = path / "pruning_plan.json"
    plan_file.write_text(edit(json.loads(plan_file.read_text())))
    fresh = resnet_like(width=8)
    before = fingerprint(fresh)
    with pytest.raises(error, match=match):
        load_structured(path, None if "hf_class" in plan_file.read_text() else fresh)
    assert_unchanged(fresh, before)


def _keep(plan: dict, keep: str) -> dict:
    plan["steps"][0]["cuts"][0]["keep"] = keep
    return plan


def test_the_round_trip_still_works(tmp_path):
    model, path = _saved(tmp_path)
    loaded = load_structured(path, resnet_like(width=8))
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)


def test_a_refused_removal_leaves_no_plan_so_nothing_can_be_saved_as_pruned(tmp_path):
    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 64, 2)

        def forward(self, x):
            return self.fc(self.conv(x).reshape(-1, 8 * 64))  # assumes 8 channels

    model = HardCoded().eval()
    before = fingerprint(model)
    with pytest.raises(StructureError, match="restored"):
        secateurs.prune(model, "magnitude", 0.5, mode="remove", example_inputs=X, progress=False,
                        structural={"latency": False})  # fmt: skip
    assert_unchanged(model, before)
    assert plan_of(model) is None
    with pytest.raises(StateError, match="carries no pruning plan"):
        save_structured(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
