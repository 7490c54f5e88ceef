"""Scope: which ``(module, weight)`` pairs are candidates for pruning.

Resolved once, up front, into a list of :class:`Target`, and validated before
anything is mutated. Defaults follow common practice (Frankle & Carbin 2019;
Gale et al. 2019, arXiv:1902.09574): the input stem and the classifier are the
most sensitive layers, and embeddings are lookups rather than compute, so all
three are left dense unless asked for.
"""

from __future__ import annotations

import difflib
import fnmatch
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ScopeError, choices
from .layout import Layout, canonical_shape, hf_conv1d_class, layout_of
from .spec import Spec, boolean, option, strings

DEFAULT_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")
SUPPORTED_TYPES: tuple[str, ...] = (*DEFAULT_TYPES, "Embedding")


@dataclass(frozen=True)
class ScopeSpec(Spec):
    """What to prune. Names are module qualified names (``features.3``); patterns are
    shell globs, or regular expressions (searched) when prefixed with ``re:``."""

    _prefix = "scope."

    include: tuple[str, ...] = option(("*",), check=strings())
    exclude: tuple[str, ...] = option((), check=strings())
    types: tuple[str, ...] = option(DEFAULT_TYPES, check=strings())
    skip_first: bool = option(True, check=boolean())
    skip_last: bool = option(True, check=boolean())
    embeddings: bool = option(False, check=boolean())

    def _resolve(self) -> None:
        for key in ("include", "exclude", "types"):  # one globs tuple, however it was given
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
            else:
                object.__setattr__(self, key, tuple(value))
        unknown = [t for t in self.types if t not in SUPPORTED_TYPES]
        if unknown:
            raise ScopeError(f"scope.types has unknown module type(s) {unknown}; supported: {choices(SUPPORTED_TYPES)}")
        for pattern in (*self.include, *self.exclude):
            check_glob(pattern, "scope pattern")

    @classmethod
    def from_value(cls, value: ScopeSpec | dict | Sequence[str] | str | None) -> ScopeSpec:
        """Accept a spec, a dict of its fields, or a list of include patterns."""
        if value is None:
            return cls()
        if isinstance(value, ScopeSpec):
            return value
        if isinstance(value, str):
            return cls(include=(value,))
        if isinstance(value, Mapping):  # any mapping of fields (a MappingProxyType is not a list of globs)
            valid = set(cls.__dataclass_fields__)
            unknown = set(value) - valid
            if unknown:
                raise ScopeError(f"unknown scope key(s) {sorted(unknown)}; valid: {choices(valid)}")
            return cls(**value)
        if isinstance(value, (bytes, numbers.Number)) or not isinstance(value, Iterable):
            raise ScopeError(
                f"scope must be a glob, a list of globs, a dict of {choices(cls.__dataclass_fields__)} or a "
                f"ScopeSpec; got {value!r}"
            )
        return cls(include=tuple(value))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


Holder = tuple[str, nn.Module, str]  # (module qualified name, module, attribute) through which a weight is used


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable weight: ``module_name.weight`` with its layout.

    A weight shared by several modules (tied embeddings and LM head, a layer reused under two
    names with its own module object) is *one* target: ``tied`` lists the other holders, and
    masking, baking, saving and loading act on all of them, so every module that computes with
    the tensor sees the same mask (ARCHITECTURE invariant 7)."""

    module_name: str
    module: nn.Module = field(repr=False)
    layout: Layout
    param_name: str = "weight"
    tied: tuple[Holder, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def users(self) -> tuple[Holder, ...]:
        """Every holder of the weight, this target's own module first."""
        return ((self.module_name, self.module, self.param_name), *self.tied)

    @property
    def tied_names(self) -> list[str]:
        return [f"{n}.{a}" if n else a for n, _, a in self.tied]

    @property
    def parameter(self) -> nn.Parameter:
        """The trainable tensor (the original under a mask parametrization)."""
        return _held(self.module, self.param_name)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight as the forward pass sees it (masked, if masked)."""
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> torch.Size:
        return self.parameter.shape

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return canonical_shape(self.shape, self.layout)

    @property
    def numel(self) -> int:
        return self.parameter.numel()


def _held(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The tensor ``module`` holds as ``attr``: its parameter, or the original under a parametrization."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and attr in parametrizations:
        chain = parametrizations[attr]
        return getattr(chain, "original", None)  # None: a parametrization of several tensors (weight norm)
    return getattr(module, attr, None)


def parameter_holders(model: nn.Module) -> dict[int, list[Holder]]:
    """Every (module, attribute) through which each parameter of ``model`` is used, keyed by the
    parameter's id, in module order; a parametrized weight counts through its module, never
    through the parametrization's own container."""
    found: dict[int, list[Holder]] = {}
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue
        parametrized = getattr(module, "parametrizations", None) or {}
        for attr, tensor in module._parameters.items():
            if tensor is not None:
                found.setdefault(id(tensor), []).append((name, module, attr))
        for attr in parametrized:
            tensor = _held(module, attr)
            if tensor is not None:
                found.setdefault(id(tensor), []).append((name, module, attr))
    return found


