"""How labels flow through torch functions called outside handled modules.

Each rule sees one call exactly as the model made it (function, real arguments,
real outputs) and sets the labels of the outputs. Functions are matched by
identity, never by name substrings. Families:

- pointwise: classes of aligned elements are merged (a residual add couples channels);
- shape and indexing (view, permute, cat, split, getitem ...): the call is replayed on
  the label tensors, so every rearrangement is followed exactly; a reshape that splits
  one channel axis into two (e.g. into attention heads) blocks those channels, because
  after pruning the code would split them differently;
- reductions and pooling: channels survive reductions over other axes;
- layer functions (``F.linear``, ``F.conv2d`` ...) called on a module's own parameters;
- anything else that touches labelled data blocks those classes, naming the op, so a
  prune never silently produces a model that computes something else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .handlers import linear_ports
from .labels import NONE, full_none, varying_dims, vector
from .positional import pin_positions
from .trace import Trace

Rule = Callable[[Trace, Any, tuple, dict, Any], None]
RULES: dict[Any, Rule] = {}


def _functions(names: str, *namespaces: Any) -> list[Any]:
    found = []
    for name in names.split():
        for space in namespaces:
            fn = getattr(space, name, None)
            if fn is not None:
                found.append(fn)
    return found


def rule(names: str, *namespaces: Any) -> Callable[[Rule], Rule]:
    def decorate(fn: Rule) -> Rule:
        for f in _functions(names, *namespaces):
            RULES[f] = fn
        return fn

    return decorate


def _op_name(func: Any) -> str:
    """The name a user would write: ``torch.narrow``, ``Tensor.__getitem__``, ``torch.fft.fft``."""
    self = getattr(func, "__self__", None)
    if type(self).__name__ == "getset_descriptor":
        return f"Tensor.{self.__name__}"
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    owner, _, name = qualname.rpartition(".")
    if owner in ("TensorBase", "_TensorBase", "Tensor"):
        return f"Tensor.{name}"
    if owner == "_VariableFunctionsClass":
        return f"torch.{name}"
    if module.startswith("torch._C._"):  # torch.fft.fft is torch._C._fft.fft_fft
        space = module.removeprefix("torch._C._")
        space = "nn.functional" if space == "nn" else space
        return f"torch.{space}.{name.removeprefix(space + '_')}"
    if module in ("torch.functional", "torch._tensor"):
        return f"torch.{name}"
    return f"{module}.{qualname}" if module.startswith("torch") else qualname


def tensors_in(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    return []


def _first_float(out: Any) -> Tensor | None:
    return next((t for t in tensors_in(out) if t.is_floating_point()), None)


# -- pointwise -------------------------------------------------------------------------------
_POINTWISE = """add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod pow
 float_power neg negative abs absolute exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square reciprocal sign sgn
 sin cos tan tanh sinh cosh asin acos atan atan2 sigmoid erf erfc erfinv relu relu6 gelu silu mish elu selu celu
 leaky_relu hardtanh hardswish hardsigmoid softplus softsign tanhshrink logsigmoid threshold clamp clip clamp_min
 clamp_max where maximum minimum fmax fmin lerp addcmul addcdiv masked_fill nan_to_num round floor ceil trunc frac
 to type type_as float double half bfloat16 contiguous clone detach requires_grad_ dropout alpha_dropout
 feature_alpha_dropout dropout1d dropout2d dropout3d softmax log_softmax softmin cumsum cumprod normalize
 fill_ zero_ copy_ add_ sub_ mul_ div_ relu_ clamp_ neg_ sigmoid_ tanh_ pow_ exp_ sqrt_ rsqrt_ abs_ elu_
 leaky_relu_ hardtanh_ masked_fill_ clamp_min_ clamp_max_ silu_ gelu_ hardswish_ hardsigmoid_ threshold_ celu_
 selu_ rrelu rrelu_ lerp_ addcmul_ addcdiv_ __and__ __or__ __xor__ logical_and logical_or logical_not"""


def _align(lab: Tensor, shape: torch.Size) -> tuple[Tensor, set[int]] | None:
    """Broadcast ``lab`` to ``shape``; also return the dims it was stretched along."""
    lead = len(shape) - lab.ndim
    if lead < 0:
        return None
    stretched = set(range(lead)) | {lead + d for d in range(lab.ndim) if lab.shape[d] == 1 and shape[lead + d] > 1}
    try:
        return torch.broadcast_to(lab, shape), stretched
    except RuntimeError:
        return None


@rule(_POINTWISE, torch, torch.Tensor, F, torch.special)
def pointwise(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Elementwise ops merge the classes of aligned elements. An operand stretched along an
    axis where another varies (a spatial gate broadcast over channels) is only read, not tied."""
    target = _first_float(out)
    if target is None:
        return
    labelled = [(x, lab) for x in tensors_in((args, kwargs)) if (lab := t.labels(x)) is not None]
    aligned = []
    for x, lab in labelled:
        got = _align(lab, target.shape)
        if got is None:
            t.block(lab, f"{_op_name(func)} in {t.where()} combines tensors of shapes it cannot align")
            return
        aligned.append((*got, t.parametric(x)))
    if not aligned:
        return
    # channel axes: where activations vary (a parameter's per-element ids vary everywhere)
    varying = [set() if param else set(varying_dims(t.roots(lab))) for lab, _, param in aligned]
    combined, parametric = None, True
    for i, (lab, stretched, param) in enumerate(aligned):
        others = set().union(*(v for j, v in enumerate(varying) if j != i))
        if stretched & others:
            continue  # broadcast over channels: read by every channel, tied to none
        parametric &= param
        if combined is None:
            combined = lab
        else:
            t.couple(combined, lab)
            combined = torch.where(combined >= 0, combined, lab)
    if combined is not None:
        t.set(target, combined.clone(), parametric)


