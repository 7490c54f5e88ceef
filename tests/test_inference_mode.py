"""Pruning inside ``torch.inference_mode()`` leaves a model that can still be trained, and gradient
criteria work there too (or, for weights that are themselves inference tensors, say why not)."""

from __future__ import annotations

import pytest
import torch

import secateurs
from conftest import small_cnn, small_mlp

X_CNN = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _train_one_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("mode", ["mask", "bake"])
def test_masks_and_baked_zeros_made_in_inference_mode_train(mode):
    model = small_mlp()
    with torch.inference_mode():
        secateurs.prune(model, "magnitude", 0.5, mode=mode, progress=False)
    _train_one_step(model, torch.randn(4, 16))
    if mode == "mask":
        assert all((t.weight == 0).float().mean() == 0.5 for t in secateurs.masking.masked_targets(model))


def test_a_structural_removal_made_in_inference_mode_trains():
    model = small_cnn().eval()
    with torch.inference_mode():
        secateurs.prune(model, "magnitude", 0.5, mode="remove", pattern="channel", example_inputs=X_CNN[:1],
                        progress=False, structural={"latency": False})  # fmt: skip
    assert not any(p.is_inference() for p in model.parameters())
    _train_one_step(model.train(), X_CNN)


def test_gradient_criteria_work_inside_inference_mode():
    model = small_cnn()
    batches = [(X_CNN, torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(1)))]
    with torch.inference_mode():
        report = secateurs.prune(model, "taylor", 0.5, calibration=batches, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    _train_one_step(model, X_CNN)


def test_gradient_criteria_on_weights_made_in_inference_mode_say_why_they_cannot():
    with torch.inference_mode():
        model = small_mlp()
    with pytest.raises(secateurs.StateError, match=r"taylor.*created inside torch.inference_mode\(\)"):
        secateurs.prune(model, "taylor", 0.5, calibration=[(torch.randn(2, 16), torch.tensor([0, 1]))], progress=False)


def test_loaded_masks_and_unmask_in_inference_mode_leave_trainable_tensors(tmp_path):
    source = small_mlp()
    secateurs.prune(source, "magnitude", 0.5, progress=False)
    secateurs.save_masks(source, tmp_path / "m.safetensors")
    model = small_mlp()
    with torch.inference_mode():
        secateurs.load_masks(model, tmp_path / "m.safetensors")
    _train_one_step(model, torch.randn(4, 16))
