"""Fused query/key/value projections (Falcon, GPT-NeoX, BLOOM, MPT, Phi-3) and fused gate/up MLPs (Phi-3).

One ``Linear`` produces queries, keys and values; which of its rows belong to which head depends on
the family, so each is described by an *order* of its rows:

- ``blocked``: ``[Q | K | V]``, each head-major (MPT's ``Wqkv``, Phi-3's ``qkv_proj`` with grouped
  query heads, Falcon's multi-query ``[q_0 .. q_{n-1} | k | v]`` with one shared key/value head);
- ``per_head``: ``[q_h k_h v_h]`` for every head h (GPT-NeoX, BLOOM, Falcon without multi-query);
- ``per_group``: ``[q .. q k v]`` for every key/value group (Falcon's ``new_decoder_architecture``).

A head (or a GQA group, ``structural={'gqa': ...}`` as in :func:`.heads.head_units`) is a unit owning
its rows of the fused weight and bias and its columns of the output projection.

ALiBi (BLOOM, MPT, Falcon with ``alibi=True``): the model builds one bias for *all* layers from the
config's head count, with a slope per head index. Recomputing it for fewer heads would give the
remaining heads other slopes (silently different logits), so the config keeps the original count
and each pruned attention module selects the rows of its own remaining heads with a forward
pre-hook (:class:`KeepAlibiHeads`); such a model is never described by a stock config
(:func:`alibi_quirks`) and reloads with :func:`secateurs.structural.load_structured`, which replays
the cuts and installs the same hook.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import StructureError
from .handlers import Handler, _named, first_input, handler_for, register_handler_by_name
from .heads import head_units as _head_units
from .labels import LABEL_DTYPE, full_none
from .surgery import Surgery
from .trace import Trace

ORDERS = ("blocked", "per_head", "per_group")
ALIBI_PORT = "#alibi_heads"  # a parameter-less port: which heads stay, so their slopes can be kept
HEADS_ATTRS = ("num_heads", "n_heads", "num_attention_heads")
KV_ATTRS = ("num_kv_heads", "num_key_value_heads")
INNER_ATTRS = ("split_size", "hidden_size")


@dataclass(frozen=True)
class FusedLayout:
    qkv: str  # the fused projection
    out: str  # the output projection
    order: str  # one of ORDERS
    head_dim: int
    alibi: tuple[str, int, bool] | None = None  # (argument, position, laid out (batch * heads, ...))
    residual: str | None = None  # an argument the module adds to its output (BLOOM)
    config_heads: bool = False  # the forward reads the head count from ``self.config`` (Phi-3)

    def sizes(self, module: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head width) from the projections' size attributes (which
        still hold the sizes before a cut while a handler updates)."""
        heads = getattr(module, self.out).in_features // self.head_dim
        total = getattr(module, self.qkv).out_features // self.head_dim
        return heads, (total - heads) // 2, self.head_dim

    def rows(self, q_units: Tensor, kv_units: Tensor | None, heads: int, kv: int) -> Tensor:
        """The unit of every row of the fused weight (-1: rows that always stay)."""
        hd = self.head_dim
        q = q_units.to(LABEL_DTYPE).repeat_interleave(hd).reshape(heads, hd)
        k = full_none((kv, hd)) if kv_units is None else kv_units.to(LABEL_DTYPE).repeat_interleave(hd).reshape(kv, hd)
        if self.order == "blocked":
            return torch.cat([q.reshape(-1), k.reshape(-1), k.reshape(-1)])
        if self.order == "per_head":
            return torch.stack([q, k, k], dim=1).reshape(-1)
        return torch.cat([q.reshape(kv, heads // kv, hd), k[:, None], k[:, None]], dim=1).reshape(-1)


def _falcon(module: nn.Module) -> tuple[FusedLayout | None, str]:
    if getattr(module.config, "alibi", False):
        return None, (
            "Falcon with alibi=True also folds the per-head ALiBi bias into the attention mask the model builds "
            "for the config's head count, which a pruned layer cannot select from; its heads are not removed"
        )
    order = "per_group" if module.new_decoder_architecture else "blocked" if module.multi_query else "per_head"
    return FusedLayout("query_key_value", "dense", order, module.head_dim), ""


def _gpt_neox(module: nn.Module) -> tuple[FusedLayout | None, str]:
    return FusedLayout("query_key_value", "dense", "per_head", module.head_size), ""


def _bloom(module: nn.Module) -> tuple[FusedLayout | None, str]:
    if module.pretraining_tp > 1 and module.slow_but_exact:
        return None, "slow_but_exact with pretraining_tp > 1 slices the output projection by its width"
    return FusedLayout("query_key_value", "dense", "per_head", module.head_dim, alibi=("alibi", 2, True),
                       residual="residual"), ""  # fmt: skip


def _mpt(module: nn.Module) -> tuple[FusedLayout | None, str]:
    return FusedLayout("Wqkv", "out_proj", "blocked", module.head_dim, alibi=("position_bias", 1, False)), ""


def _phi3(module: nn.Module) -> tuple[FusedLayout | None, str]:
    return FusedLayout("qkv_proj", "o_proj", "blocked", module.head_dim, config_heads=True), ""


#: class name -> layout recogniser; the module path of each is in :data:`CLASSES`
RECOGNISERS = {"FalconAttention": _falcon, "GPTNeoXAttention": _gpt_neox, "BloomAttention": _bloom,
               "MptAttention": _mpt, "Phi3Attention": _phi3}  # fmt: skip
CLASSES = {"FalconAttention": "falcon", "GPTNeoXAttention": "gpt_neox", "BloomAttention": "bloom",
           "MptAttention": "mpt", "Phi3Attention": "phi3"}  # fmt: skip


def layout_of(module: nn.Module) -> tuple[FusedLayout | None, str]:
    """The fused layout of ``module`` (by its class, or a base class), checked against its tensors."""
    recognise = next((RECOGNISERS[c.__name__] for c in type(module).__mro__ if c.__name__ in RECOGNISERS), None)
    if recognise is None:
        return None, f"{type(module).__name__} is not a known fused-QKV attention"
    lay, why = recognise(module)
    if lay is None:
        return None, why
    for child in (lay.qkv, lay.out):
        if not isinstance(getattr(module, child, None), nn.Linear):
            return None, f"{child!r} is not a Linear"
    heads, kv, hd = lay.sizes(module)
    total = getattr(module, lay.qkv).out_features
    if heads < 1 or kv < 1 or total != (heads + 2 * kv) * hd or heads % kv or (lay.order == "per_head" and kv != heads):
        return None, f"{lay.qkv} has {total} rows, not {heads} query heads and whole key/value heads of width {hd}"
    return lay, ""


def _arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


class FusedAttentionHandler(Handler):
    """Heads of an attention module whose queries, keys and values come from one Linear."""

    name = "hf_fused_attention"

    def __init__(self) -> None:
        self._layouts = WeakIdKeyDictionary()

    def layout(self, module: nn.Module) -> FusedLayout:
        found = self._layouts.get(module)
        if found is None:
            found, why = layout_of(module)
            if found is None:
                raise StructureError(
                    f"{type(module).__name__} cannot have its heads removed: {why}. Register a handler for it "
                    "(secateurs.structural.register_handler) or exclude it from the scope"
                )
            self._layouts[module] = found
        return found

    def heads(self, module: nn.Module) -> tuple[int, int, int]:
        return self.layout(module).sizes(module)

    def _units(self, t: Trace, name: str, lay: FusedLayout, heads: int, kv: int) -> tuple[Tensor, Tensor | None]:
        if lay.order == "per_head":  # every head has its own key and value: they go together
            units = t.source(name, f"{name}:heads", heads, kind="head")
            return units, units
        return _head_units(t, name, heads, kv)

    def trace(self, t: Trace, name, module, args, kwargs, output):
        lay = self.layout(module)
        bound = _arguments(module, args, kwargs)
        x = bound.get("hidden_states", first_input(args, kwargs, "hidden_states"))
        vec = t.channel(x, -1)
        heads, kv, hd = lay.sizes(module)
        q_units, kv_units = self._units(t, name, lay, heads, kv)
        rows = lay.rows(q_units, kv_units, heads, kv)
        qkv, out = getattr(module, lay.qkv), getattr(module, lay.out)
        t.port(f"{name}.{lay.qkv}", "weight", 1, vec, "in", name)
        t.port(f"{name}.{lay.qkv}", "weight", 0, rows, "out", name)
        if qkv.bias is not None:
            t.port(f"{name}.{lay.qkv}", "bias", 0, rows, "out", name)
        if lay.alibi is not None:
            t.port(name, ALIBI_PORT, 0, q_units, "in", name)
        t.port(f"{name}.{lay.out}", "weight", 1, q_units.to(LABEL_DTYPE).repeat_interleave(hd), "in", name)
        if lay.residual is not None and bound.get(lay.residual) is not None:
            ids = t.channel(bound[lay.residual], -1)  # output = dense(context) + residual: the same channels
        else:
            ids = t.source(name, f"{name}.{lay.out}", out.out_features)
        t.port(f"{name}.{lay.out}", "weight", 0, ids, "out", name)
        if out.bias is not None:
            t.port(f"{name}.{lay.out}", "bias", 0, ids, "out", name)
        t.label(output[0] if isinstance(output, (tuple, list)) else output, -1, ids)

    def update(self, module: nn.Module, name: str, edit: Surgery, kept: dict[str, int]) -> None:
        lay = self.layout(module)
        old_heads, old_kv, hd = lay.sizes(module)
        width = getattr(module, lay.qkv).in_features
        for p in (lay.qkv, lay.out):
            handler_for(getattr(module, p)).update(getattr(module, p), "", edit, {})
        heads, kv, _ = lay.sizes(module)
        new_width = getattr(module, lay.qkv).in_features
        for attrs, old, new in ((HEADS_ATTRS, old_heads, heads), (KV_ATTRS, old_kv, kv),
                                (("num_key_value_groups",), old_heads // old_kv, heads // kv)):  # fmt: skip
            for attr in attrs:
                if getattr(module, attr, None) == old and isinstance(old, int):
                    edit.set(module, attr, new)
        # the inner width (heads x head_dim) and the model width agreed before: follow only while both do
        if heads * hd == new_width:
            for attr in INNER_ATTRS:
                if getattr(module, attr, None) == old_heads * hd == width:
                    edit.set(module, attr, heads * hd)
        if lay.config_heads:
            self._layer_config(module, edit, heads, kv)
        if lay.alibi is not None:
            self._keep_slopes(module, name, edit, lay, old_heads)

    @staticmethod
    def _layer_config(module: nn.Module, edit: Surgery, heads: int, kv: int) -> None:
        """Phi-3 reads ``self.config.num_attention_heads`` in its forward; layers may keep different
        numbers of heads, so the module gets a view of the shared config with its own counts."""
        base = module.config
        base = base.base if isinstance(base, LayerConfig) else base
        if base.num_attention_heads == heads and getattr(base, "num_key_value_heads", kv) == kv:
            edit.set(module, "config", base)
        else:
            edit.set(module, "config", LayerConfig(base, num_attention_heads=heads, num_key_value_heads=kv))

    @staticmethod
    def _keep_slopes(module: nn.Module, name: str, edit: Surgery, lay: FusedLayout, old_heads: int) -> None:
        keep = edit.kept_positions.get((name, ALIBI_PORT))
        if keep is None:
            return
        current = module.__dict__.get("_secateurs_alibi_heads") or tuple(range(old_heads))
        if "_secateurs_alibi_of" not in module.__dict__:
            edit.set(module, "_secateurs_alibi_of", old_heads)
            argument, position, per_batch = lay.alibi
            edit.add_forward_pre_hook(module, KeepAlibiHeads(argument, position, per_batch))
        edit.set(module, "_secateurs_alibi_heads", tuple(current[i] for i in keep.tolist()))


class LayerConfig:
    """A config seen by one layer: ``overrides`` on top of the model's shared config (which stays the
    one object every other reader, and ``save_pretrained``, sees)."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.__dict__["base"], self.__dict__["overrides"] = base, dict(overrides)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or "overrides" not in self.__dict__:  # copy/pickle probe a bare instance
            raise AttributeError(attr)
        if attr in self.__dict__["overrides"]:
            return self.__dict__["overrides"][attr]
        return getattr(self.__dict__["base"], attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr in self.overrides:
            self.overrides[attr] = value
        else:
            setattr(self.base, attr, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self.base).__name__}, {self.overrides})"


class KeepAlibiHeads:
    """Forward pre-hook: pass an attention module the ALiBi rows of the heads it kept, out of the bias
    the model computed for its original head count (so every head keeps its slope)."""

    def __init__(self, argument: str, position: int, per_batch: bool) -> None:
        self.argument, self.position, self.per_batch = argument, position, per_batch

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kept, total = module.__dict__.get("_secateurs_alibi_heads"), module.__dict__.get("_secateurs_alibi_of")
        in_kwargs = self.argument in kwargs
        bias = kwargs[self.argument] if in_kwargs else args[self.position] if len(args) > self.position else None
        if kept is None or bias is None or len(kept) == total:
            return None
        rows = bias.shape[0]
        if (self.per_batch and rows % total) or (not self.per_batch and rows != total):
            raise StructureError(
                f"{type(module).__name__} kept the ALiBi slopes of heads {list(kept)} of {total}, but received a bias "
                f"with {rows} rows: the model's head count changed after pruning; restore the config's original "
                "head count (load the model with secateurs.structural.load_structured)"
            )
        index = torch.tensor(kept, device=bias.device)
        if self.per_batch:
            bias = bias.reshape(rows // total, total, *bias.shape[1:]).index_select(1, index).flatten(0, 1)
        else:
            bias = bias.index_select(0, index)
        if in_kwargs:
            return args, {**kwargs, self.argument: bias}
        return (*args[: self.position], bias, *args[self.position + 1 :]), kwargs


def alibi_quirks(model: nn.Module) -> list[str]:
    """Attention modules that keep ALiBi slopes of a subset of heads: a config with their new head
    count would make a stock reload recompute other slopes."""
    return [
        f"{name} keeps the ALiBi slopes of heads {list(m.__dict__['_secateurs_alibi_heads'])} of "
        f"{m.__dict__['_secateurs_alibi_of']}; a config with fewer heads would recompute other slopes"
        for name, m in model.named_modules()
        if "_secateurs_alibi_heads" in m.__dict__
        and len(m.__dict__["_secateurs_alibi_heads"]) != m.__dict__.get("_secateurs_alibi_of")
    ]


class FusedGateUpHandler(Handler):
    """``down(act(gate) * up)`` with gate and up fused in one Linear, split by ``chunk(2)`` (Phi-3):
    neuron i owns row i of the gate half and row i of the up half."""

    name = "hf_fused_gate_up"

    def trace(self, t: Trace, name, module, args, kwargs, output):
        x = first_input(args, kwargs, "hidden_states")
        gate_up, down = module.gate_up_proj, module.down_proj
        if gate_up.weight.shape[0] != 2 * down.weight.shape[1]:
            t.block(t.channel(x, -1), f"{name!r}: gate_up_proj has {gate_up.weight.shape[0]} rows, not twice "
                                      f"down_proj's {down.weight.shape[1]} inputs")  # fmt: skip
            return
        units = t.source(name, f"{name}.gate_up_proj", down.weight.shape[1])
        t.port(f"{name}.gate_up_proj", "weight", 1, t.channel(x, -1), "in", name)
        t.port(f"{name}.gate_up_proj", "weight", 0, torch.cat([units, units]), "out", name)
        if gate_up.bias is not None:
            t.port(f"{name}.gate_up_proj", "bias", 0, torch.cat([units, units]), "out", name)
        t.port(f"{name}.down_proj", "weight", 1, units, "in", name)
        ids = t.source(name, f"{name}.down_proj", down.weight.shape[0])
        t.port(f"{name}.down_proj", "weight", 0, ids, "out", name)
        if down.bias is not None:
            t.port(f"{name}.down_proj", "bias", 0, ids, "out", name)
        t.label(output, -1, ids)

    def update(self, module: nn.Module, name: str, edit: Surgery, kept: dict[str, int]) -> None:
        for child in (module.gate_up_proj, module.down_proj):
            handler_for(child).update(child, "", edit, {})


FUSED = _named(FusedAttentionHandler())
GATE_UP = _named(FusedGateUpHandler())
for _cls, _family in CLASSES.items():
    register_handler_by_name(f"transformers.models.{_family}.modeling_{_family}.{_cls}", FUSED)
register_handler_by_name("transformers.models.phi3.modeling_phi3.Phi3MLP", GATE_UP)
