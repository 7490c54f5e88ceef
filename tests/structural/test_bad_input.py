"""Bad input: clear errors with the numbers, and a model left bit-identical."""

from __future__ import annotations

import pytest
import torch
from structural_nets import TinyTransformer, resnet_like
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

import secateurs
from conftest import assert_unchanged, fingerprint
from secateurs import ConfigError, DataRequiredError, Pruner, StructureError
from secateurs.io import OutputExistsError
from secateurs.structural import load_structured, save_structured

QUIET = {"latency": False}
X = torch.randn(1, 3, 8, 8)


def _remove(model, sparsity=0.5, **kw):
    kw.setdefault("structural", QUIET)
    kw.setdefault("example_inputs", X)
    return secateurs.prune(model, kw.pop("method", "magnitude"), sparsity, mode="remove", progress=False, **kw)


def test_asking_for_every_head_of_a_layer_is_refused_with_the_numbers():
    model = TinyTransformer(heads=4).eval()
    ids = torch.randint(0, 50, (2, 6))
    before = fingerprint(model)
    with pytest.raises(ConfigError, match=r"has 4 head units; the requested sparsity removes 4, but at most 3"):
        _remove(model, 0.9, pattern="head", example_inputs=ids)
    assert_unchanged(model, before)


def test_max_ratio_and_keep_at_least_bound_every_group():
    model = resnet_like(width=16).eval()
    report = _remove(model, 0.9, allocation="global", structural={**QUIET, "max_ratio": 0.5})
    assert all(g.units_after >= g.units_before // 2 for g in report.groups)
    model = resnet_like(width=16).eval()
    report = _remove(model, 0.95, allocation="global", structural={**QUIET, "keep_at_least": 3})
    assert all(g.units_after >= 3 for g in report.groups)


def test_round_to_keeps_multiples_of_eight():
    model = resnet_like(width=32).eval()
    report = _remove(model, 0.3, structural={**QUIET, "round_to": 8})
    assert all(g.units_after % 8 == 0 for g in report.groups)  # 32 * 0.7 = 22.4 -> 24


def test_a_hard_coded_shape_is_caught_by_the_forward_check_and_the_model_restored():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8 * 64, 2)

        def forward(self, h):
            return self.fc(h.reshape(-1, 8 * 64))  # assumes 8 channels

    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = Head()

        def forward(self, x):
            h = self.conv(x).flatten(2).transpose(1, 2)
            return self.head(self.attn(h, h, h)[0])

    model = HardCoded().eval()
    before = fingerprint(model)
    with pytest.raises(StructureError, match=r"fails in 'head' \(Head\).*shape '\[-1, 512\]'.*restored"):
        _remove(model, pattern="head+channel+hidden")
    assert_unchanged(model, before)  # includes the MultiheadAttention class, replaced then put back
    assert isinstance(model.attn, nn.MultiheadAttention)


def test_fixed_size_splits_name_the_op_and_the_way_out():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            left, right = self.a(x).split([4, 4], dim=1)
            return self.b(left) + self.c(right)

    with pytest.raises(StructureError, match=r"split.*fixed sizes \[4, 4\].*exclude.*register_handler"):
        _remove(Split().eval(), pattern="channel")


def test_structural_inputs_are_validated_before_anything_runs():
    model = resnet_like()
    with pytest.raises(ConfigError, match="mode='remove'"):
        secateurs.prune(model, "bn_scale", 0.5, mode="mask")
    with pytest.raises(ConfigError, match="not one of"):
        _remove(model, pattern="2:4")
    with pytest.raises(ConfigError, match="erk"):
        _remove(model, allocation="erk")
    with pytest.raises(ConfigError, match="shortgpt"):
        _remove(model, pattern="layer")
    with pytest.raises(ConfigError, match="unknown structural option"):
        _remove(model, structural={"round": 8})
    with pytest.raises(ConfigError, match="only with mode='remove'"):
        secateurs.prune(model, "magnitude", 0.5, structural={"round_to": 8})
    with pytest.raises(DataRequiredError, match="example_inputs"):
        Pruner(model, "magnitude", 0.5, mode="remove")
    with pytest.raises(DataRequiredError, match="example_inputs"):
        secateurs.prune(model, "magnitude", 0.5, mode="remove", progress=False)
    with pytest.raises(DataRequiredError, match="calibration"):
        _remove(model, method="taylor")


def test_a_plan_refuses_a_different_architecture_before_touching_it(tmp_path):
    model = resnet_like(width=8).eval()
    _remove(model)
    save_structured(model, tmp_path / "m")
    other = resnet_like(width=12)
    before = fingerprint(other)
    with pytest.raises(StructureError, match=r"expects 0\.weight with size 8"):
        load_structured(tmp_path / "m", other)
    assert_unchanged(other, before)
    with pytest.raises(secateurs.StateError, match="construct the unpruned model"):
        load_structured(tmp_path / "m")


def test_an_existing_output_is_not_overwritten(tmp_path):
    model = resnet_like().eval()
    _remove(model)
    save_structured(model, tmp_path / "m")
    with pytest.raises(OutputExistsError, match="exists"):
        save_structured(model, tmp_path / "m")


def test_masked_or_reparametrized_weights_are_refused_before_removal():
    """Slicing a weight under a mask would leave the mask at the old shape: refuse, name the fix."""
    model = resnet_like(width=8).eval()
    secateurs.prune(model, "magnitude", 0.5, pattern="channel")
    before = fingerprint(model)
    with pytest.raises(StructureError, match=r"carry secateurs masks .*secateurs.bake\(model\)"):
        _remove(model)
    assert_unchanged(model, before)
    secateurs.bake(model)
    _remove(model)  # baked zeros are ordinary weights

    model = resnet_like(width=8).eval()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    torch_prune.l1_unstructured(conv, "weight", 0.5)
    with pytest.raises(StructureError, match=r"torch.nn.utils.prune masks \(weight_orig\)"):
        _remove(model)
    torch_prune.remove(conv, "weight")
    parametrize.register_parametrization(conv, "weight", nn.Identity())
    with pytest.raises(StructureError, match=r"parametrized tensors \['weight'\].*remove_parametrizations"):
        _remove(model)