def target_of(model: nn.Module, module_name: str, param: str = "weight", holders=None) -> Target:
    """The target of ``module_name.param``, with every other holder of that tensor as tied."""
    module = model.get_submodule(module_name)
    holders = parameter_holders(model) if holders is None else holders
    tensor = _held(module, param)
    others = [h for h in holders.get(id(tensor), []) if h[1] is not module or h[2] != param]
    return Target(module_name, module, layout_of(module), param, tuple(others))


def check_glob(pattern: str, what: str) -> None:
    """Refuse a ``re:`` pattern that does not compile, naming ``what`` it is (before anything runs)."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ScopeError(f"{what} {pattern!r} is not a valid regex: {exc}") from exc


def _matches_one(name: str, pattern: str) -> bool:
    return bool(re.search(pattern[3:], name)) if pattern.startswith("re:") else fnmatch.fnmatchcase(name, pattern)


def _ancestry(name: str) -> list[str]:
    """``'classifier.0'`` -> ``['classifier', 'classifier.0']``: the module and every module holding it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern that matches a module matches everything inside it: ``exclude=['classifier']`` leaves
    the layers of an ``nn.Sequential`` named ``classifier`` alone too, as a reader would expect."""
    return any(_matches_one(prefix, p) for prefix in _ancestry(name) for p in patterns)


def target_matches(target: Target, pattern: str) -> bool:
    """Does ``pattern`` (a glob or ``re:`` regex) name ``target``: its module, a module holding it, or
    ``module.weight`` itself? One rule for scope, overrides and explicit allocations."""
    return matches(target.module_name, [pattern]) or _matches_one(target.name, pattern)


def refuse_unmatched(spec: ScopeSpec, names: Sequence[str], model_name: str) -> None:
    """An include or exclude pattern that matches none of ``names`` is a typo, not a no-op: an exclude
    that silently excludes nothing prunes the very layer it was meant to protect."""
    for key in ("include", "exclude"):
        for pattern in getattr(spec, key):
            if any(_matches_one(n, pattern) for n in names):
                continue
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise ScopeError(
                f"scope {key} pattern {pattern!r} matches no module of {model_name}; {hint}module names are "
                f"{shown} (a glob, or re:REGEX searched in the name; a name covers the modules inside it)"
            )


def _type_ok(module: nn.Module, types: Sequence[str]) -> bool:
    wanted = []
    for name in types:
        if name == "Conv1D":
            conv1d = hf_conv1d_class()
            if conv1d is not None:
                wanted.append(conv1d)
        else:
            wanted.append(getattr(nn, name))
    return isinstance(module, tuple(wanted))


def _edge_layers(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the input-stem conv and of the classifier / LM head."""
    first_conv = None
    last_layer = None
    for name, module in model.named_modules():
        kind = layout_of(module)
        if kind is Layout.CONV and first_conv is None:
            first_conv = name
        if kind in (Layout.LINEAR, Layout.CONV, Layout.TRANSPOSED):
            last_layer = name
    head = getattr(model, "get_output_embeddings", None)
    if callable(head):
        try:
            output_embeddings = head()
        except Exception:  # a model may not implement it
            output_embeddings = None
        if output_embeddings is not None:
            for name, module in model.named_modules():
                if module is output_embeddings:
                    last_layer = name
    return first_conv, last_layer


