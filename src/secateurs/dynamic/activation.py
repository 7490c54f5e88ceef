"""Training-free activation sparsity for LLMs (TEAL, CATS), with a target you can change at run time.

    sparse = sparsify_activations(model, calibration=segments)   # calibrate once (dense until asked)
    sparse.set_sparsity(0.5)                                      # any target in [0, 1), no recalibration
    sparse.save("llama.activations.safetensors")                 # thresholds + allocation, no pickle
    sparse = load_activation_sparsity(model, "llama.activations.safetensors")

The model keeps its own Parameters and ``state_dict``: each thresholded Linear becomes a
:class:`~secateurs.dynamic.layers.DynamicLinear` holding the same tensors (stored input-major for the
batch-1 kernel), and :meth:`ActivationSparsity.remove` puts plain ``nn.Linear`` modules back.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import model_device, run_model, take, to_device
from ..blocks import batched
from ..errors import CheckpointError, ConfigError, StateError
from ..spec import is_number
from .calibrate import ALLOCATIONS, GRID, METHODS, Calibration, calibrate, find_targets
from .layers import DynamicActivation, DynamicLinear, set_submodule
from .saving import read_calibration, write_calibration

_attached: weakref.WeakKeyDictionary[nn.Module, ActivationSparsity] = weakref.WeakKeyDictionary()


def check_target(sparsity: Any, limit: float | None = None) -> float:
    """A target activation sparsity: a number in [0, 1) (and at most ``limit``, what was calibrated)."""
    if isinstance(sparsity, bool) or not is_number(sparsity) or not 0 <= float(sparsity) < 1:
        raise ConfigError(f"activation sparsity must be a number in [0, 1), got {sparsity!r}")
    if limit is not None and float(sparsity) > limit + 1e-9:
        raise ConfigError(
            f"activation sparsity {sparsity!r} is above {limit:.3f}, the highest level the greedy allocation was "
            "calibrated for; recalibrate with a higher max_sparsity=, or use allocation='uniform'"
        )
    return float(sparsity)


class ActivationSparsity:
    """Activation sparsity installed on a model: thresholds from stored distributions, set at run time."""

    def __init__(self, model: nn.Module, calibration: Calibration, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.calibration = calibration
        self.modules = modules
        self.sparsity = 0.0
        _attached[model] = self

    @property
    def method(self) -> str:
        return self.calibration.method

    @property
    def allocation(self) -> str:
        return self.calibration.allocation

    def set_sparsity(self, sparsity: float) -> ActivationSparsity:
        """Set the model-wide target; each layer's threshold is read from its stored distribution."""
        self._check_installed()
        target = check_target(sparsity, self.calibration.max_sparsity())
        for i, s in enumerate(self.calibration.layer_sparsities(target)):
            self.modules[self.calibration.layers[i]].threshold = self.calibration.threshold(i, s)
        self.sparsity = target
        return self

    def layer_sparsities(self) -> dict[str, float]:
        """Each layer's calibrated sparsity at the current target (the allocation)."""
        values = self.calibration.layer_sparsities(self.sparsity)
        return dict(zip(self.calibration.layers, values))

    def thresholds(self) -> dict[str, float | None]:
        return {name: self.modules[name].threshold for name in self.calibration.layers}

    @torch.no_grad()
    def measure(self, batches: Sequence[Any] | Tensor, batch_size: int = 1) -> dict[str, float]:
        """The fraction of zeros actually entering each thresholded vector on ``batches`` (model run as
        it is, sparse), and under ``'<weighted>'`` the mean weighted by each layer's weight count."""
        self._check_installed()
        zeros = dict.fromkeys(self.calibration.layers, 0)
        counts = dict.fromkeys(self.calibration.layers, 0)

        def hook(name: str, on_input: bool):
            def record(module: nn.Module, args: tuple, output: Tensor) -> None:
                x = args[0] if on_input else output
                if on_input and module.threshold is not None:
                    x = torch.where(x.abs() > module.threshold, x, 0.0)
                zeros[name] += int((x == 0).sum())
                counts[name] += x.numel()

            return record

        handles = [
            self.modules[n].register_forward_hook(hook(n, kind == "linear"))
            for n, kind in zip(self.calibration.layers, self.calibration.kinds)
        ]
        try:
            device = model_device(self.model)
            for batch in as_batches(batches, batch_size):
                _forward(self.model, to_device(batch, device))
        finally:
            for handle in handles:
                handle.remove()
        result = {n: zeros[n] / max(1, counts[n]) for n in self.calibration.layers}
        weights = self.calibration.params
        result["<weighted>"] = sum(result[n] * w for n, w in zip(self.calibration.layers, weights)) / sum(weights)
        return result

    def sparsity_for_speed(
        self,
        tokens_per_second: float,
        step: Callable[[], Any] | None = None,
        levels: Sequence[float] = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7),
        repeats: int = 5,
    ) -> float:
        """The lowest of ``levels`` at which ``step`` (default: one batch-1 forward of a single token) runs
        at ``tokens_per_second`` or faster on this machine, measured now; the target is set to it.
        Refused, naming the fastest rate measured, when no level reaches it."""
        if not is_number(tokens_per_second) or not tokens_per_second > 0:
            raise ConfigError(f"tokens_per_second must be a positive number, got {tokens_per_second!r}")
        limit = self.calibration.max_sparsity()
        levels = sorted(check_target(s, limit) for s in levels)
        step = step or _one_token_step(self.model)
        rates = {}
        for level in levels:
            self.set_sparsity(level)
            rates[level] = 1.0 / _median_seconds(step, repeats)
            if rates[level] >= tokens_per_second:
                return level
        fastest = max(rates, key=rates.get)
        self.set_sparsity(fastest)
        raise ConfigError(
            f"no sparsity in {levels} reaches {tokens_per_second:g} tokens/s here; the fastest was "
            f"{rates[fastest]:.1f} tokens/s at {fastest:g} (now set). Lower the target or add higher levels"
        )

    def remove(self) -> nn.Module:
        """Put the model's original dense modules back (same Parameters, usual memory layout)."""
        self._check_installed()
        for name, module in self.modules.items():
            set_submodule(self.model, name, _unwrapped(module))
        _attached.pop(self.model, None)
        self.modules = {}
        return self.model

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the distributions, allocation and current target to a safetensors file (no pickle);
        an existing file is replaced only with ``overwrite=True``."""
        return write_calibration(self.calibration, self.sparsity, path, overwrite)

    def _check_installed(self) -> None:
        if not self.modules:
            raise StateError("this activation sparsity was removed from its model; calibrate or load it again")

    def __repr__(self) -> str:
        return (
            f"ActivationSparsity(method={self.method!r}, allocation={self.allocation!r}, sparsity={self.sparsity}, "
            f"layers={len(self.calibration.layers)})"
        )


def activation_sparsity(model: nn.Module) -> ActivationSparsity:
    """The activation sparsity installed on ``model``; a :class:`StateError` if it was never calibrated."""
    found = _attached.get(model)
    if found is None:
        raise StateError(
            f"{type(model).__name__} has no activation sparsity: calibrate it with "
            "secateurs.dynamic.sparsify_activations(model, calibration=...) or load a saved one with "
            "secateurs.dynamic.load_activation_sparsity(model, path)"
        )
    return found


def sparsify_activations(
    model: nn.Module,
    calibration: Any,
    sparsity: float = 0.0,
    method: str = "teal",
    allocation: str = "greedy",
    blocks: str | None = None,
    batch_size: int = 1,
    use_kernel: bool = True,
    greedy_batches: int = 2,
    step: float = 0.05,
    max_sparsity: float = 0.9,
    max_samples: int = 1 << 22,
    seed: int = 0,
) -> ActivationSparsity:
    """Calibrate activation sparsity on ``model`` and install it at ``sparsity`` (0: dense, exactly).

    Args:
        calibration: token segments ``(N, L)`` (e.g. :func:`secateurs.calibration.sample_segments`) or a
            list of batches the model accepts.
        method: ``'teal'`` (every Linear's input in each block) or ``'cats'`` (the MLP gate activation's
            output).
        allocation: ``'greedy'`` (TEAL's per-projection allocation of the target, block by block) or
            ``'uniform'`` (every layer at the target). CATS has one layer per block: uniform.
        blocks: the container of the repeated blocks (found when None).
        use_kernel: batch-1 float32 CPU forwards through the sparse-input kernel (weights stored input-major).
        greedy_batches, step, max_sparsity: the greedy search's data (first batches), its step of block
            sparsity, and the highest block sparsity it explores (the highest target it then allows).
    """
    _check_options(model, method, allocation, batch_size, greedy_batches, step, max_sparsity, max_samples)
    _refuse_installed(model)
    allocation = "uniform" if method == "cats" else allocation
    target = check_target(sparsity, max_sparsity if allocation == "greedy" else None)
    batches = as_batches(calibration, batch_size)
    if not batches:
        raise ConfigError("activation sparsity needs calibration data: pass calibration=<token segments or batches>")
    found, names = find_targets(model, method, blocks)
    modules = install(model, [n for group in names for n in group], method, use_kernel)
    was_training = model.training
    try:
        model.eval()
        device = model_device(model)
        result = calibrate(model, [to_device(b, device) for b in batches], found, names, modules, method, allocation,
                           greedy_batches, step, max_sparsity, max_samples, seed)  # fmt: skip
    except BaseException:
        for name, module in modules.items():
            set_submodule(model, name, _unwrapped(module))
        raise
    finally:
        model.train(was_training)
    return ActivationSparsity(model, result, modules).set_sparsity(target)


def load_activation_sparsity(model: nn.Module, path: str | os.PathLike, use_kernel: bool = True) -> ActivationSparsity:
    """Install activation sparsity saved by :meth:`ActivationSparsity.save` on ``model`` (the same
    architecture), at the saved target. The file is checked against the model before anything changes."""
    _refuse_installed(model)
    calibration, sparsity = read_calibration(path)
    for name, kind, features in zip(calibration.layers, calibration.kinds, calibration.features):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{path} holds thresholds for {name}, which {type(model).__name__} does not have; "
                "was it saved for another architecture?"
            ) from None
        if kind == "linear" and (type(module) is not nn.Linear or module.in_features != features):
            raise CheckpointError(
                f"{path} holds thresholds for {name} as an nn.Linear with {features} inputs, but "
                f"the model's {name} is {module!r}; was it saved for another model size?"
            )
    modules = install(model, calibration.layers, calibration.method, use_kernel)
    return ActivationSparsity(model, calibration, modules).set_sparsity(sparsity)


def install(model: nn.Module, names: list[str], method: str, use_kernel: bool) -> dict[str, nn.Module]:
    """Replace each named module by its thresholding wrapper (refused if the model already has some)."""
    _refuse_installed(model)
    modules: dict[str, nn.Module] = {}
    for name in names:
        original = model.get_submodule(name)
        wrapped = DynamicLinear.wrap(original, name, use_kernel) if method == "teal" else DynamicActivation(original)
        modules[name] = wrapped
    for name, module in modules.items():
        set_submodule(model, name, module)
    return modules


def _refuse_installed(model: nn.Module) -> None:
    if model in _attached or any(isinstance(m, (DynamicLinear, DynamicActivation)) for m in model.modules()):
        raise StateError(
            f"{type(model).__name__} already has activation sparsity; change its target with set_sparsity(), or "
            "remove() it before calibrating again"
        )


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.unwrap() if isinstance(module, DynamicLinear) else module.activation


def _check_options(model, method, allocation, batch_size, greedy_batches, step, max_sparsity, max_samples) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    for name, value in (("batch_size", batch_size), ("greedy_batches", greedy_batches), ("max_samples", max_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not is_number(step) or not 0 < step < 1:
        raise ConfigError(f"step must be a number in (0, 1), got {step!r}")
    if not is_number(max_sparsity) or not 0 < max_sparsity < 1:
        raise ConfigError(f"max_sparsity must be a number in (0, 1), got {max_sparsity!r}")
    if max_sparsity > GRID / (GRID + 1):
        raise ConfigError(f"max_sparsity must be at most {GRID / (GRID + 1):.4f}, got {max_sparsity!r}")


def as_batches(calibration: Any, batch_size: int) -> list[Any]:
    """Token segments ``(N, L)`` cut into batches of ``batch_size``; anything else: a list of batches."""
    if isinstance(calibration, Tensor) and calibration.ndim == 2 and not calibration.is_floating_point():
        return list(batched(calibration, batch_size))
    return take(calibration, None)


def _forward(model: nn.Module, batch: Any) -> Any:
    return run_model(model, batch, "a batch")


def _one_token_step(model: nn.Module) -> Callable[[], Any]:
    token = torch.zeros(1, 1, dtype=torch.long, device=model_device(model))

    def step() -> None:
        with torch.no_grad():
            _forward(model, token)

    return step


def _median_seconds(step: Callable[[], Any], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return max(statistics.median(times), math.ulp(1.0))
