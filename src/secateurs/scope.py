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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ScopeError, choices
from .layout import Layout, canonical_shape, hf_conv1d_class, layout_of

DEFAULT_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")
SUPPORTED_TYPES: tuple[str, ...] = (*DEFAULT_TYPES, "Embedding")


@dataclass(frozen=True)
class ScopeSpec:
    """What to prune. Names are module qualified names (``features.3``); patterns are
    shell globs, or regular expressions (searched) when prefixed with ``re:``."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = DEFAULT_TYPES
    skip_first: bool = True
    skip_last: bool = True
    embeddings: bool = False

    def __post_init__(self) -> None:
        for key in ("include", "exclude", "types"):
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
            else:
                object.__setattr__(self, key, tuple(value))
        unknown = [t for t in self.types if t not in SUPPORTED_TYPES]
        if unknown:
            raise ScopeError(f"scope.types has unknown module type(s) {unknown}; supported: {choices(SUPPORTED_TYPES)}")
        for pattern in (*self.include, *self.exclude):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ScopeError(f"scope pattern {pattern!r} is not a valid regex: {exc}") from exc

    @classmethod
    def from_value(cls, value: ScopeSpec | dict | Sequence[str] | str | None) -> ScopeSpec:
        """Accept a spec, a dict of its fields, or a list of include patterns."""
        if value is None:
            return cls()
        if isinstance(value, ScopeSpec):
            return value
        if isinstance(value, str):
            return cls(include=(value,))
        if isinstance(value, dict):
            valid = set(cls.__dataclass_fields__)
            unknown = set(value) - valid
            if unknown:
                raise ScopeError(f"unknown scope key(s) {sorted(unknown)}; valid: {choices(valid)}")
            return cls(**value)
        return cls(include=tuple(value))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable weight: ``module_name.weight`` with its layout."""

    module_name: str
    module: nn.Module = field(repr=False)
    layout: Layout
    param_name: str = "weight"

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def parameter(self) -> nn.Parameter:
        """The trainable tensor (the original under a mask parametrization)."""
        parametrizations = getattr(self.module, "parametrizations", None)
        if parametrizations is not None and self.param_name in parametrizations:
            return parametrizations[self.param_name].original
        return getattr(self.module, self.param_name)

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


def _matches_one(name: str, pattern: str) -> bool:
    return bool(re.search(pattern[3:], name)) if pattern.startswith("re:") else fnmatch.fnmatchcase(name, pattern)


def _ancestry(name: str) -> list[str]:
    """``'classifier.0'`` -> ``['classifier', 'classifier.0']``: the module and every module holding it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern that matches a module matches everything inside it: ``exclude=['classifier']`` leaves
    the layers of an ``nn.Sequential`` named ``classifier`` alone too, as a reader would expect."""
    return any(_matches_one(prefix, p) for prefix in _ancestry(name) for p in patterns)


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


def resolve(model: nn.Module, spec: ScopeSpec) -> list[Target]:
    """Turn a spec into targets, in module order, each parameter once (tied weights)."""
    types = tuple(spec.types) + (("Embedding",) if spec.embeddings else ())
    refuse_unmatched(spec, [n for n, _ in model.named_modules() if n], type(model).__name__)
    first_conv, last_layer = _edge_layers(model)
    skipped = set()
    if spec.skip_first and first_conv is not None:
        skipped.add(first_conv)
    if spec.skip_last and last_layer is not None:
        skipped.add(last_layer)

    targets: list[Target] = []
    seen: set[int] = set()
    typed = 0
    for name, module in model.named_modules():
        if not _type_ok(module, types):
            continue
        typed += 1
        if name in skipped or not _matches(name, spec.include) or _matches(name, spec.exclude):
            continue
        target = Target(name, module, layout_of(module))
        if not isinstance(target.parameter, torch.Tensor) or target.parameter.ndim < 2:
            continue
        if id(target.parameter) in seen:
            continue
        seen.add(id(target.parameter))
        targets.append(target)

    if not targets:
        raise ScopeError(
            f"scope matches no weight: include={list(spec.include)}, exclude={list(spec.exclude)}, "
            f"types={list(types)} ({typed} module(s) of those types; skipped as first conv / "
            f"classifier: {sorted(skipped) or 'none'}). Check the names with "
            "`[n for n, _ in model.named_modules()]`, or set skip_first/skip_last to False."
        )
    return targets