def resolve(model: nn.Module, spec: ScopeSpec, allow_meta: bool = False) -> list[Target]:
    """Turn a spec into targets, in module order, each parameter once (tied weights). ``allow_meta``: weights
    still on the meta device are targets too (out-of-core pruning reads each block from disk before pruning it)."""
    types = tuple(spec.types) + (("Embedding",) if spec.embeddings else ())
    refuse_unmatched(spec, [n for n, _ in model.named_modules() if n], type(model).__name__)
    first_conv, last_layer = _edge_layers(model)
    skipped = set()
    if spec.skip_first and first_conv is not None:
        skipped.add(first_conv)
    if spec.skip_last and last_layer is not None:
        skipped.add(last_layer)

    holders = parameter_holders(model)
    targets: list[Target] = []
    seen: set[int] = set()
    typed = 0
    for name, module in model.named_modules():
        if not _type_ok(module, types):
            continue
        typed += 1
        if name in skipped or not matches(name, spec.include) or matches(name, spec.exclude):
            continue
        tensor = _prunable_weight(name, module, allow_meta)
        if tensor is None or tensor.ndim < 2 or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        target = target_of(model, name, "weight", holders)
        excluded = [n for n in target.tied_names if matches(n.rpartition(".")[0], spec.exclude)]
        if excluded:
            raise ScopeError(
                f"{target.name} is tied to {', '.join(excluded)} (one tensor), which the scope excludes: a tensor "
                "cannot be both pruned and dense. Exclude both, or untie them first"
            )
        targets.append(target)

    if not targets:
        raise ScopeError(
            f"scope matches no weight: include={list(spec.include)}, exclude={list(spec.exclude)}, "
            f"types={list(types)} ({typed} module(s) of those types; skipped as first conv / "
            f"classifier: {sorted(skipped) or 'none'}). Check the names with "
            f"`[n for n, _ in model.named_modules()]`, or set skip_first/skip_last to False.{_quantized_hint(model)}"
        )
    return targets


def prunable_target(model: nn.Module, qualified: str, holders: dict[int, list[Holder]] | None = None) -> Target:
    """The target named ``module.weight``, refused with a :class:`ScopeError` unless it is a weight
    secateurs could have pruned (a supported layer's floating-point weight: never a bias or a norm)."""
    module_name, _, param = qualified.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ScopeError(f"{qualified!r} names no module of {type(model).__name__}") from None
    tensor = _prunable_weight(module_name, module) if param == "weight" and _type_ok(module, SUPPORTED_TYPES) else None
    if tensor is None or tensor.ndim < 2:
        raise ScopeError(
            f"{qualified!r} is not a weight secateurs prunes (only the weights of "
            f"{', '.join(SUPPORTED_TYPES)} layers; never biases or norms)"
        )
    return target_of(model, module_name, param, holders)


def _prunable_weight(name: str, module: nn.Module, allow_meta: bool = False) -> torch.Tensor | None:
    """The weight secateurs would mask, or a ScopeError saying why this one cannot be."""
    where = f"module {name or '<root>'!r} ({type(module).__name__})"
    if module._parameters.get("weight") is None and not parametrize.is_parametrized(module, "weight"):
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            raise ScopeError(
                f"{where} was pruned with torch.nn.utils.prune (weight_orig/weight_mask): make that permanent "
                "with torch.nn.utils.prune.remove(module, 'weight'), then prune with secateurs"
            )
        if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            raise ScopeError(
                f"{where} uses torch.nn.utils.weight_norm, whose weight is recomputed from weight_g and weight_v "
                "at every call: remove it with torch.nn.utils.remove_weight_norm(module) before pruning"
            )
        return None
    tensor = _held(module, "weight")
    if tensor is None:
        names = [type(p).__name__ for p in module.parametrizations["weight"]]
        raise ScopeError(
            f"{where} has a weight computed from several tensors by the parametrization {names} (e.g. "
            "torch.nn.utils.parametrizations.weight_norm), which a mask cannot be folded into: remove it with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') before pruning"
        )
    if tensor.is_quantized or not tensor.is_floating_point():
        raise ScopeError(
            f"{where} has a {tensor.dtype} weight; secateurs prunes floating-point weights: prune before "
            "quantizing (or dequantize), or exclude this module from the scope"
        )
    if tensor.is_meta and not allow_meta:
        raise ScopeError(
            f"{where} has its weight on the meta device (no values to rank): load the real weights first "
            "(model.to_empty(device=...) and load_state_dict, or from_pretrained without a meta device_map)"
        )
    return tensor


def _quantized_hint(model: nn.Module) -> str:
    quantized = [n for n, m in model.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    if not quantized:
        return ""
    return (
        f" The model holds quantized modules ({', '.join(quantized[:3])}); prune the float model before quantizing it."
    )
