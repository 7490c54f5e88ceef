"""Attention heads of any transformers attention module laid out the usual way, whatever its class.

Most attention modules in ``transformers`` (Llama and its many descendants, BART, Whisper, GPT-J,
GPT-Neo, ELECTRA, XLM-R ...) hold separate query/key/value ``Linear`` projections and an optional
output projection, and split the projected channels into ``(heads, head_dim)`` in their forward. The
per-family handlers in :mod:`.hf` cover a few of them by class; this recogniser covers the rest by
*structure*: a module whose class name ends in ``Attention`` is taken when

- it has direct ``Linear`` children with one of the usual q/k/v(/o) spellings,
- its attributes give a head width (``head_dim``, ``attention_head_size`` ...) or a head count that
  divides the query width exactly, and the key/value width is a whole number of heads that divides
  the query heads (grouped-query and multi-query attention),
- every other parameter it holds is per head-dimension (``q_norm``/``k_norm`` of width ``head_dim``,
  which removing whole heads leaves alone).

A ``q_norm`` / ``k_norm`` over the whole query / key width (OLMo 2) is cut with the heads (its
statistics then cover the remaining heads only: a valid smaller model, not the zero-unit identity).
Anything else (fused QKV: :mod:`.hf_fused`; a learned per-head bias) is not taken:
the module is then traced op by op, and the reshape into heads is refused with its name. Heads and
GQA groups become units exactly as in :func:`.heads.head_units` (``structural={'gqa': ...}``).
Cross-attention reads its keys and values from ``key_value_states`` / ``encoder_hidden_states``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import StructureError
from .handlers import Handler, _named, handler_for, register_handler_matcher
from .heads import head_units as _head_units
from .hf_fused import _arguments
from .surgery import Surgery
from .trace import Trace

Q_NAMES = ("q_proj", "query", "q", "wq", "query_proj", "q_lin")
K_NAMES = ("k_proj", "key", "k", "wk", "key_proj", "k_lin")
V_NAMES = ("v_proj", "value", "v", "wv", "value_proj", "v_lin")
O_NAMES = ("o_proj", "out_proj", "o", "wo", "dense", "out_lin", "output_proj", "c_proj")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv")
HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_INPUTS = ("key_value_states", "encoder_hidden_states", "key")
# attributes that hold a size the forward reads; each follows the quantity it equals before the cut
COUNT_ATTRS = {"heads": HEADS_ATTRS, "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads"),
               "groups": ("num_key_value_groups",), "inner": ("all_head_size", "inner_dim", "hidden_size",
                                                               "embed_dim", "d_model")}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    q: str
    k: str
    v: str
    o: str | None
    head_dim: int
    q_norm: str | None = None  # a norm over the whole query width (OLMo 2): its weight is cut with the heads
    k_norm: str | None = None

    def sizes(self, module: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head width) from the current tensors."""
        q, k = getattr(module, self.q), getattr(module, self.k)
        return q.out_features // self.head_dim, k.out_features // self.head_dim, self.head_dim


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    for n in names:
        if isinstance(module._modules.get(n), nn.Linear):
            return n
    return None


