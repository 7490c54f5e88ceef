"""Channel removal on torchvision's classification zoo (every model ``list_models`` registers).

Each model, random init: 30% of every channel group removed through ``secateurs.prune`` either
succeeds (smaller model, same output shape, finite outputs) or is refused with a reason this file
whitelists; and on a fresh copy the zero-unit check holds: zeroing exactly the channels about to be
removed and then removing them leaves the outputs unchanged (see ``bench/_vision_zoo.py`` for why
groups feeding a LayerNorm are left out of that check, and counted). A few models at 32x32 run in
the default suite; the whole zoo at 224x224 is slow-marked. ``bench/structural_vision_zoo.py`` is
the same sweep against Torch-Pruning.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from secateurs.errors import StructureError

pytest.importorskip("torchvision", reason="the `vision` extra (pip install secateurs[vision])")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _vision_zoo as vz  # bench/ on the path first; tests/conftest.py imported torchvision

ZOO = vz.zoo()
#: model-name prefix -> the refusal text expected (none today: every model of the zoo removes channels)
REFUSED: dict[str, str] = {}
#: default suite: three zoo models as they are (a plain ResNet, a MobileNet with squeeze-excitation,
#: ShuffleNet's channel shuffle), and small instances of the classes the fixes of this sweep touch
#: (ConvNeXt's LayerNorm2d, ViT's hidden_dim, Swin / Swin-v2 / MaxViT window attention)
FAST = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"]
SMALL = ["vit", "convnext", "swin", "swin_v2", "maxvit"]


def _refusal(name: str) -> str | None:
    return next((why for prefix, why in REFUSED.items() if name.startswith(prefix)), None)


def _sweep_one(name: str, size: int) -> None:
    build = (lambda seed=0: vz.small(name, seed)) if name in SMALL else (lambda seed=0: vz.build(name, size, seed))
    model, x = build()
    with torch.no_grad():
        dense = model(x)
    before = vz.params(model)
    expected = _refusal(name)
    try:
        report = vz.prune_ours(model, x)
    except StructureError as exc:
        assert expected is not None and expected in str(exc), f"{name} refused: {exc}"
        assert vz.params(model) == before  # a refusal leaves the model as it was
        return
    assert expected is None, f"{name} is whitelisted as refused ({expected!r}) but now succeeds: update REFUSED"
    assert report.after.params < 0.9 * report.before.params == 0.9 * before
    with torch.no_grad():
        out = model(x)
    assert out.shape == dense.shape and torch.isfinite(out).all()

    check = vz.zero_unit_check(*build())
    assert check["checked"] > 0, check
    assert check["exact"], f"{name}: removing zeroed channels changed the outputs: {check}"


def test_the_fast_subset_is_part_of_the_zoo():
    assert set(FAST) <= set(ZOO) and len(ZOO) >= 60


@pytest.mark.parametrize("name", FAST + SMALL)
def test_channel_removal_on_a_zoo_model_at_32px(name):
    _sweep_one(name, 32)


def test_the_zero_unit_check_fails_when_the_channels_are_not_zeroed(monkeypatch):
    """The check is not vacuous: removing the same channels without zeroing them changes outputs."""
    monkeypatch.setattr(vz, "zero_units", lambda model, graph, removed: None)
    check = vz.zero_unit_check(*vz.build("resnet18", 32))
    assert check["checked"] > 0 and not check["exact"] and check["relative_diff"] > 1e-3


def test_vit_hidden_dim_follows_the_patch_embedding_and_replays_from_a_saved_plan(tmp_path):
    from secateurs.structural import load_structured, save_structured

    model, x = vz.small("vit")
    vz.prune_ours(model, x)
    assert model.hidden_dim == model.conv_proj.out_channels < 64
    save_structured(model, tmp_path / "vit", overwrite=True)
    fresh, _ = vz.small("vit", seed=1)
    loaded = load_structured(tmp_path / "vit", fresh)
    assert loaded.hidden_dim == model.hidden_dim
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_swin_attention_freezes_its_input_channels_with_the_reason():
    from secateurs.structural import DependencyGraph

    model, x = vz.small("swin")
    graph = DependencyGraph(model, x)
    frozen = [r for g in graph.groups for r in g.frozen_reasons]
    assert any("ShiftedWindowAttention" in r and "head width from its input width" in r for r in frozen)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_channel_removal_on_every_zoo_model_at_224px(name):
    _sweep_one(name, 224)
