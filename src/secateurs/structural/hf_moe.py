"""Mixture-of-experts layers of transformers (Mixtral, Qwen2-MoE, ...): channels inside the experts.

transformers stores all experts of a layer in two 3D tensors, ``gate_up_proj`` ``(experts, 2 x
intermediate, hidden)`` and ``down_proj`` ``(experts, hidden, intermediate)``, and routes tokens with a
top-k router over ``weight`` ``(experts, hidden)``. The router's top-k cannot be traced op by op, and
it does not need to be: its outputs are expert choices, not channels. So

- the router consumes the hidden channels (its ``weight`` columns) and produces nothing removable
  (removing experts is expert pruning, a different operation);
- a neuron position p of the experts is removed with row p of the gate half, row p of the up half
  and column p of ``down_proj`` *of every expert* (one tensor holds them all, so every expert keeps
  the same positions and the layer stays one tensor of equal-width experts); a unit is a block of
  :data:`BLOCK` consecutive positions, because the grouped-GEMM kernels transformers dispatches
  experts to need rows of whole 16 bytes;
- a shared expert (Qwen2-MoE) is an ordinary MLP, traced as such.

Experts with biases or another layout are not taken (the module is then traced op by op and refused
with its name).
"""

from __future__ import annotations

import torch
from torch import nn

from .handlers import Handler, _named, first_input, register_handler_by_name, register_handler_matcher
from .surgery import Surgery
from .trace import Trace

BLOCK = 8


def _is_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or any(True for _ in module.children() for _ in _.parameters()):
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    return (
        gate_up.ndim == 3 and down.ndim == 3 and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
    )  # fmt: skip


def _is_router(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return set(params) == {"weight"} and params["weight"].ndim == 2 and isinstance(getattr(module, "top_k", None), int)


class ExpertsHandler(Handler):
    """All experts of a layer in 3D tensors: neuron position p, in every expert, is one unit."""

    name = "hf_moe_experts"

    def trace(self, t: Trace, name, module, args, kwargs, output):
        x = first_input(args, kwargs, "hidden_states")
        vec = t.channel(x, -1)
        layout = [a for a, bad in (("is_concatenated", False), ("is_transposed", True), ("has_bias", True))
                  if getattr(module, a, not bad) is bad]  # fmt: skip
        if layout:
            t.block(vec, f"{name!r} ({type(module).__name__}) stores its experts with {layout}; only [gate; up] "
                         "row-major experts without bias are handled")  # fmt: skip
            return
        neurons = module.down_proj.shape[2]
        # grouped-GEMM expert kernels (torch._grouped_mm) need rows of whole 16 bytes: a unit is a block of
        # BLOCK neuron positions (16 bytes in half precision, 32 in float), so every kept width stays valid
        block = BLOCK if neurons % BLOCK == 0 and neurons > BLOCK else 1
        units = t.source(name, f"{name}:neurons", neurons // block).repeat_interleave(block)
        t.port(name, "gate_up_proj", 2, vec, "in", name)
        t.port(name, "gate_up_proj", 1, torch.cat([units, units]), "out", name)  # [gate | up], chunked in two
        t.port(name, "down_proj", 2, units, "in", name)
        ids = t.source(name, f"{name}.down_proj", module.down_proj.shape[1])
        t.port(name, "down_proj", 1, ids, "out", name)
        t.label(output, -1, ids)

    def update(self, module: nn.Module, name: str, edit: Surgery, kept: dict[str, int]) -> None:
        hidden, neurons = module.down_proj.shape[1:]
        sizes = {"intermediate_dim": neurons, "intermediate_size": neurons, "hidden_dim": hidden, "hidden_size": hidden}
        for attr, value in sizes.items():
            if isinstance(getattr(module, attr, None), int):
                edit.set(module, attr, value)


class RouterHandler(Handler):
    """A top-k router: reads the hidden channels, produces expert choices (never removed here)."""

    name = "hf_moe_router"

    def trace(self, t: Trace, name, module, args, kwargs, output):
        x = first_input(args, kwargs, "hidden_states")
        t.port(name, "weight", 1, t.channel(x, -1), "in", name)

    def update(self, module: nn.Module, name: str, edit: Surgery, kept: dict[str, int]) -> None:
        if isinstance(getattr(module, "hidden_dim", None), int):
            edit.set(module, "hidden_dim", module.weight.shape[1])


EXPERTS = _named(ExpertsHandler())
ROUTER = _named(RouterHandler())
# a router that subclasses nn.Linear would otherwise get the Linear handler (its output is a tuple)
register_handler_by_name("transformers.models.phimoe.modeling_phimoe.PhimoeTopKRouter", ROUTER)


@register_handler_matcher
def match_moe(module: nn.Module) -> Handler | None:
    """:data:`EXPERTS` / :data:`ROUTER` for transformers' fused experts and top-k routers."""
    if not type(module).__module__.startswith("transformers"):
        return None
    if _is_experts(module):
        return EXPERTS
    if type(module).__name__.endswith("Router") and _is_router(module):
        return ROUTER
    return None
