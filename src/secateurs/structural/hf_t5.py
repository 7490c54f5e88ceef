"""T5 attention: heads whose relative position bias is shared across the layers of a stack.

The first layer of each T5 stack computes a position bias with one column per head (its
``relative_attention_bias`` embedding, or zeros for cross-attention) and passes it to every later
layer of the stack, which adds it to its own scores head by head. So head h of every layer of a
stack reads the same bias row: the handler labels the bias a layer returns with its heads and
couples the heads of a layer that receives it to those. A unit is then head h *in every layer of the
stack* (encoder self-attention, decoder self-attention, decoder cross-attention): removing it cuts
the embedding column of the first layer and the q/k/v rows and output columns of all of them, and
the bias stays consistent with every layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import StructureError
from .handlers import Handler, _named, handler_for, register_handler_by_name
from .hf_fused import _arguments
from .surgery import Surgery
from .trace import Trace


class T5AttentionHandler(Handler):
    """``T5Attention``: q/k/v/o Linears without bias, ``key_value_proj_dim`` wide heads."""

    name = "hf_t5_attention"

    def heads(self, module: nn.Module) -> tuple[int, int, int]:
        hd = module.key_value_proj_dim
        heads = module.q.weight.shape[0] // hd
        return heads, heads, hd

    def trace(self, t: Trace, name, module, args, kwargs, output):
        bound = _arguments(module, args, kwargs)
        x = bound.get("hidden_states")
        if not isinstance(x, Tensor):
            raise StructureError(f"{name!r} ({type(module).__name__}) was called without hidden_states")
        kv_x = bound.get("key_value_states")
        vec = t.channel(x, -1)
        kv_vec = vec if kv_x is None else t.channel(kv_x, -1)
        heads, _, hd = self.heads(module)
        units = t.source(name, f"{name}:heads", heads, kind="head")
        rows = units.repeat_interleave(hd)
        t.port(f"{name}.q", "weight", 1, vec, "in", name)
        for p in ("k", "v"):
            t.port(f"{name}.{p}", "weight", 1, kv_vec, "in", name)
        for p in ("q", "k", "v"):
            t.port(f"{name}.{p}", "weight", 0, rows, "out", name)
        t.port(f"{name}.o", "weight", 1, rows, "in", name)
        ids = t.source(name, f"{name}.o", module.o.weight.shape[0])
        t.port(f"{name}.o", "weight", 0, ids, "out", name)
        if module.has_relative_attention_bias:
            t.port(f"{name}.relative_attention_bias", "weight", 1, units, "out", name)
        received = bound.get("position_bias")
        shared = t.channel(received, 1) if received is not None and t.labels(received) is not None else None
        if shared is not None and bool((shared >= 0).all()):
            t.couple(shared, units)  # the same bias row: head h of this layer goes with head h of the first
        elif received is not None and not module.has_relative_attention_bias:
            # a bias whose heads cannot be matched to this layer's: cutting either would mis-slice the other
            t.block(units, f"{name!r} ({type(module).__name__}) reads a position bias whose heads cannot be "
                           "matched to its own")  # fmt: skip
        t.label(output[0], -1, ids)
        if len(output) > 1 and output[1] is not None:
            t.label(output[1], 1, units)

    def update(self, module: nn.Module, name: str, edit: Surgery, kept: dict[str, int]) -> None:
        for p in ("q", "k", "v", "o"):
            child = getattr(module, p)
            handler_for(child).update(child, "", edit, {})
        heads, _, hd = self.heads(module)
        edit.set(module, "n_heads", heads)
        edit.set(module, "inner_dim", heads * hd)
        if module.has_relative_attention_bias:
            edit.set(module.relative_attention_bias, "embedding_dim", heads)


T5 = _named(T5AttentionHandler())
register_handler_by_name("transformers.models.t5.modeling_t5.T5Attention", T5)
register_handler_by_name("transformers.models.mt5.modeling_mt5.MT5Attention", T5)  # a copy of T5's
