"""torchvision's classification zoo for structural removal: the model list, builders and the
zero-unit equivalence check. Shared by ``structural_vision_zoo.py``, its Torch-Pruning worker and
``tests/structural/test_vision_zoo.py`` (imported from there with ``bench/`` on the path).

The zero-unit check: on a fresh model, choose ``ratio`` of the units of every channel group the
graph can remove, zero every parameter slice that *produces* them (layer rows and biases, norm
scales and shifts, class tokens and position tables), run the model, remove exactly those units,
run it again: the outputs must be the same up to float rounding. Groups whose channels feed a
LayerNorm / GroupNorm / RMSNorm are left out of it: those norms compute statistics across the
channels, so a zero channel still moves the mean and variance of the others, and removing it
changes the outputs by design (as in Torch-Pruning). They are counted, never hidden.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

_OPS_SHIM: Any = None


def import_torchvision():
    """``import torchvision``. The CUDA wheels of torchvision on a CPU-only torch cannot load their
    C++ ops (``libc10_cuda.so``), and torchvision then fails at import registering fake kernels
    for ``torchvision::nms`` and ``qnms``, which do not exist; the classification models need
    none of its ops. In that case only, declare those two schemas (no kernels) and import again."""
    global _OPS_SHIM
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _OPS_SHIM = torch.library.Library("torchvision", "FRAGMENT")
        _OPS_SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _OPS_SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


def zoo() -> list[str]:
    """Every classification model torchvision registers (not a hand-written list)."""
    tv = import_torchvision()
    return list(tv.models.list_models(module=tv.models))


#: the smallest input some models accept: Inception v3's stride-2 stages need 75 px; MaxViT's
#: partitions (7 x 7 windows after a /32 reduction) need 224
MIN_SIZE = {"inception_v3": 96, "maxvit_t": 224}


def published_params(name: str) -> int:
    """Parameter count from torchvision's weight metadata (nothing is built or downloaded)."""
    tv = import_torchvision()
    return int(tv.models.get_model_weights(name).DEFAULT.meta["num_params"])


def build(name: str, size: int = 224, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Random-init model in eval mode and one ``size`` x ``size`` RGB input. ViT and MaxViT fix their
    input size at construction: they are built for ``size``."""
    tv = import_torchvision()
    kwargs: dict[str, Any] = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    elif name.startswith("maxvit"):
        kwargs["input_size"] = (size, size)
    elif name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # silences their FutureWarning; same as today's default
        kwargs["aux_logits"] = False
    torch.manual_seed(seed)
    model = tv.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return model, x


def small(family: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A small instance of a zoo family's own class (same modules and forward, fewer and narrower
    layers) on a 32x32 input, for tests that must take seconds: ``vit``, ``swin``, ``swin_v2``,
    ``convnext``, ``maxvit``."""
    tv = import_torchvision()
    m = tv.models
    torch.manual_seed(seed)
    size = 32
    if family == "vit":
        model = m.VisionTransformer(image_size=size, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                    mlp_dim=128, num_classes=10)  # fmt: skip
    elif family in ("swin", "swin_v2"):
        v2 = family == "swin_v2"
        sw = m.swin_transformer
        model = m.SwinTransformer(
            patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10,
            block=sw.SwinTransformerBlockV2 if v2 else None,
            downsample_layer=sw.PatchMergingV2 if v2 else sw.PatchMerging,
        )  # fmt: skip
    elif family == "convnext":
        cfg = m.convnext.CNBlockConfig
        model = m.ConvNeXt([cfg(32, 64, 2), cfg(64, None, 2)], num_classes=10)
    elif family == "maxvit":
        size = 28
        model = m.MaxVit(input_size=(size, size), stem_channels=16, partition_size=7, block_channels=[32],
                         block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)  # fmt: skip
    else:
        raise ValueError(f"no small {family!r}")
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return model.eval(), x


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _statistics(graph, group) -> bool:
    """Do the group's channels feed a norm whose statistics span the channels?"""
    from secateurs.structural.handlers import handler_for

    for view in group.ports:
        owner = view.port.owner
        handler = handler_for(graph.model.get_submodule(owner)) if owner else None
        if handler is not None and handler.name in ("layer_norm", "layer_norm2d", "group_norm"):
            return True
    return False


def nontrivial(model: nn.Module, seed: int = 0) -> None:
    """Random-init torchvision models start some parameters at zero or near it (ViT's classifier,
    ConvNeXt's 1e-6 layer scales, zero biases, BatchNorm's identity statistics), which would make
    the zero-unit check pass by luck: give those random values, so zeroing is what keeps outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in [*module._parameters.items(), *module._buffers.items()]:
                if p is None or not p.is_floating_point():
                    continue
                if name == "running_var":
                    p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.5)
                elif name == "running_mean" or (p.numel() and p.abs().max() < 1e-3):
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim <= 1 else 0.02))
                elif p.ndim <= 1 and name in ("weight", "bias") and p.numel():  # norm scales and shifts
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def zero_units(model: nn.Module, graph, removed: dict[str, list[int]]) -> None:
    """Zero every parameter slice that produces the chosen units (rows of producing layers and their
    biases, norm scales and shifts, running means, parameters used directly in forward)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, units in removed.items():
            for view in graph[name].ports:
                port = view.port
                if port.role not in ("out", "pass", "free") or port.param.startswith("#"):
                    continue
                if port.param == "running_var":
                    continue
                tensor = getattr(modules[port.module], port.param)
                hit = torch.isin(view.index, torch.as_tensor(units))
                if port.dim is None:
                    tensor.view(-1)[hit] = 0.0
                else:
                    tensor.index_fill_(port.dim, hit.nonzero().reshape(-1), 0.0)


def zero_unit_check(model: nn.Module, x: torch.Tensor, ratio: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """Zero ``ratio`` of the units of every removable channel group whose removal is exact (see the
    module docstring), remove exactly those, and compare the outputs. ``model`` is modified."""
    from secateurs.structural import DependencyGraph
    from secateurs.structural.apply import apply_steps

    nontrivial(model, seed)
    graph = DependencyGraph(model, x)
    groups = [g for g in graph.groups if g.kind == "channel" and g.units > 1 and not g.blocked]
    exact = [g for g in groups if not _statistics(graph, g)]
    gen = torch.Generator().manual_seed(seed)
    removed = {}
    for g in exact:
        k = min(round(ratio * g.units), g.units - 1)
        if k:
            removed[g.name] = torch.randperm(g.units, generator=gen)[:k].tolist()
    zero_units(model, graph, removed)
    with torch.no_grad():
        before = model(x)
    before_params = params(model)
    apply_steps(model, [graph.step(removed)], x, check=True)
    with torch.no_grad():
        after = model(x)
    scale = before.abs().max().item()
    diff = (after - before).abs().max().item() if after.shape == before.shape else float("inf")
    return {
        "groups": len(groups),
        "checked": len(removed),
        "statistics_groups": len(groups) - len(exact),
        "params_removed": before_params - params(model),
        "max_abs_diff": diff,
        "relative_diff": diff / scale if scale else diff,
        "output_scale": scale,
        "exact": bool(scale > 1e-4 and diff <= 1e-4 * scale),
    }


def prune_ours(model: nn.Module, x: torch.Tensor, ratio: float = 0.3):
    """30% of every channel group removed, L2 group norm, uniform: the sweep's setting."""
    import secateurs

    return secateurs.prune(
        model, "magnitude", ratio, pattern="channel", mode="remove", allocation="uniform",
        method_options={"norm": 2}, example_inputs=x, progress=False, structural={"latency": False},
    )  # fmt: skip
