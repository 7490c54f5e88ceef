"""Measurements: MACs, connectivity and CPU latency (perplexity lives in ``secateurs.llm``)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .batches import logits_of, model_device, run_model, to_device


@dataclass
class MacCount:
    total: int  # every op PyTorch's FlopCounterMode knows (matmul, conv, attention ...)
    per_module: dict[str, int]  # keyed by module qualified name ('' is the root)


def count_macs(model: nn.Module, example_inputs: Any) -> MacCount:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (FLOPs / 2)."""
    was_training = model.training
    model.eval()
    root = type(model).__name__
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run_model(model, to_device(example_inputs, model_device(model)), "example_inputs")
    finally:
        model.train(was_training)
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key.split(".", 1)[1] if key.startswith(root + ".") else key
        per_module[name] = int(sum(ops.values())) // 2
    return MacCount(int(counter.get_total_flops()) // 2, per_module)


def is_connected(model: nn.Module, example_inputs: Any) -> bool | None:
    """Does any path of surviving weights still link input to output?

    Pushes an all-ones input through a float64 copy whose weights are replaced by
    0/1 (pruned / kept), other parameters and buffers by their absolute values and
    biases by zero, in eval mode: the output is zero exactly when every path is cut
    (SynFlow's layer-collapse argument, Tanaka et al. 2020). None when the input is
    not a float tensor (token ids), where the argument does not apply.
    """
    if not isinstance(example_inputs, torch.Tensor) or not example_inputs.is_floating_point():
        return None
    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, tensor in probe.state_dict().items():
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or leaf == "running_mean":
                tensor.zero_()
            elif leaf == "original" or leaf == "weight":
                tensor.copy_((tensor != 0).double())
            else:
                tensor.abs_()
        ones = torch.ones_like(example_inputs, dtype=torch.float64, device=model_device(probe))
        out = logits_of(probe(ones))
    return bool(out.abs().sum() > 0)


@dataclass
class Spread:
    """Median and spread of repeated measurements (seconds, or a ratio of seconds)."""

    median: float
    q1: float  # 25th percentile
    q3: float  # 75th percentile
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        ordered = sorted(values)
        if len(ordered) == 1:
            return cls(ordered[0], ordered[0], ordered[0], ordered[0], ordered[0], 1)
        q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        return cls(median, q1, q3, ordered[0], ordered[-1], len(ordered))

    @property
    def relative_iqr(self) -> float:
        """Interquartile range over the median: 0.2 means the middle half of the runs spans 20%."""
        return (self.q3 - self.q1) / self.median if self.median else float("inf")


@dataclass
class LatencyComparison:
    """Dense and pruned forward times, and the speed-up as the median of per-pair ratios."""

    dense_s: Spread
    pruned_s: Spread
    speedup: Spread
    threads: int  # torch intra-op threads during the runs
    interleaved: bool = True  # False: measured one after the other (see ``note``)
    note: str = ""


def _timed_runs(model: nn.Module, example_inputs: Any, warmup: int) -> Callable[[], float]:
    """A function that runs ``model`` once and returns the seconds it took (after ``warmup`` runs)."""
    device = model_device(model)
    inputs = to_device(example_inputs, device)
    # CUDA kernels run asynchronously: without a synchronize the clock would stop at the launch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for i in range(warmup):  # the first run checks the inputs (token ids) and names them if the model fails
            run_model(model, inputs, "example_inputs" if i == 0 else None)

    def once() -> float:  # unchecked: the clock measures the model, not our checks of its inputs
        with torch.inference_mode():
            sync()
            start = time.perf_counter()
            run_model(model, inputs, None)
            sync()
            return time.perf_counter() - start

    return once


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 20, warmup: int = 3) -> Spread:
    """Seconds of one forward pass on ``example_inputs`` (eval mode, no autograd), over ``repeats`` runs.
    To compare two models use :func:`compare_latency`, which alternates them."""
    was_training = model.training
    model.eval()
    try:
        once = _timed_runs(model, example_inputs, warmup)
        return Spread.of([once() for _ in range(repeats)])
    finally:
        model.train(was_training)


def compare_latency(
    dense: nn.Module, pruned: nn.Module, example_inputs: Any, repeats: int = 20, warmup: int = 3
) -> LatencyComparison:
    """Time ``dense`` and ``pruned`` alternately (dense, pruned, dense, ...), so a burst of load on a
    shared machine hits both alike; the speed-up is the median of the ``repeats`` per-pair ratios."""
    modes = (dense.training, pruned.training)
    dense.eval()
    pruned.eval()
    try:
        run_dense, run_pruned = _timed_runs(dense, example_inputs, warmup), _timed_runs(pruned, example_inputs, warmup)
        pairs = [(run_dense(), run_pruned()) for _ in range(repeats)]
    finally:
        dense.train(modes[0])
        pruned.train(modes[1])
    return LatencyComparison(
        dense_s=Spread.of([d for d, _ in pairs]),
        pruned_s=Spread.of([p for _, p in pairs]),
        speedup=Spread.of([d / p for d, p in pairs]),
        threads=torch.get_num_threads(),
    )
