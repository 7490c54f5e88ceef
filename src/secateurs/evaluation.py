"""Measurements: MACs and parameter counts. (Latency and perplexity live beside them.)"""

from __future__ import annotations

import copy
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


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one forward pass on ``example_inputs`` (eval mode, no autograd).
    Compare two models with ratios measured in the same process, one right after the other."""
    import statistics
    import time

    was_training = model.training
    model.eval()
    inputs = to_device(example_inputs, model_device(model))
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                run_model(model, inputs, "example_inputs")
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)
