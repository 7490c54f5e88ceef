"""Per-module-type handlers: how a layer joins the dependency graph and how it is cut.

A handler has two jobs. :meth:`Handler.trace` runs once per call of the module while
the model is traced: it reads the classes of the inputs, declares *ports* (which
parameter axes hold which classes) and labels the outputs. :meth:`Handler.update`
runs after the ports were cut and fixes the module's attributes (``in_features``,
``num_heads`` ...). Cutting the tensors themselves is generic.

Register your own with :func:`register_handler` (``@register_handler(MyLayer)`` on the handler
class, or ``register_handler(MyLayer, MyHandler())``): a module with a handler is a leaf, traced
as a whole; a module without one is traced through, op by op. Handlers are also registered by
``name``, which saved pruning plans refer to.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError, StructureError
from ..registry import Registry
from .surgery import Surgery
from .trace import Trace

_REGISTRY: dict[type, Handler] = {}
_BY_NAME: dict[str, Handler] = {}  # 'package.module.Class' -> handler, for optional libraries
#: handlers by their ``name``: what a saved pruning plan refers to
HANDLERS: Registry[Handler] = Registry("handler", StructureError)


class Handler:
    """Base class. ``name`` identifies the handler in saved pruning plans."""

    name: str = ""

    def trace(self, t: Trace, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        raise NotImplementedError

    def update(self, module: nn.Module, name: str, edit: Surgery, kept: dict[str, int]) -> None:
        """Fix attributes after cutting. ``kept`` maps port parameter names to their new sizes
        (parameter-less ports, named ``#...``, exist only to carry a size)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _named(handler: Any) -> Handler:
    if isinstance(handler, type) and issubclass(handler, Handler):
        handler = handler()
    if not isinstance(handler, Handler):
        raise ConfigError(f"handler must be a secateurs.structural.Handler, got {type(handler).__name__}")
    if not handler.name:
        raise ConfigError(f"{type(handler).__name__} needs a `name`: saved pruning plans refer to handlers by name")
    HANDLERS.register(handler, replace=True)
    return handler


def register_handler(module_type: type, handler: Handler | type[Handler] | None = None) -> Any:
    """Use ``handler`` for ``module_type`` and its subclasses (the most specific type wins). Without
    ``handler`` it is a class decorator: ``@register_handler(MyLayer)`` on a Handler subclass."""
    if handler is None:

        def decorate(cls: type[Handler]) -> type[Handler]:
            _REGISTRY[module_type] = _named(cls)
            return cls

        return decorate
    _REGISTRY[module_type] = _named(handler)
    return handler


def register_handler_by_name(qualified_name: str, handler: Handler) -> None:
    """Like :func:`register_handler` for a class named ``'package.module.Class'``, so that optional
    libraries (transformers) are never imported just to register handlers."""
    _BY_NAME[qualified_name] = _named(handler)


#: functions ``module -> Handler | None`` asked, in order, for a module no registered type covers
#: (a generic attention recogniser: any module laid out the usual way, whatever its class)
MATCHERS: list[Any] = []


def register_handler_matcher(matcher: Any) -> Any:
    """Ask ``matcher(module)`` for a handler when no registered type matches ``module``; it returns
    a named Handler (registered for saved plans) or None. Usable as a decorator."""
    MATCHERS.append(matcher)
    return matcher


def handler_for(module: nn.Module) -> Handler | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        by_name = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if by_name is not None:
            return by_name
    for matcher in MATCHERS:
        found = matcher(module)
        if found is not None:
            return found
    return None


def handler_named(name: str, module: str = "", kind: str = "") -> Handler:
    """The handler a pruning plan names; a typed error saying which one to register otherwise."""
    if name in HANDLERS:
        return HANDLERS.get(name)
    where = f" for module {module!r}" + (f" ({kind})" if kind else "") if module else ""
    raise StructureError(
        f"the pruning plan needs the structural handler {name!r}{where}, which is not registered in this "
        f"session; import the code that registers it (secateurs.structural.register_handler({kind or 'ModuleType'}, "
        f"YourHandler()) with name={name!r}) before loading. Registered: {', '.join(sorted(HANDLERS))}"
    )


def first_input(args: tuple, kwargs: dict, key: str = "input") -> Tensor:
    return args[0] if args else kwargs[key]


# -- shared port recipes (also used for F.linear / F.conv on a module's own parameters) ----------
def linear_ports(
    t: Trace, owner: str, x: Tensor, out: Tensor, weight: str = "weight", bias: str | None = "bias",
    functional: bool = False, transposed: bool = False,
) -> None:  # fmt: skip
    """``y = x W^T + b``: W's columns consume x's channels, its rows produce new ones.
    ``transposed``: W is stored ``(in, out)`` (transformers' ``Conv1D``)."""
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    t.port(owner, weight, in_dim, t.channel(x, -1), "in", owner)
    ids = t.source(owner, f"{owner}.{weight}" if functional else owner, out.shape[-1])
    t.port(owner, weight, out_dim, ids, "out", owner)
    if bias is not None:
        t.port(owner, bias, 0, ids, "out", owner)
    t.label(out, -1, ids)


def conv_ports(t: Trace, owner: str, module: nn.Module, x: Tensor, out: Tensor, transposed: bool) -> None:
    """Convolutions, including grouped, depthwise and transposed ones.

    - groups = 1: like a linear layer over the channel axis;
    - depthwise (groups = in_channels): output channel ``c*m + j`` belongs to input channel c,
      so the filter is a per-channel op and removing c removes its m outputs;
    - grouped (1 < groups < in_channels): every group must keep the same width, so position p
      is removed from all groups at once (input p of every group is tied, and so is output q).
    """
    w = module.weight
    spatial = w.ndim - 2
    cdim = x.ndim - spatial - 1
    vec = t.channel(x, cdim)
    cin, groups = x.shape[cdim], module.groups
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    has_bias = getattr(module, "bias", None) is not None
    if groups > 1 and groups == cin:
        mult = module.out_channels // module.in_channels
        ids = vec.repeat_interleave(mult)
        t.port(owner, "weight", 0, vec if transposed else ids, "pass", owner)
        if transposed and mult > 1:
            t.port(owner, "weight", 1, t.source(owner, f"{owner}:multiplier", mult), "pass", owner)
    elif groups > 1:
        per_in = vec.reshape(groups, cin // groups)
        for g in range(1, groups):
            t.couple(per_in[0], per_in[g])
        t.port(owner, "weight", in_axis, vec if transposed else per_in[0], "in", owner)
        per_out = t.source(owner, owner, module.out_channels // groups)
        ids = per_out.repeat(groups)
        t.port(owner, "weight", out_axis, per_out if transposed else ids, "out", owner)
    else:
        t.port(owner, "weight", in_axis, vec, "in", owner)
        ids = t.source(owner, owner, module.out_channels)
        t.port(owner, "weight", out_axis, ids, "out", owner)
    if has_bias:
        t.port(owner, "bias", 0, ids, "out" if groups != cin or groups == 1 else "pass", owner)
    t.label(out, cdim, ids)


def pass_through(t: Trace, owner: str, x: Tensor, out: Tensor, dim: int, params: list[str]) -> None:
    """A per-channel op (norms, PReLU): its parameters are indexed by x's channels on ``dim``."""
    vec = t.channel(x, dim)
    for p in params:
        t.port(owner, p, 0, vec, "pass", owner)
    t.label(out, dim, vec)


# -- primitives ---------------------------------------------------------------------------------
class LinearHandler(Handler):
    """``nn.Linear``: its columns consume the input's channels, its rows (and bias) produce new ones."""

    name = "linear"

    def trace(self, t, name, module, args, kwargs, output):
        linear_ports(t, name, first_input(args, kwargs), output, bias="bias" if module.bias is not None else None)

    def update(self, module, name, edit, kept):
        edit.set(module, "in_features", module.weight.shape[1])
        edit.set(module, "out_features", module.weight.shape[0])


class ConvHandler(Handler):
    """Convolutions, grouped and depthwise ones included (see :func:`conv_ports`)."""

    name = "conv"
    transposed = False

    def trace(self, t, name, module, args, kwargs, output):
        conv_ports(t, name, module, first_input(args, kwargs), output, self.transposed)

    def update(self, module, name, edit, kept):
        w, groups = module.weight, module.groups
        depthwise = groups > 1 and groups == module.in_channels
        mult = module.out_channels // module.in_channels if depthwise else 1
        if self.transposed:
            cin = w.shape[0]
            cout = cin * w.shape[1] if depthwise else w.shape[1] * groups
        else:
            cout = w.shape[0]
            cin = cout // mult if depthwise else w.shape[1] * groups
        edit.set(module, "in_channels", cin)
        edit.set(module, "out_channels", cout)
        if depthwise:
            edit.set(module, "groups", cin)


class ConvTransposeHandler(ConvHandler):
    """Transposed convolutions: the weight is stored ``(in, out / groups, *kernel)``."""

    name = "conv_transpose"
    transposed = True


class NormHandler(Handler):
    """BatchNorm / InstanceNorm: per-channel affine and running statistics on axis 1."""

    name = "batch_norm"

    def trace(self, t, name, module, args, kwargs, output):
        x = first_input(args, kwargs)
        params = [p for p in ("weight", "bias", "running_mean", "running_var") if getattr(module, p, None) is not None]
        pass_through(t, name, x, output, 1 if x.ndim > 1 else 0, params or ["#features"])

    def update(self, module, name, edit, kept):
        edit.set(module, "num_features", next(iter(kept.values())))


class LayerNormHandler(Handler):
    """LayerNorm / RMSNorm over the last axis. Removing a channel changes the statistics of the
    others (no zero-channel invariance), but the result is a valid, smaller model."""

    name = "layer_norm"

    def trace(self, t, name, module, args, kwargs, output):
        x = first_input(args, kwargs)
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            t.block(t.channel(x, -1), f"{name!r} normalises over {len(shape)} axes; only 1 is supported")
            return
        params = [p for p in ("weight", "bias") if getattr(module, p, None) is not None]
        pass_through(t, name, x, output, -1, params or ["#features"])

    def update(self, module, name, edit, kept):
        edit.set(module, "normalized_shape", (next(iter(kept.values())),))


class GroupNormHandler(Handler):
    """Every group must keep the same width: position p is removed from all groups at once."""

    name = "group_norm"

    def trace(self, t, name, module, args, kwargs, output):
        x = first_input(args, kwargs)
        vec = t.channel(x, 1)
        per = vec.reshape(module.num_groups, -1)
        for g in range(1, module.num_groups):
            t.couple(per[0], per[g])
        for p in [p for p in ("weight", "bias") if getattr(module, p, None) is not None] or ["#features"]:
            t.port(name, p, 0, vec, "pass", name)
        t.label(output, 1, vec)

    def update(self, module, name, edit, kept):
        edit.set(module, "num_channels", next(iter(kept.values())))


class EmbeddingHandler(Handler):
    """The embedding dimension is a fresh set of channels (the residual stream of a transformer)."""

    name = "embedding"

    def trace(self, t, name, module, args, kwargs, output):
        ids = t.source(name, name, module.embedding_dim, kind="hidden")
        t.port(name, "weight", 1, ids, "out", name)
        t.label(output, -1, ids)

    def update(self, module, name, edit, kept):
        edit.set(module, "embedding_dim", module.weight.shape[1])


class PReLUHandler(Handler):
    """PReLU with one slope per channel is cut with the channel; a single shared slope passes through."""

    name = "prelu"

    def trace(self, t, name, module, args, kwargs, output):
        x = first_input(args, kwargs)
        if module.num_parameters > 1:
            pass_through(t, name, x, output, 1 if x.ndim > 1 else 0, ["weight"])
        elif (lab := t.labels(x)) is not None:
            t.set(output, lab)

    def update(self, module, name, edit, kept):
        edit.set(module, "num_parameters", module.weight.shape[0])


class Conv1DHandler(Handler):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""

    name = "hf_conv1d"

    def trace(self, t, name, module, args, kwargs, output):
        linear_ports(t, name, first_input(args, kwargs, "x"), output, transposed=True)

    def update(self, module, name, edit, kept):
        edit.set(module, "nf", module.weight.shape[1])
        if hasattr(module, "nx"):
            edit.set(module, "nx", module.weight.shape[0])


register_handler(nn.Linear, LinearHandler())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_handler(_conv, ConvHandler())
for _conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_handler(_conv, ConvTransposeHandler())
register_handler(nn.modules.batchnorm._NormBase, NormHandler())
register_handler(nn.LayerNorm, LayerNormHandler())
register_handler(nn.RMSNorm, LayerNormHandler())
register_handler(nn.GroupNorm, GroupNormHandler())
register_handler(nn.Embedding, EmbeddingHandler())
register_handler(nn.PReLU, PReLUHandler())
