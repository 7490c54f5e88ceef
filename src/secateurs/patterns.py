"""Patterns: how a weight is cut into units, and which units compete.

A pattern maps a canonical ``(out, spatial, in)`` tensor of element scores to a
``(groups, units)`` matrix: selection keeps the highest-scoring units *within each
row* (a comparison group), and the pattern maps the unit mask back to elements.

- element: every weight is a unit;
- block(h, w): h output rows x w input columns, at each kernel position;
- N:M: at most N of every M consecutive input weights survive
  (Mishra et al. 2021, arXiv:2104.08378); each M-chunk is its own comparison group;
- output_channel (neuron / filter) and input_channel.

``comparison="row"`` compares units only within the same output row, as Wanda
does (Sun et al. 2023, arXiv:2306.11695).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .errors import PatternError, choices
from .registry import Registry

COMPARISONS = ("layer", "row")
REDUCTIONS = ("sum", "mean", "l2", "max")


def _reduce(x: Tensor, dims: tuple[int, ...], how: str) -> Tensor:
    if how == "sum":
        return x.sum(dim=dims)
    if how == "mean":
        return x.mean(dim=dims)
    if how == "l2":
        return x.square().sum(dim=dims).sqrt()
    if how == "max":
        return x.amax(dim=dims)
    raise PatternError(f"unknown reduction {how!r}; valid: {choices(REDUCTIONS)}")


class Pattern(ABC):
    """Granularity of pruning. Subclasses override the three shape maps (and :meth:`parse` for
    parametrised names such as ``'2:4'``)."""

    name: ClassVar[str]
    #: other names the pattern answers to
    aliases: ClassVar[tuple[str, ...]] = ()
    #: how to write a parametrised name in messages (None: the name itself)
    syntax: ClassVar[str | None] = None
    #: density the pattern imposes by itself (N:M), or None when sparsity is free.
    fixed_density: ClassVar[float | None] = None

    @classmethod
    def parse(cls, text: str) -> Pattern | None:
        """This pattern from its name (lower-case, stripped), or None if ``text`` names another."""
        return cls() if text in (cls.name, *cls.aliases) else None

    def check(self, target_name: str, shape3: tuple[int, int, int], comparison: str) -> None:
        """Raise :class:`PatternError` if this pattern cannot cut a weight of this shape."""
        if comparison not in COMPARISONS:
            raise PatternError(f"unknown comparison {comparison!r}; valid: {choices(COMPARISONS)}")

    @abstractmethod
    def units(self, scores3: Tensor, comparison: str, reduction: str = "sum") -> Tensor:
        """Element scores ``(O, S, I)`` to unit scores ``(groups, units)``."""

    @abstractmethod
    def expand(self, unit_mask: Tensor, shape3: tuple[int, int, int], comparison: str) -> Tensor:
        """Unit mask ``(groups, units)`` back to an element mask ``(O, S, I)``."""

    @abstractmethod
    def unit_numel(self, shape3: tuple[int, int, int]) -> int:
        """Elements per unit (used to weigh units in global allocation)."""

    def units_to_prune(self, units_per_group: int, sparsity: float) -> int:
        """How many units each comparison group loses at ``sparsity`` (rounded to nearest)."""
        return round(sparsity * units_per_group)

    def is_valid(self, mask3: Tensor) -> bool:
        """Does an element mask follow this pattern? (Reports check this.)"""
        return True

    def __repr__(self) -> str:
        return self.spec()

    def spec(self) -> str:
        """The string that :func:`parse_pattern` turns back into this pattern."""
        return self.name


PATTERNS: Registry[type[Pattern]] = Registry("pattern", PatternError, base=Pattern)


@PATTERNS.register
@dataclass(frozen=True, repr=False)
class Element(Pattern):
    """Every weight is a unit (unstructured)."""

    name: ClassVar[str] = "element"
    aliases: ClassVar[tuple[str, ...]] = ("unstructured",)

    def units(self, scores3: Tensor, comparison: str, reduction: str = "sum") -> Tensor:
        if comparison == "row":
            return scores3.reshape(scores3.shape[0], -1)
        return scores3.reshape(1, -1)

    def expand(self, unit_mask: Tensor, shape3: tuple[int, int, int], comparison: str) -> Tensor:
        return unit_mask.reshape(shape3)

    def unit_numel(self, shape3: tuple[int, int, int]) -> int:
        return 1


_BLOCK = re.compile(r"^\s*block\s*[:=]?\s*(\d+)\s*[x,]\s*(\d+)\s*$")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@PATTERNS.register
@dataclass(frozen=True, repr=False)
class Block(Pattern):
    """h output rows x w input columns, at each kernel position (``'block:4x4'``)."""

    height: int
    width: int
    name: ClassVar[str] = "block"
    syntax: ClassVar[str | None] = "block:HxW (e.g. 'block:4x4')"

    @classmethod
    def parse(cls, text: str) -> Pattern | None:
        match = _BLOCK.match(text)
        return cls(int(match[1]), int(match[2])) if match else None

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise PatternError(f"block size must be positive, got {self.height}x{self.width}")

    def check(self, target_name: str, shape3: tuple[int, int, int], comparison: str) -> None:
        super().check(target_name, shape3, comparison)
        out, _, inp = shape3
        if out % self.height or inp % self.width:
            raise PatternError(
                f"block {self.height}x{self.width} does not tile {target_name}: it has {out} output "
                f"rows and {inp} input columns; choose a block whose height divides {out} and whose "
                f"width divides {inp}, or exclude {target_name.rsplit('.', 1)[0]!r} from the scope"
            )

    def _blocks(self, tensor3: Tensor) -> Tensor:
        out, spatial, inp = tensor3.shape
        return tensor3.reshape(out // self.height, self.height, spatial, inp // self.width, self.width)

    def units(self, scores3: Tensor, comparison: str, reduction: str = "sum") -> Tensor:
        blocks = _reduce(self._blocks(scores3), (1, 4), reduction)
        if comparison == "row":
            return blocks.reshape(blocks.shape[0], -1)
        return blocks.reshape(1, -1)

    def expand(self, unit_mask: Tensor, shape3: tuple[int, int, int], comparison: str) -> Tensor:
        out, spatial, inp = shape3
        grid = unit_mask.reshape(out // self.height, spatial, inp // self.width)
        return grid.repeat_interleave(self.height, 0).repeat_interleave(self.width, 2)

    def unit_numel(self, shape3: tuple[int, int, int]) -> int:
        return self.height * self.width

    def is_valid(self, mask3: Tensor) -> bool:
        blocks = self._blocks(mask3.to(torch.int8))
        total = blocks.sum(dim=(1, 4))
        return bool(((total == 0) | (total == self.height * self.width)).all())

    def spec(self) -> str:
        return f"block:{self.height}x{self.width}"


@PATTERNS.register
@dataclass(frozen=True, repr=False)
class NM(Pattern):
    """Keep at most ``n`` of every ``m`` consecutive weights along the input dimension (``'2:4'``)."""

    n: int
    m: int
    name: ClassVar[str] = "n:m"
    syntax: ClassVar[str | None] = "n:m (e.g. '2:4')"

    @classmethod
    def parse(cls, text: str) -> Pattern | None:
        match = _NM.match(text)
        return cls(int(match[1]), int(match[2])) if match else None

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise PatternError(f"N:M needs 0 < N < M, got {self.n}:{self.m}; e.g. 2:4 keeps 2 of every 4 weights")

    @property
    def density(self) -> float:
        return self.n / self.m

    def check(self, target_name: str, shape3: tuple[int, int, int], comparison: str) -> None:
        super().check(target_name, shape3, comparison)
        inp = shape3[2]
        if inp % self.m:
            raise PatternError(
                f"N:M {self.n}:{self.m} needs the input dimension of {target_name} to be divisible "
                f"by {self.m}, but it is {inp}; exclude {target_name.rsplit('.', 1)[0]!r} from the "
                f"scope or pick M dividing {inp}"
            )

    def units(self, scores3: Tensor, comparison: str, reduction: str = "sum") -> Tensor:
        return scores3.reshape(-1, self.m)

    def expand(self, unit_mask: Tensor, shape3: tuple[int, int, int], comparison: str) -> Tensor:
        return unit_mask.reshape(shape3)

    def unit_numel(self, shape3: tuple[int, int, int]) -> int:
        return 1

    def units_to_prune(self, units_per_group: int, sparsity: float) -> int:
        return self.m - self.n

    def is_valid(self, mask3: Tensor) -> bool:
        return bool((mask3.reshape(-1, self.m).sum(dim=1) <= self.n).all())

    def spec(self) -> str:
        return f"{self.n}:{self.m}"


@PATTERNS.register
@dataclass(frozen=True, repr=False)
class OutputChannel(Pattern):
    """Whole output rows: neurons of a Linear, filters of a Conv."""

    name: ClassVar[str] = "output_channel"
    aliases: ClassVar[tuple[str, ...]] = ("channel", "neuron", "filter")

    def check(self, target_name: str, shape3: tuple[int, int, int], comparison: str) -> None:
        super().check(target_name, shape3, comparison)
        if comparison == "row":
            raise PatternError(
                f"output_channel units are whole rows, so comparison='row' is meaningless for "
                f"{target_name}; use comparison='layer'"
            )

    def units(self, scores3: Tensor, comparison: str, reduction: str = "sum") -> Tensor:
        return _reduce(scores3, (1, 2), reduction).reshape(1, -1)

    def expand(self, unit_mask: Tensor, shape3: tuple[int, int, int], comparison: str) -> Tensor:
        return unit_mask.reshape(-1, 1, 1).expand(shape3)

    def unit_numel(self, shape3: tuple[int, int, int]) -> int:
        return shape3[1] * shape3[2]

    def is_valid(self, mask3: Tensor) -> bool:
        rows = mask3.reshape(mask3.shape[0], -1)
        return bool((rows.all(dim=1) | ~rows.any(dim=1)).all())


@PATTERNS.register
@dataclass(frozen=True, repr=False)
class InputChannel(Pattern):
    """Whole input columns (all kernel positions of one input channel)."""

    name: ClassVar[str] = "input_channel"

    def check(self, target_name: str, shape3: tuple[int, int, int], comparison: str) -> None:
        super().check(target_name, shape3, comparison)
        if comparison == "row":
            raise PatternError(
                f"input_channel units span every row, so comparison='row' is meaningless for "
                f"{target_name}; use comparison='layer'"
            )

    def units(self, scores3: Tensor, comparison: str, reduction: str = "sum") -> Tensor:
        return _reduce(scores3, (0, 1), reduction).reshape(1, -1)

    def expand(self, unit_mask: Tensor, shape3: tuple[int, int, int], comparison: str) -> Tensor:
        return unit_mask.reshape(1, 1, -1).expand(shape3)

    def unit_numel(self, shape3: tuple[int, int, int]) -> int:
        return shape3[0] * shape3[1]

    def is_valid(self, mask3: Tensor) -> bool:
        cols = mask3.transpose(0, 2).reshape(mask3.shape[2], -1)
        return bool((cols.all(dim=1) | ~cols.any(dim=1)).all())


def pattern_names() -> list[str]:
    """What :func:`parse_pattern` accepts, for messages."""
    names = []
    for name, cls in PATTERNS.items():
        names += [cls.syntax or name, *cls.aliases]
    return names


def parse_pattern(value: Pattern | str | dict | None) -> Pattern:
    """``'element'``, ``'2:4'``, ``'block:4x4'``, ``{'block': [4, 4]}``, ``'channel'`` ... to a Pattern."""
    if value is None:
        return Element()
    if isinstance(value, Pattern):
        return value
    if isinstance(value, dict):
        sizes = value.get("block") if set(value) == {"block"} else [value.get("n"), value.get("m")]
        integers = isinstance(sizes, (list, tuple)) and all(type(v) is int for v in sizes)
        if set(value) in ({"block"}, {"n", "m"}) and integers and len(sizes) == 2:
            return Block(*sizes) if "block" in value else NM(*sizes)
        raise PatternError(f"cannot read pattern {value!r}; use {{'block': [h, w]}} or {{'n': 2, 'm': 4}} (integers)")
    if isinstance(value, str):
        key = value.strip().lower()
        for _, cls in PATTERNS.items():
            found = cls.parse(key)
            if found is not None:
                return found
    raise PatternError(f"unknown pattern {value!r}; valid: {', '.join(pattern_names())}")
