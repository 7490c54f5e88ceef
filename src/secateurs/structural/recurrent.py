"""LSTM, GRU and RNN hidden units.

A recurrent layer's hidden size is one number for every layer and direction, so
hidden unit j is removed everywhere at once: its row in each gate block of every
``weight_ih`` / ``weight_hh`` / bias, its column of ``weight_hh``, and the matching
inputs of the next layer and of whatever consumes the output.

An LSTM with ``proj_size`` has two groups: the cell's hidden units (gate rows, columns of
``weight_hr``, the cell state) and the projected units it emits and feeds back (rows of
``weight_hr``, columns of ``weight_hh`` and of the next layer's ``weight_ih``, the output and
``h_n``). PyTorch requires ``proj_size < hidden_size``; a removal that breaks it is refused.
"""

from __future__ import annotations

from torch import nn

from ..errors import StructureError
from .handlers import Handler, first_input, register_handler
from .trace import Trace

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class RecurrentHandler(Handler):
    """LSTM / GRU / RNN hidden units, every layer and direction at once (and LSTM projections)."""

    name = "recurrent"

    def trace(self, t: Trace, name, module, args, kwargs, output):
        x = first_input(args, kwargs)
        vec = t.channel(x, -1)
        gates = _GATES[module.mode]
        dirs = 2 if module.bidirectional else 1
        ids = t.source(name, name, module.hidden_size)
        proj = getattr(module, "proj_size", 0)
        emitted = t.source(name, f"{name}.proj", proj) if proj else ids  # what each step outputs and feeds back
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse")[:dirs]:
                tail = f"_l{layer}{suffix}"
                t.port(name, f"weight_ih{tail}", 1, vec if layer == 0 else emitted.repeat(dirs), "in", name)
                t.port(name, f"weight_hh{tail}", 1, emitted, "in", name)
                for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if getattr(module, f"{p}{tail}", None) is not None:
                        t.port(name, f"{p}{tail}", 0, ids.repeat(gates), "out", name)
                if proj:
                    t.port(name, f"weight_hr{tail}", 0, emitted, "out", name)
                    t.port(name, f"weight_hr{tail}", 1, ids, "in", name)
        out, state = output
        t.label(out, -1, emitted.repeat(dirs))
        if isinstance(state, tuple):  # LSTM: (h_n, c_n)
            t.label(state[0], -1, emitted)
            t.label(state[1], -1, ids)
        else:
            t.label(state, -1, ids)

    def update(self, module, name, edit, kept):
        hidden = module.weight_ih_l0.shape[0] // _GATES[module.mode]
        if getattr(module, "proj_size", 0):
            proj = module.weight_hr_l0.shape[0]
            if proj >= hidden:
                raise StructureError(
                    f"{name!r}: the removal leaves proj_size={proj} >= hidden_size={hidden}, which LSTM does not "
                    "allow; remove fewer of its hidden units or more of its projected ones (or exclude it)"
                )
            edit.set(module, "proj_size", proj)
        edit.set(module, "hidden_size", hidden)
        edit.set(module, "input_size", module.weight_ih_l0.shape[1])


for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_handler(_cls, RecurrentHandler())
