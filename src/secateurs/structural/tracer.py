"""Tracing: run the model once, eagerly, and watch every torch call and module call.

We trace by *execution*, under a ``TorchFunctionMode`` plus module hooks, rather than
by compiling a graph. Real Hugging Face models branch on shapes, configs and kwargs
(attention masks, caches, position embeddings) and call helper code that
``torch.fx`` cannot symbolically trace and ``torch.export`` rejects or specialises;
walking the autograd graph (as Torch-Pruning does) loses non-differentiable steps
and the arguments of each op (split sizes, concat axes), which then have to be
guessed from shapes and autograd node names. An eager run sees the exact path the
model takes on the example inputs, with every argument, and needs no gradients.
The price: code paths not taken on those inputs are not seen, which is why every
prune ends with a forward check on the pruned model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..batches import model_device, run_model, to_device
from ..errors import StructureError
from ..evidence import preserved
from ..threads import limited_threads
from .handlers import handler_for
from .ops import _op_name, handle, tensors_in
from .trace import Trace


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, inside: list[int]) -> None:
        super().__init__()
        self.trace = trace
        self.inside = inside  # > 0 while a module with a handler runs: its ops are its own business

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.inside[0]:
            try:
                handle(self.trace, func, args, kwargs, out)
            except StructureError:
                raise
            except Exception as exc:  # the model ran this op: following it is the graph's failure
                raise StructureError(
                    f"the dependency graph could not follow {_op_name(func)} in {self.trace.where()} "
                    f"({type(exc).__name__}: {exc}); the model itself ran it, so example_inputs are fine: "
                    "register a handler for that module (secateurs.structural.register_handler) or "
                    "exclude it from the scope"
                ) from exc
        return out


@contextlib.contextmanager
def module_stack(model: nn.Module, on_enter=None, on_exit=None) -> Iterator[list[str]]:
    """Hooks on every module keeping the stack of qualified names of the modules running now.
    On an exception the stack is left as it was, naming the module that failed."""
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    stack: list[str] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stack.append(names.get(module, type(module).__name__))
        if on_enter is not None:
            on_enter(module, args, kwargs)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if on_exit is not None:
            on_exit(module, args, kwargs, output)
        stack.pop()

    handles = []
    for module in dict.fromkeys(names):
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _mark_inputs(t: Trace, inputs: Any) -> None:
    for x in tensors_in(inputs if not isinstance(inputs, dict) else list(inputs.values())):
        if x.is_floating_point() and t.labels(x) is None:
            lab = t.uf.new(x.numel()).reshape(x.shape)
            t.set(x, lab)
            t.fix(lab)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """One forward as the graph sees it: a dict as keyword arguments (transformers caches off), a
    tuple as positional arguments, anything else as the single input."""
    inputs = to_device(inputs, model_device(model))
    if isinstance(inputs, dict) and hasattr(getattr(model, "config", None), "use_cache"):
        inputs = {"use_cache": False, **inputs}
    return run_model(model, inputs, None) if isinstance(inputs, dict | Tensor) else model(*inputs)


def outputs_of(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):  # includes transformers' ModelOutput
        return [t for v in output.values() for t in outputs_of(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in outputs_of(v)]
    return []


def trace_model(model: nn.Module, example_inputs: Any, options: dict | None = None) -> Trace:
    """Run ``model`` on ``example_inputs`` (a tensor, a tuple, or a dict of keyword arguments)
    in eval mode without gradients, and record its channel structure. The model is unchanged."""
    t = Trace(model, dict(options or {}))
    inside = [0]

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if inside[0]:
            inside[0] += 1
        elif handler_for(module) is not None:
            inside[0] = 1

    def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not inside[0]:
            return
        inside[0] -= 1
        if inside[0] == 0:
            handler_for(module).trace(t, stack[-1], module, args, kwargs, output)
            t.owners[stack[-1]] = module

    # label bookkeeping is thousands of tiny ops: worker threads only add contention
    with preserved(model, []), torch.no_grad(), limited_threads(1), module_stack(model, enter, leave) as stack:
        t.path = stack
        model.eval()
        inputs = to_device(example_inputs, model_device(model))
        _mark_inputs(t, inputs)
        try:
            with _Recorder(t, inside):
                output = call_model(model, inputs)
        except StructureError:
            raise
        except Exception as exc:
            where = stack[-1] if stack else "the model's top-level forward"
            raise StructureError(
                f"tracing failed in {where!r} ({type(exc).__name__}: {exc}); check example_inputs "
                "(one batch the model accepts: a tensor, a tuple of positional inputs, or a dict of kwargs)"
            ) from exc
    for y in outputs_of(output):
        lab = t.labels(y)
        if lab is not None:
            t.fix(lab)
    t.path = []
    return t