def _int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        value = getattr(obj, n, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def layout_of(module: nn.Module) -> tuple[Layout | None, str]:
    """The layout of ``module``, or None and why it is not the usual one."""
    q, k, v = _child(module, Q_NAMES), _child(module, K_NAMES), _child(module, V_NAMES)
    if None in (q, k, v):
        return None, "no separate query/key/value Linear children (fused QKV or another layout)"
    o = _child(module, O_NAMES)
    qo, ko, vo = (getattr(module, n).out_features for n in (q, k, v))
    hd = _int_attr(module, HEAD_DIM_ATTRS)
    if hd is None:
        heads = _int_attr(module, HEADS_ATTRS) or _int_attr(getattr(module, "config", None), ("num_attention_heads",))
        if heads is None or qo % heads:
            return None, "neither a head width nor a head count that divides the query width"
        hd = qo // heads
    if qo % hd or ko % hd or ko != vo or (qo // hd) % (ko // hd):
        return None, f"query width {qo}, key/value widths {ko}/{vo} are not whole (grouped) heads of width {hd}"
    # widths from the tensors: while a handler updates, the Linear attributes still hold the old sizes
    qw, kw = (getattr(module, n).weight.shape[0] for n in (q, k))
    norms = {n: _width_norm(module, n, width) for n, width in (("q_norm", qw), ("k_norm", kw)) if width != hd}
    norms = {n: found for n, found in norms.items() if found}
    paired = sorted(n for n, _ in module.named_parameters(recurse=False) if n.startswith("lambda_"))
    if paired:  # DiffLlama: values chunked in halves along the head axis, so heads i and i + H/2 are one unit
        return None, (f"differential attention ({', '.join(paired)}): its heads are split in halves and paired, "
                      "so one head is not a unit that can go alone")  # fmt: skip
    own = {id(p) for n in (q, k, v, o, *norms) if n is not None for p in getattr(module, n).parameters()}
    for pname, p in module.named_parameters():
        if id(p) not in own and not (p.ndim == 1 and p.shape[0] == hd):
            return None, f"parameter {pname!r} {tuple(p.shape)} is neither a projection nor per head-dimension"
    return Layout(q, k, v, o, hd, norms.get("q_norm"), norms.get("k_norm")), ""


def _width_norm(module: nn.Module, name: str, width: int) -> str | None:
    """``name`` if ``module.<name>`` is a norm whose only parameter is one weight over ``width`` channels."""
    norm = module._modules.get(name)
    params = dict(norm.named_parameters()) if norm is not None else {}
    return name if set(params) == {"weight"} and tuple(params["weight"].shape) == (width,) else None


class GenericAttentionHandler(Handler):
    """Heads of an attention module recognised by :func:`layout_of`."""

    name = "hf_generic_attention"

    def __init__(self) -> None:
        self._layouts = WeakIdKeyDictionary()

    def layout(self, module: nn.Module) -> Layout:
        found = self._layouts.get(module)
        if found is None:
            found, why = layout_of(module)
            if found is None:
                raise StructureError(f"{type(module).__name__} is not a usual q/k/v attention module: {why}")
            self._layouts[module] = found
        return found

    def heads(self, module: nn.Module) -> tuple[int, int, int]:
        return self.layout(module).sizes(module)

    def trace(self, t: Trace, name, module, args, kwargs, output):
        lay = self.layout(module)
        bound = _arguments(module, args, kwargs)  # FSMT passes query=..., key=...: by name, whatever the call
        x = bound.get("hidden_states")
        if not isinstance(x, Tensor):
            x = next((v for v in bound.values() if isinstance(v, Tensor) and v.is_floating_point()), None)
        if x is None:
            raise StructureError(f"{name!r} ({type(module).__name__}) was called without a hidden-states tensor")
        kv_x = next((bound[k] for k in KV_INPUTS if isinstance(bound.get(k), Tensor)), x)
        v_x = bound["value"] if isinstance(bound.get("value"), Tensor) else kv_x  # query=, key=, value= (FSMT)
        vec = t.channel(x, -1)
        kv_vec = vec if kv_x is x else t.channel(kv_x, -1)
        v_vec = kv_vec if v_x is kv_x else vec if v_x is x else t.channel(v_x, -1)
        heads, kv_heads, hd = lay.sizes(module)
        q_units, kv_units = _head_units(t, name, heads, kv_heads)
        q_rows = q_units.repeat_interleave(hd)
        t.port(f"{name}.{lay.q}", "weight", 1, vec, "in", name)
        t.port(f"{name}.{lay.k}", "weight", 1, kv_vec, "in", name)
        t.port(f"{name}.{lay.v}", "weight", 1, v_vec, "in", name)
        outs = [(lay.q, q_rows)]
        if kv_units is not None:
            outs += [(p, kv_units.repeat_interleave(hd)) for p in (lay.k, lay.v)]
        for p, rows in outs:
            t.port(f"{name}.{p}", "weight", 0, rows, "out", name)
            if getattr(module, p).bias is not None:
                t.port(f"{name}.{p}", "bias", 0, rows, "out", name)
        # a norm over the whole query (key) width: its statistics change with the heads, its weight follows
        if lay.q_norm is not None:
            t.port(f"{name}.{lay.q_norm}", "weight", 0, q_rows, "pass", name)
        if lay.k_norm is not None and kv_units is not None:
            t.port(f"{name}.{lay.k_norm}", "weight", 0, kv_units.repeat_interleave(hd), "pass", name)
        first = output[0] if isinstance(output, (tuple, list)) else output
        if lay.o is None:  # BERT-style: the context leaves the module, the next Linear consumes the heads
            t.label(first, -1, q_rows)
            return
        o = getattr(module, lay.o)
        t.port(f"{name}.{lay.o}", "weight", 1, q_rows, "in", name)
        ids = t.source(name, f"{name}.{lay.o}", o.out_features)
        t.port(f"{name}.{lay.o}", "weight", 0, ids, "out", name)
        if o.bias is not None:
            t.port(f"{name}.{lay.o}", "bias", 0, ids, "out", name)
        t.label(first, -1, ids)

    def update(self, module: nn.Module, name: str, edit: Surgery, kept: dict[str, int]) -> None:
        lay = self.layout(module)
        q = getattr(module, lay.q)
        # the Linear attributes still hold the sizes before the cut (the tensors are already cut)
        old_heads, old_kv = q.out_features // lay.head_dim, getattr(module, lay.k).out_features // lay.head_dim
        old = {"heads": old_heads, "kv_heads": old_kv, "groups": old_heads // old_kv,
               "inner": q.in_features if q.in_features == q.out_features else None}  # fmt: skip
        for p in (lay.q, lay.k, lay.v, lay.o):
            if p is not None:
                handler_for(getattr(module, p)).update(getattr(module, p), "", edit, {})
        heads, kv_heads, hd = lay.sizes(module)
        # the inner width (heads x head_dim) and the model width agreed before: an attribute holding
        # that shared value is ambiguous unless both still agree; the forward check settles the rest
        new = {"heads": heads, "kv_heads": kv_heads, "groups": heads // kv_heads, "inner": heads * hd}
        for what, attrs in COUNT_ATTRS.items():
            for attr in attrs:
                value = getattr(module, attr, None)
                if old[what] is not None and isinstance(value, int) and value == old[what]:
                    if what == "inner" and heads * hd != q.in_features:
                        continue
                    edit.set(module, attr, new[what])


GENERIC = _named(GenericAttentionHandler())  # by name too: saved plans refer to it


@register_handler_matcher
def match_attention(module: nn.Module) -> Handler | None:
    """:data:`GENERIC` for a module whose class name ends in ``Attention`` and whose layout is usual."""
    if not type(module).__name__.endswith("Attention") or not type(module).__module__.startswith("transformers"):
        return None
    if module in GENERIC._layouts:
        return GENERIC
    lay, _ = layout_of(module)
    if lay is None:
        return None
    GENERIC._layouts[module] = lay
    return GENERIC


def why_not(module: nn.Module) -> str:
    """Why an attention module is not covered (for error messages)."""
    return layout_of(module)[1]