# -- shape and indexing: replay on labels ------------------------------------------------------
_REPLAY = """view reshape flatten unflatten permute transpose swapaxes swapdims t squeeze unsqueeze expand
 expand_as view_as reshape_as repeat tile __getitem__ narrow select movedim moveaxis flip fliplr
 flipud roll index_select gather take_along_dim repeat_interleave pixel_shuffle pixel_unshuffle
 channel_shuffle unfold diagonal masked_select broadcast_to atleast_1d atleast_2d atleast_3d ravel"""


def _substitute(t: Trace, obj: Any) -> Any:
    """Arguments for the replay: float tensors become their labels; indices stay as they are."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point():
            return obj.cpu()  # labels live on the CPU whatever the model's device
        lab = t.labels(obj)
        return lab if lab is not None else full_none(obj.shape)
    if type(obj) in (list, tuple) and tensors_in(obj):
        return type(obj)(_substitute(t, o) for o in obj)
    if type(obj) is dict and tensors_in(obj):
        return {k: _substitute(t, v) for k, v in obj.items()}
    return obj


def _pairs(out: Any, lab: Any) -> list[tuple[Tensor, Tensor]]:
    if isinstance(out, Tensor):
        return [(out, lab)] if isinstance(lab, Tensor) and lab.shape == out.shape else []
    if isinstance(out, (list, tuple)) and isinstance(lab, (list, tuple)):
        return [p for o, la in zip(out, lab) for p in _pairs(o, la)]
    return []


def _spread(t: Trace, inputs: list[Tensor]) -> int:
    return max((len(varying_dims(t.roots(lab))) for lab in inputs), default=0)


# ``view`` needs memory strides that fit the new shape; a label tensor holds the same values as
# the activation's layout but not its strides (``x.transpose(1, 2).contiguous().view(...)``: the
# labels of ``contiguous`` are a copy made by an elementwise rule). On labels a view and a reshape
# give the same values, so views are replayed as reshapes.
_VIEW_AS_RESHAPE = {torch.Tensor.view: torch.Tensor.reshape, torch.Tensor.view_as: torch.Tensor.reshape_as}


def _replayed(func: Any, args: tuple) -> Any:
    if func is torch.Tensor.view and len(args) == 2 and isinstance(args[1], torch.dtype):
        return func  # a reinterpreting view(dtype) stays what it is
    return _VIEW_AS_RESHAPE.get(func, func)


@rule(_REPLAY, torch, torch.Tensor, F)
def replay(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Run the same call on the labels. If the result spreads classes over more axes than the
    input did, one channel axis was split in two: block it (the split would not survive pruning)."""
    sources = [x for x in tensors_in((args, kwargs)) if t.labels(x) is not None]
    if not sources:
        return
    lab_out = _replayed(func, args)(*_substitute(t, args), **_substitute(t, kwargs))
    parametric = all(t.parametric(x) for x in sources)
    before = _spread(t, [t.labels(x) for x in sources])
    for o, lab in _pairs(out, lab_out):
        if not o.is_floating_point():
            continue
        roots = t.roots(lab)
        if not parametric and len(varying_dims(roots)) > before:
            t.block(roots, f"{_op_name(func)} in {t.where()} splits a channel axis into several axes")
        t.set(o, lab, parametric)


