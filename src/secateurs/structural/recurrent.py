"""LSTM, GRU and RNN hidden units.

A recurrent layer's hidden size is one number for every layer and direction, so
hidden unit j is removed everywhere at once: its row in each gate block of every
``weight_ih`` / ``weight_hh`` / bias, its column of ``weight_hh``, and the matching
inputs of the next layer and of whatever consumes the output.
"""

from __future__ import annotations

from torch import nn

from .handlers import Handler, first_input, register_handler
from .trace import Trace

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class RecurrentHandler(Handler):
    name = "recurrent"

    def trace(self, t: Trace, name, module, args, kwargs, output):
        x = first_input(args, kwargs)
        vec = t.channel(x, -1)
        if getattr(module, "proj_size", 0):
            t.block(vec, f"{name!r} is an LSTM with proj_size > 0, which is not supported; exclude it")
            return
        gates = _GATES[module.mode]
        dirs = 2 if module.bidirectional else 1
        ids = t.source(name, name, module.hidden_size)
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse")[:dirs]:
                tail = f"_l{layer}{suffix}"
                t.port(name, f"weight_ih{tail}", 1, vec if layer == 0 else ids.repeat(dirs), "in", name)
                t.port(name, f"weight_hh{tail}", 1, ids, "in", name)
                for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if getattr(module, f"{p}{tail}", None) is not None:
                        t.port(name, f"{p}{tail}", 0, ids.repeat(gates), "out", name)
        out, state = output
        t.label(out, -1, ids.repeat(dirs))
        for h in state if isinstance(state, tuple) else (state,):
            t.label(h, -1, ids)

    def update(self, module, name, edit, kept):
        edit.set(module, "hidden_size", module.weight_hh_l0.shape[1])
        edit.set(module, "input_size", module.weight_ih_l0.shape[1])


for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_handler(_cls, RecurrentHandler())
