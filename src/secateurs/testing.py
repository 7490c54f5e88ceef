"""Conformance checks for extensions, as scikit-learn's estimator checks: ``check_criterion(MyCriterion)``.

A criterion you register is run, unchanged, through every application mode it declares on a small
CNN, and through the block runner on a tiny Llama (when transformers is installed and its needs
allow), with the library's promises asserted: exact sparsity, finite deterministic scores, a model
that still runs, the state_dict keys of ``bake``, and ``trial()`` restoring the model exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .api import prune
from .config import PruneConfig
from .criteria import CRITERIA, Criterion, make_criterion
from .llm import prune_llm
from .masking import unmask
from .pipeline import Data, score_targets
from .runner import RUNNERS
from .scope import resolve
from .trials import trial


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Conv-BN-ReLU-Conv-ReLU-pool-Linear on 3x8x8 inputs: every layer type a criterion meets first."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4),
    ).eval()  # fmt: skip


def small_mlp(seed: int = 0) -> nn.Sequential:
    """Linear-BN-ReLU twice, then a classifier: hidden units every group criterion can rank (a BatchNorm
    scale for network slimming, a consuming Linear for FLAP)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 4),
    ).eval()  # fmt: skip


def calibration(seed: int = 0, batches: int = 3, shape: tuple[int, ...] = (3, 8, 8)) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(batches)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_criterion(method: str | type[Criterion], options: dict[str, Any] | None = None) -> list[str]:
    """Run ``method`` (a registered name or class) through every mode and runner it declares; raise
    AssertionError naming the first broken promise. Returns the names of the checks that ran."""
    name = method if isinstance(method, str) else method.name
    _check(name in CRITERIA, f"{name!r} is not registered: decorate the class with @secateurs.register")
    cls = CRITERIA.get(name)
    make_criterion(name, options)  # options are accepted
    passed: list[str] = []
    # uniform allocation: every layer at exactly the asked sparsity (the method's own allocation is its preset)
    kwargs: dict[str, Any] = {"method_options": options, "progress": False, "calibration": calibration()}
    pattern = cls.patterns[0] if cls.patterns else None
    if "mask" in cls.modes:
        _check_scores(name, pattern, kwargs)
        passed.append("scores: canonical shape, finite, deterministic")
    for mode in ("mask", "bake", "reconstruct"):  # reconstruct: the SparseGPT solver's update of the criterion's mask
        if mode in cls.modes:
            _check_element_mode(name, mode, pattern, kwargs)
            passed.append(f"mode={mode!r}: exact sparsity, model runs, trial restores")
    if "remove" in cls.modes:
        _check_removal(name, cls, kwargs)
        passed.append("mode='remove': tensors shrink, model runs, trial restores")
    blocks = RUNNERS.get("blocks")
    element_modes = [m for m in ("bake", "mask") if m in cls.modes]
    if element_modes and cls.needs <= blocks.needs and _has_transformers():
        _check_block_runner(name, options, element_modes[0], pattern)
        passed.append(f"runner='blocks' (tiny Llama, mode={element_modes[0]!r}): exact sparsity per layer")
    return passed


def _check_scores(name: str, pattern: str | None, kwargs: dict[str, Any]) -> None:
    model = small_cnn()
    config = PruneConfig(method=name, sparsity=0.5, method_options=kwargs["method_options"], mode="mask",
                         pattern=pattern)  # fmt: skip
    targets = resolve(model, config.scope_)
    data = Data(kwargs["calibration"], None, kwargs["calibration"][0][0][:1], False)
    before = _state(model)
    first, second = (score_targets(model, targets, config, data) for _ in range(2))
    _check(_same(_state(model), before), f"{name}: scoring changed the model")
    for t in targets:
        score = first[t.name]
        shape = tuple(score.shape[1:] if config.criterion_.signed else score.shape)  # signed: one slice per batch
        _check(shape == t.canonical_shape, f"{name}: scores of {t.name} are {shape}, expected {t.canonical_shape}")
        _check(bool(torch.isfinite(score).all()), f"{name}: scores of {t.name} hold NaN/Inf")
        _check(torch.equal(score, second[t.name]), f"{name}: scores of {t.name} differ between two runs")


def _run_in_trial(model: nn.Module, run: Callable[[], Any], what: str, inputs: torch.Tensor) -> Any:
    before = _state(model)
    parameters = [id(p) for p in model.parameters()]
    with trial(model):
        result = run()
        after = model(inputs)
        _check(after.shape == (2, 4) and bool(torch.isfinite(after).all()), f"{what}: the pruned model does not run")
    _check(_same(_state(model), before), f"{what}: trial() did not restore the model")
    _check([id(p) for p in model.parameters()] == parameters, f"{what}: trial() did not restore the parameters")
    return result


def _check_element_mode(name: str, mode: str, pattern: str | None, kwargs: dict[str, Any]) -> None:
    model = small_cnn()
    keys = list(model.state_dict())
    extra = {"solver": "sparsegpt"} if mode == "reconstruct" else {}

    def run() -> Any:
        report = prune(model, name, 0.5, mode=mode, pattern=pattern, allocation="uniform", **extra, **kwargs)
        if pattern is None:  # element masks: exactly half of every layer
            for layer in report.layers:
                zeros = layer.params - layer.nonzeros
                _check(zeros == round(0.5 * layer.params), f"{name} ({mode}): {layer.name} is {layer.sparsity:.4f}")
        if mode == "bake":
            _check(list(model.state_dict()) == keys, f"{name} (bake): state_dict keys changed")
        if mode == "mask":
            _check(unmask(model) == len(report.layers), f"{name} (mask): unmask() found no masks")
        return report

    _run_in_trial(model, run, f"{name} ({mode})", torch.randn(2, 3, 8, 8))


def _check_removal(name: str, cls: type[Criterion], kwargs: dict[str, Any]) -> None:
    if "channel" not in cls.granularities:
        return  # whole-block criteria need a stack of repeated blocks (the block runner check covers LLMs)
    model = small_mlp()
    params = sum(p.numel() for p in model.parameters())

    def run() -> Any:
        report = prune(model, name, 0.4, mode="remove", pattern="channel", structural={"latency": False},
                       **{**kwargs, "calibration": calibration(shape=(16,))})  # fmt: skip
        after = sum(p.numel() for p in model.parameters())
        _check(after < params, f"{name} (remove): no parameter was removed")
        return report

    _run_in_trial(model, run, f"{name} (remove)", torch.randn(2, 16))


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_llama(seed: int = 0) -> nn.Module:
    """A two-block Llama with grouped-query attention (random weights), for runner checks."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _check_block_runner(name: str, options: dict[str, Any] | None, mode: str, pattern: str | None) -> None:
    model = tiny_llama()
    segments = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    before = _state(model)
    with trial(model):
        report = prune_llm(model, name, 0.5, mode=mode, pattern=pattern, allocation="uniform", method_options=options,
                           calibration=segments, progress=False)  # fmt: skip
        _check(len(report.layers) == 14, f"{name} (blocks): pruned {len(report.layers)} layers, expected 14")
        for layer in report.layers:
            zeros = layer.params - layer.nonzeros
            _check(zeros == round(0.5 * layer.params), f"{name} (blocks): {layer.name} is {layer.sparsity:.4f}")
        with torch.no_grad():
            _check(bool(torch.isfinite(model(segments).logits).all()), f"{name} (blocks): the model does not run")
    _check(_same(_state(model), before), f"{name} (blocks): trial() did not restore the model")


__all__ = ["calibration", "check_criterion", "small_cnn", "small_mlp", "tiny_llama"]