@rule("split split_with_sizes chunk unbind tensor_split hsplit vsplit", torch, torch.Tensor)
def split(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Splitting the channel axis: ``chunk`` into equal pieces stays valid if every piece loses the
    same positions, so they are tied (GLU-style gates, fused gate/up projections). Pieces of fixed
    sizes (``split([6, 6])``) would be cut wrongly after pruning: those channels are blocked, and so
    is everything coupled to the pieces downstream."""
    x = args[0]
    lab = t.labels(x)
    if lab is None:
        return
    is_unbind = func in (torch.unbind, torch.Tensor.unbind)
    dim = kwargs.get("dim", args[1] if is_unbind and len(args) > 1 else args[2] if len(args) > 2 else 0)
    dim = dim % x.ndim if isinstance(dim, int) else dim
    roots = t.roots(lab)
    if dim not in varying_dims(roots):
        replay(t, func, args, kwargs, out)
        return
    sizes = [o.shape[dim] for o in out]
    if func in (torch.chunk, torch.Tensor.chunk) and len(set(sizes)) == 1:
        first = lab.narrow(dim, 0, sizes[0])
        for k in range(1, len(sizes)):
            t.couple(first, lab.narrow(dim, k * sizes[0], sizes[0]))
        replay(t, func, args, kwargs, out)
        return
    t.block(roots, f"{_op_name(func)} in {t.where()} splits channels into pieces of fixed sizes {sizes}")
    # the pieces still carry their classes: whatever they meet later (a residual add) is tied to
    # the blocked channels, instead of looking free beside an unlabelled operand
    replay(t, func, args, kwargs, out)


@rule("__setitem__", torch.Tensor)
def setitem(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    target, index, value = args
    lab_value = t.labels(value) if isinstance(value, Tensor) else None
    lab = t.labels(target)
    if lab_value is None and lab is None:
        return
    lab = (lab if lab is not None else full_none(target.shape)).clone()
    lab[_substitute(t, index)] = lab_value if lab_value is not None else NONE
    t.set(target, lab)


@rule("cat concat concatenate stack hstack vstack", torch)
def concatenate(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Concatenating along the channel axis appends classes; along any other axis (tokens,
    a class token, batch) the pieces meet the same layers, so their channels are tied."""
    pieces = args[0] if args else kwargs.get("tensors")
    labs = [(x, t.labels(x)) for x in pieces]
    if all(lab is None for _, lab in labs):
        return
    labs = [(x, lab) for x, lab in labs if lab is not None or x.is_floating_point()]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    stacking = func in (torch.stack, torch.hstack, torch.vstack)
    if not stacking:
        dim = dim % pieces[0].ndim
        channel_axis = any(
            lab is not None and not t.parametric(x) and dim in varying_dims(t.roots(lab)) for x, lab in labs
        )
        if not channel_axis:
            slices = [lab.narrow(dim, k, 1) for _, lab in labs if lab is not None for k in range(lab.shape[dim])]
            base = slices[0]
            for other in slices[1:]:
                t.couple(base, other)
                base = torch.where(base >= 0, base, other)
            parametric = all(lab is None or t.parametric(x) for x, lab in labs)
            t.set(out, base.expand_as(out).clone(), parametric)
            return
    replay(t, func, args, kwargs, out)


@rule("pad", F)
def pad(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Padded positions of a spatial axis belong to the same channel; padded channels to none."""
    x = args[0]
    lab = t.labels(x)
    if lab is None:
        return
    widths = args[1] if len(args) > 1 else kwargs["pad"]
    roots = t.roots(lab)
    channel_axes = set(varying_dims(roots))
    for i in range(len(widths) // 2):
        dim = lab.ndim - 1 - i
        before, after = widths[2 * i], widths[2 * i + 1]
        if before < 0 or after < 0:
            lab = lab.narrow(dim, max(-before, 0), lab.shape[dim] - max(-before, 0) - max(-after, 0))
            before, after = max(before, 0), max(after, 0)
        if dim in channel_axes:
            shape = list(lab.shape)
            parts = []
            for width in (before, after):
                shape[dim] = width
                parts.append(full_none(shape))
            lab = torch.cat([parts[0], lab, parts[1]], dim)
        else:
            low, high = lab.narrow(dim, 0, 1), lab.narrow(dim, lab.shape[dim] - 1, 1)
            lab = torch.cat([low.repeat_interleave(before, dim), lab, high.repeat_interleave(after, dim)], dim)
    t.set(out, lab)


@rule("glu", F)
def glu(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """GLU halves an axis: channel i of the output gates a[i] by b[i], so the halves are tied."""
    lab = t.labels(args[0])
    if lab is None:
        return
    dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    a, b = lab.chunk(2, dim)
    t.couple(a, b)
    t.set(out, a.clone())


# -- reductions and pooling --------------------------------------------------------------------
_REDUCE = """sum mean nansum nanmean amax amin max min norm std var prod logsumexp median nanmedian all any
 count_nonzero var_mean std_mean aminmax"""


@rule(_REDUCE, torch, torch.Tensor)
def reduce(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Channels survive a reduction over other axes; a reduction over the channel axis consumes
    them (removing a zero channel leaves a sum unchanged, but a mean over channels changes)."""
    if len(args) > 1 and isinstance(args[1], Tensor):  # torch.max(a, b) is elementwise
        pointwise(t, func, args, kwargs, out)
        return
    lab = t.labels(args[0]) if args and isinstance(args[0], Tensor) else None
    target = _first_float(out)
    if lab is None or target is None:
        return
    dims = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], (float, str)) else None)
    if func in (torch.norm, torch.Tensor.norm):
        dims = kwargs.get("dim", args[2] if len(args) > 2 else None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return  # a full reduction: a scalar, no channels left
    dims = [d % lab.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    roots = t.roots(lab)
    if set(dims) & set(varying_dims(roots)):
        return
    keep = lab
    for d in sorted(dims, reverse=True):
        keep = keep.narrow(d, 0, 1)
    if target.ndim != keep.ndim:
        keep = keep.squeeze(tuple(dims)) if target.ndim < keep.ndim else keep
    if keep.numel() == target.numel():
        t.set(target, keep.reshape(target.shape).clone())


_SPATIAL = {
    **dict.fromkeys(_functions("avg_pool1d max_pool1d adaptive_avg_pool1d adaptive_max_pool1d lp_pool1d "
                               "max_pool1d_with_indices _max_pool1d _adaptive_max_pool1d", F, torch), 1),
    **dict.fromkeys(_functions("avg_pool2d max_pool2d adaptive_avg_pool2d adaptive_max_pool2d lp_pool2d "
                               "max_pool2d_with_indices _max_pool2d _adaptive_max_pool2d fractional_max_pool2d "
                               "_fractional_max_pool2d", F, torch), 2),
    **dict.fromkeys(_functions("avg_pool3d max_pool3d adaptive_avg_pool3d adaptive_max_pool3d lp_pool3d "
                               "max_pool3d_with_indices _max_pool3d _adaptive_max_pool3d", F, torch), 3),
}  # fmt: skip


def _spatial(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Pooling and resizing act per channel: output channel c is input channel c."""
    x = args[0]
    lab = t.labels(x)
    target = _first_float(out)
    if lab is None or target is None:
        return
    spatial = _SPATIAL.get(func, x.ndim - 2)
    cdim = x.ndim - spatial - 1
    vec = vector(t.roots(lab), cdim)
    if vec is None:
        t.block(t.roots(lab), f"{_op_name(func)} in {t.where()} pools a tensor whose channels are not on axis {cdim}")
        return
    t.label(target, cdim, vec)


for _f in [*_SPATIAL, *_functions("interpolate upsample upsample_nearest upsample_bilinear", F)]:
    RULES[_f] = _spatial


# -- layer functions on a module's own parameters ------------------------------------------------
@rule("linear", F)
def linear(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    owner = t.owner_of(w)
    if owner is None:  # a weight computed at run time (hypernetworks): not a layer we can cut
        _block_all(t, func, args, kwargs)
        return
    linear_ports(t, owner[0], x, out, weight=owner[1], bias=(t.owner_of(b) or (None, None))[1], functional=True)


@rule("matmul mm bmm __matmul__", torch, torch.Tensor)
def matmul(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """``a @ b``: the contracted axis ties a's columns to b's rows; the result carries a's rows
    and b's columns. With a parameter on the right it is a linear layer."""
    a, b = args[0], args[1]
    if not isinstance(out, Tensor) or a.ndim < 2 or b.ndim < 2:
        if t.labels(a) is not None or t.labels(b) is not None:
            _block_all(t, func, args, kwargs)
        return
    owner = t.owner_of(b)
    if owner is not None and b.ndim == 2 and t.labels(a) is not None:
        vec = t.channel(a, -1)
        t.port(owner[0], owner[1], 0, vec, "in", owner[0])
        ids = t.source(owner[0], f"{owner[0]}.{owner[1]}", b.shape[1])
        t.port(owner[0], owner[1], 1, ids, "out", owner[0])
        t.label(out, -1, ids)
        return
    la, lb = t.labels(a), t.labels(b)
    if la is None and lb is None:
        return
    cols_a = t.channel(a, -1) if la is not None else full_none((a.shape[-1],))
    rows_b = t.channel(b, -2) if lb is not None else full_none((b.shape[-2],))
    t.couple(cols_a, rows_b)
    rows = t.channel(a, -2) if la is not None else full_none((a.shape[-2],))
    cols = t.channel(b, -1) if lb is not None else full_none((b.shape[-1],))
    lab = torch.where(cols.reshape(1, -1) >= 0, cols.reshape(1, -1), rows.reshape(-1, 1))
    t.set(out, lab.expand(out.shape).clone())


def _block_all(t: Trace, func: Any, args: tuple, kwargs: dict) -> None:
    for x in tensors_in((args, kwargs)):
        lab = t.labels(x)
        if lab is not None:
            t.block(t.roots(lab), f"unsupported op {_op_name(func)} in {t.where()}")


# -- functions that never move channels -------------------------------------------------------
_INERT = set(
    _functions(
        "zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones new_empty "
        "new_full new_tensor size dim numel element_size stride data_ptr is_contiguous is_floating_point argmax "
        "argmin argsort isfinite isnan isinf isneginf isposinf eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ "
        "__ge__ equal allclose isclose nonzero item tolist __bool__ __len__ __format__ __repr__ __hash__ "
        "register_hook retain_grad backward cpu cuda numpy",
        torch,
        torch.Tensor,
    )
)
_REPLAYED_PROPERTIES = {"T", "mT", "H", "mH", "data", "real"}


def handle(t: Trace, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Dispatch one call. Calls that touch no labelled tensor cost one scan of the arguments."""
    if func in _INERT:
        return
    if not any(t.tracked(x) for x in tensors_in((args, kwargs))):
        return
    pin_positions(t, func, args, kwargs, _op_name)
    fn = RULES.get(func)
    if fn is None:
        self = getattr(func, "__self__", None)
        if type(self).__name__ == "getset_descriptor":
            if self.__name__ in _REPLAYED_PROPERTIES:
                replay(t, func, args, kwargs, out)
            return
        # complex results count as data too: torch.fft over channels would otherwise drop the labels
        data = any(o.is_floating_point() or o.is_complex() for o in tensors_in(out))
        if func is torch.Tensor.__setitem__ or not data:
            return
        _block_all(t, func, args, kwargs)
        return
    fn(t, func, args, kwargs, out)


__all__ = ["RULES", "handle", "rule", "tensors_in"]
