"""One strict parser for every configuration: declared fields, checked once, stored as given.

A configuration is a frozen dataclass deriving from :class:`Spec`. Each field declares its
constraint next to its default (``option(0.5, check=fraction())``); :meth:`Spec.__post_init__`
runs every check before anything else, so a wrong type or value anywhere (API, recipe file,
CLI) gets the same typed message naming the field, the value and what is allowed.
Fields keep exactly what the user gave (scikit-learn's rule); resolved views live beside
them in fields ending in ``_`` (``criterion_``, ``sparsity_``) and are never written back.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, field, fields
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RecipeError, choices, refuse_unknown

if TYPE_CHECKING:
    from typing_extensions import Self

#: ``check(qualified_name, value)`` raises :class:`ConfigError` when the value is not allowed.
Check = Callable[[str, Any], None]


def option(default: Any = MISSING, *, check: Check | None = None, factory: Any = MISSING) -> Any:
    """A configuration field with its constraint."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def resolved() -> Any:
    """A resolved view: filled by ``__post_init__``, not an argument, not compared, not printed."""
    return field(init=False, repr=False, compare=False)


def _refuse(name: str, value: Any, what: str, hint: str = "") -> None:
    plain = isinstance(value, (str, int, float, bool, type(None)))
    shown = f"{value!r}" if plain else f"{value!r} ({type(value).__name__})"
    raise ConfigError(f"{name} must be {what}, got {shown}{hint}")


def is_integer(value: Any) -> bool:
    """An int (numpy ints included), never a bool or a float that happens to be whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_number(value: Any) -> bool:
    """A real number (numpy scalars included), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def integer(minimum: int | None = None, optional: bool = False, what: str | None = None) -> Check:
    description = what or ("a positive integer" if minimum == 1 else "an integer" if minimum is None
                           else f"an integer >= {minimum}")  # fmt: skip

    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not is_integer(value) or (minimum is not None and value < minimum):
            _refuse(name, value, description)

    return check


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
    optional: bool = False, hint: str = "",
) -> Check:  # fmt: skip
    """A real number in an interval, e.g. ``number(0, 1, high_open=True)`` for ``[0, 1)``."""
    if low is None and high is None:
        what = "a number"
    else:
        left = ("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}")
        right = ("inf" if high is None else f"{high:g}") + (")" if high_open else "]")
        what = f"a number in {left}, {right}"

    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        ok = is_number(value) and value == value  # NaN is not in any interval
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            _refuse(name, value, what, hint)

    return check


def fraction(optional: bool = True, hint: str = "") -> Check:
    """A sparsity: a number in [0, 1)."""
    return number(0.0, 1.0, high_open=True, optional=optional, hint=hint)


def one_of(values: Sequence[Any], optional: bool = False) -> Check:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, (str, bool, int, type(None))) or value not in values:
            _refuse(name, value, f"one of {choices(str(v) for v in values)}")

    return check


def boolean(optional: bool = False) -> Check:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, bool):
            _refuse(name, value, "True or False")

    return check


def string(optional: bool = False, what: str = "a string") -> Check:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value:
            _refuse(name, value, what)

    return check


def mapping(optional: bool = True, keys: str = "strings") -> Check:
    """A mapping with string keys (options dicts)."""

    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            _refuse(name, value, f"a mapping of {keys} to values")

    return check


def strings(optional: bool = False) -> Check:
    """One string or a sequence of strings (globs)."""

    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, str):
            return
        if (
            isinstance(value, (Mapping, bytes))
            or not isinstance(value, Sequence)
            or not all(isinstance(v, str) for v in value)
        ):
            _refuse(name, value, "a string or a list of strings")

    return check


def either(*checks: Check, what: str) -> Check:
    """The value passes at least one of ``checks``."""

    def check(name: str, value: Any) -> None:
        for c in checks:
            try:
                c(name, value)
                return
            except ConfigError:
                continue
        _refuse(name, value, what)

    return check


def instance(types: type | tuple[type, ...], what: str, optional: bool = False) -> Check:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, types):
            _refuse(name, value, what)

    return check


def anything(name: str, value: Any) -> None:
    """No constraint at this stage (the field is checked where it is resolved)."""


class Spec:
    """Base class of every configuration (a frozen dataclass).

    Subclasses declare fields with :func:`option` and resolved views with :func:`resolved`,
    and put cross-field checks and resolution in ``_resolve()``.
    """

    #: prefix of field names in messages (``'structural.'`` for nested options)
    _prefix: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check") if f.init else None
            if check is not None:
                check(f"{self._prefix}{f.name}", getattr(self, f.name))
        self._resolve()

    def _resolve(self) -> None:
        """Cross-field checks and resolved views (override)."""

    def _set(self, name: str, value: Any) -> None:
        """Write a resolved view of this frozen instance (never a given field)."""
        object.__setattr__(self, name, value)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> Self:
        """Strict: unknown keys are an error naming them and listing the valid ones."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a mapping of keys to values, got {type(data).__name__}")
        unknown = [k for k in data if k not in cls.field_names()]
        if unknown:
            raise RecipeError(
                f"{source} has unknown key(s) {sorted(map(str, unknown))}; valid keys: {choices(cls.field_names())}"
            )
        try:
            return cls(**data)
        except RecipeError:
            raise
        except ConfigError as exc:
            raise RecipeError(f"{source}: {exc}") from exc

    @classmethod
    def check_keywords(cls, given: Mapping[str, Any], where: str, extra: Sequence[str] = ()) -> None:
        """Refuse unknown keyword arguments of a front door (the fields, plus the call's own ``extra``
        keywords) with the closest valid one and all of them, not a raw TypeError."""
        refuse_unknown(given, [*cls.field_names(), *extra], where)

    def given(self) -> dict[str, Any]:
        """The fields exactly as the user gave them (defaults included)."""
        return {name: getattr(self, name) for name in self.field_names()}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a valid recipe) that rebuilds this configuration. Override to resolve."""
        return self.given()

    def fingerprint(self) -> str:
        """A short stable hash naming this configuration (OpenLTH-style)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def spec_from(cls: type[Spec], value: Mapping[str, Any], name: str) -> Any:
    """An instance of ``cls`` from a mapping of its fields (the ``name`` option of a configuration)."""
    unknown = [k for k in value if k not in cls.field_names()]
    if unknown:
        raise ConfigError(f"unknown {name} option(s) {sorted(map(str, unknown))}; valid: {choices(cls.field_names())}")
    return cls(**value)
