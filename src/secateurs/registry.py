"""One registration convention for every role: criteria, patterns, allocations, schedules, solvers,
application modes, regularizers and structural handlers.

Each role module owns one :class:`Registry` and exposes its ``register`` decorator::

    @register_criterion          # or @ALLOCATIONS.register, @SOLVERS.register ...
    class MyCriterion(Criterion):
        name = "mine"

There are no closed tables: a class registered from user code is found exactly like a built-in
one, and ``secateurs.methods()`` lists both.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from .errors import ConfigError, choices

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one role. An entry is registered under its ``name`` attribute."""

    def __init__(self, role: str, error: type[Exception] = ConfigError, base: type | None = None) -> None:
        self.role = role
        self._error = error
        #: entries must be subclasses of this (set once the base class exists)
        self.base = base
        self._entries: dict[str, T] = {}

    def register(self, entry: T | None = None, *, name: str | None = None, replace: bool = False) -> Any:
        """Register ``entry`` (usable as a bare decorator or with ``name=``). Registering a
        different entry under a taken name is refused unless ``replace=True``: a silent
        shadowing of a built-in would change what a recipe means."""

        def add(obj: T) -> T:
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise ConfigError(f"registering a {self.role} takes a {self.base.__name__} subclass, got {obj!r}")
            key = name or getattr(obj, "name", None)
            if not isinstance(key, str) or not key:
                raise ConfigError(f"registering a {self.role} needs a non-empty string `name`, got {key!r}")
            current = self._entries.get(key)
            if current is not None and current is not obj and not replace and not _same_class(current, obj):
                raise ConfigError(
                    f"{self.role} name {key!r} is already registered by {_describe(current)}; pick another name "
                    "or pass replace=True"
                )
            self._entries[key] = obj
            return obj

        return add if entry is None else add(entry)

    def get(self, key: str) -> T:
        """The entry named ``key``; a typed error listing the valid names otherwise."""
        if not isinstance(key, str):
            raise self._error(f"{self.role} names are strings; got {key!r} ({type(key).__name__})")
        try:
            return self._entries[key]
        except KeyError:
            raise self._error(f"unknown {self.role} {key!r}; valid: {choices(self._entries)}") from None

    def build(self, value: Any, options: Any, options_field: str) -> Any:
        """An instance from a registered name and its options (``options_field`` names them in messages), or
        the instance given (then options are refused: they would be silently ignored)."""
        if self.base is not None and isinstance(value, self.base):
            if options:
                raise ConfigError(f"{options_field} only apply when the {self.role} is given by name")
            return value
        return construct(self.get(value), options, f"{options_field} for {value!r}")

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def unregister(self, key: str) -> None:
        """Remove an entry (tests that register toys clean up with this)."""
        self._entries.pop(key, None)


def construct(cls: type, options: Any, what: str) -> Any:
    """``cls(**options)``, or a typed error naming the options ``cls`` takes (``what``: 'method_options for
    'wanda''): a misspelled option is a message, not a raw TypeError."""
    try:
        return cls(**dict(options or {}))
    except TypeError as exc:
        try:
            params = [p for p in inspect.signature(cls).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        except (TypeError, ValueError):
            params = []
        valid = choices(p.name for p in params) if params else "none"
        raise ConfigError(f"bad {what}: {exc}; valid: {valid}") from exc


def _same_class(a: Any, b: Any) -> bool:
    """Re-importing a module (e.g. under a test runner) re-creates its classes: same qualified name."""
    if not (isinstance(a, type) and isinstance(b, type)):
        return False
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return repr(obj)


def summary_of(obj: Any) -> str:
    """The first line of an entry's docstring: what ``secateurs methods`` prints."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""
