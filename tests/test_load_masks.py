"""load_masks is all or nothing, and refuses what it should: names outside the pruning scope,
non-boolean values, unknown names, partial files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import secateurs
import secateurs.masking as masking
from conftest import assert_unchanged, fingerprint, small_mlp
from secateurs.errors import CheckpointError, StateError


@pytest.fixture
def saved(tmp_path):
    model = small_mlp()
    secateurs.prune(model, "magnitude", 0.5, scope={"skip_first": False, "skip_last": False}, progress=False)
    path = tmp_path / "masks.safetensors"
    secateurs.save_masks(model, path)
    return path


def _edit(path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
        metadata = f.metadata()
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _refused(path, error, match, mode="mask"):
    model = small_mlp()
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        secateurs.load_masks(model, path, mode=mode)
    assert_unchanged(model, before)
    assert masking.masked_targets(model) == []


def test_a_failure_while_attaching_leaves_no_mask_behind(saved, monkeypatch):
    calls = []
    real = masking.attach

    def flaky(target, mask):
        calls.append(target.name)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        real(target, mask)

    monkeypatch.setattr(masking, "attach", flaky)
    _refused(saved, RuntimeError, "out of memory")


def test_a_failure_while_baking_puts_the_weights_back(saved, monkeypatch):
    real = masking.bake_target
    calls = []

    def flaky(target, mask):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        real(target, mask)

    monkeypatch.setattr(masking, "bake_target", flaky)
    _refused(saved, RuntimeError, "disk full", mode="bake")


def test_a_mask_for_a_bias_is_refused(saved):
    _edit(saved, lambda t, m: (t.update({"0.bias": torch.ones(32, dtype=torch.uint8)}),
                               m.update(targets='["0.bias", "0.weight", "2.weight", "4.weight"]')))  # fmt: skip
    _refused(saved, StateError, r"'0.bias'.*not a weight secateurs prunes")


def test_float_values_are_refused_not_read_as_keep(saved):
    _edit(saved, lambda t, m: t.update({"0.weight": torch.full_like(t["0.weight"], 0.25, dtype=torch.float32)}))
    _refused(saved, CheckpointError, r"'0.weight'.*not boolean")


def test_values_other_than_zero_and_one_are_refused(saved):
    _edit(saved, lambda t, m: t.update({"2.weight": t["2.weight"] * 2}))
    _refused(saved, CheckpointError, r"'2.weight'.*not boolean")


def test_an_unknown_name_is_a_typed_error(saved):
    _edit(saved, lambda t, m: (t.update({"nope.weight": t.pop("0.weight")}),
                               m.update(targets='["2.weight", "4.weight", "nope.weight"]')))  # fmt: skip
    _refused(saved, StateError, r"'nope.weight'.*names no module")


def test_a_file_missing_some_of_its_masks_is_refused(saved):
    _edit(saved, lambda t, m: t.pop("2.weight"))
    _refused(saved, CheckpointError, r"holds 2 mask\(s\) but was saved with 3.*missing \['2.weight'\]")


def test_a_file_that_is_not_a_masks_file_is_refused(saved):
    _edit(saved, lambda t, m: m.update(format="pt"))
    _refused(saved, CheckpointError, "not a secateurs masks file")


def test_a_pickle_is_refused_unread(tmp_path):
    path = tmp_path / "masks.pt"
    torch.save({"0.weight": torch.ones(32, 16)}, path)
    _refused(path, CheckpointError, "not a readable safetensors file")


def test_a_mask_of_the_wrong_shape_is_refused(saved):
    _edit(saved, lambda t, m: t.update({"4.weight": torch.ones(3, 3, dtype=torch.uint8)}))
    _refused(saved, StateError, r"'4.weight' has shape \(3, 3\)")


def test_the_round_trip_still_works(saved):
    model = small_mlp()
    assert sorted(secateurs.load_masks(model, saved)) == ["0.weight", "2.weight", "4.weight"]
    assert all((t.weight == 0).float().mean() == 0.5 for t in masking.masked_targets(model))


def test_an_unknown_tensor_of_a_known_module_is_a_typed_error(saved):
    _edit(saved, lambda t, m: (t.update({"0.gamma": t.pop("0.weight")}),
                               m.update(targets='["0.gamma", "2.weight", "4.weight"]')))  # fmt: skip
    _refused(saved, StateError, r"'0.gamma'.*not a weight secateurs prunes")
