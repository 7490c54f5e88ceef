"""Schedules: when to prune, and to what overall sparsity.

A schedule is consulted after each training step ``t`` (0-based: ``t`` steps of the
user's optimizer are done plus this one) and answers with the sparsity to prune to
now, or None. Training between pruning steps is the user's loop; see
:class:`secateurs.Pruner`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from .errors import ConfigError, choices
from .registry import Registry

SCHEDULES: Registry[type[Schedule]] = Registry("schedule kind")


class Schedule(ABC):
    kind: ClassVar[str]
    #: step after which weights are snapshotted for rewinding (lottery tickets), or None
    rewind_step: int | None = None

    @abstractmethod
    def sparsity_at(self, step: int, final: float) -> float | None:
        """Overall sparsity to reach after training step ``step``, or None to leave the mask alone."""

    @property
    @abstractmethod
    def last_step(self) -> int:
        """The last step at which this schedule prunes."""

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


def _check_steps(start: int, end: int, every: int) -> None:
    if start < 0 or every < 1 or end < start or (end - start) % every:
        raise ConfigError(
            f"schedule needs 0 <= start <= end, every >= 1 and (end - start) divisible by every; "
            f"got start={start}, end={end}, every={every}"
        )


@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune once, straight to the final sparsity."""

    at: int = 0
    kind: ClassVar[str] = "oneshot"

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if step == self.at else None

    @property
    def last_step(self) -> int:
        return self.at


@dataclass(frozen=True)
class Linear(Schedule):
    """Sparsity rises linearly from ``initial`` at ``start`` to the final value at ``end``."""

    start: int
    end: int
    every: int = 1
    initial: float = 0.0
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _check_steps(self.start, self.end, self.every)

    def _fraction(self, step: int) -> float | None:
        if step < self.start or step > self.end or (step - self.start) % self.every:
            return None
        return 1.0 if self.end == self.start else (step - self.start) / (self.end - self.start)

    def sparsity_at(self, step: int, final: float) -> float | None:
        fraction = self._fraction(step)
        return None if fraction is None else self.initial + (final - self.initial) * fraction

    @property
    def last_step(self) -> int:
        return self.end


@dataclass(frozen=True)
class Cubic(Linear):
    """Gradual magnitude pruning (Zhu & Gupta 2017, arXiv:1710.01878, eq. 1):
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` at ``t = t0, t0 + dt, ..., t0 + n*dt``.
    Prunes fast early, while redundancy is high, and slowly near the end."""

    kind: ClassVar[str] = "cubic"

    def sparsity_at(self, step: int, final: float) -> float | None:
        fraction = self._fraction(step)
        return None if fraction is None else final + (self.initial - final) * (1.0 - fraction) ** 3


@dataclass(frozen=True)
class Exponential(Schedule):
    """Density shrinks geometrically: after round k of n, density = final_density**(k/n).
    SynFlow uses 100 rounds with no training between (Tanaka et al. 2020, arXiv:2006.05467)."""

    iterations: int = 100
    every: int = 1
    start: int = 0
    kind: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.every < 1 or self.start < 0:
            raise ConfigError(f"exponential schedule needs iterations >= 1, every >= 1, start >= 0; got {self}")

    def sparsity_at(self, step: int, final: float) -> float | None:
        offset = step - self.start
        if offset < 0 or offset % self.every or offset // self.every >= self.iterations:
            return None
        return exponential_sparsity(offset // self.every + 1, self.iterations, final)

    @property
    def last_step(self) -> int:
        return self.start + (self.iterations - 1) * self.every


def exponential_sparsity(k: int, n: int, final: float) -> float:
    """Sparsity after round ``k`` of ``n`` when each round keeps the same fraction."""
    return 1.0 - (1.0 - final) ** (k / n)


@dataclass(frozen=True)
class LotteryTicket(Schedule):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019, arXiv:1803.03635;
    Frankle et al. 2020, arXiv:1912.05671). Train ``steps_per_round`` steps, prune so the
    density shrinks by the same factor each round, rewind the surviving weights to their
    values after ``rewind_step`` steps (0: initialisation), and train again. After the last
    round the ticket trains once more: ``(rounds + 1) * steps_per_round`` steps in all."""

    rounds: int
    steps_per_round: int
    rewind_to: int = 0
    kind: ClassVar[str] = "lottery"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.steps_per_round < 1:
            raise ConfigError(f"lottery schedule needs rounds >= 1 and steps_per_round >= 1; got {self}")
        if not 0 <= self.rewind_to < self.steps_per_round:
            raise ConfigError(
                f"rewind_to={self.rewind_to} must be in [0, steps_per_round={self.steps_per_round}): "
                "weights are rewound to a point inside the first round"
            )

    @property
    def rewind_step(self) -> int:  # type: ignore[override]
        return self.rewind_to

    def sparsity_at(self, step: int, final: float) -> float | None:
        done = step + 1
        if done % self.steps_per_round or not 1 <= done // self.steps_per_round <= self.rounds:
            return None
        return exponential_sparsity(done // self.steps_per_round, self.rounds, final)

    @property
    def last_step(self) -> int:
        return self.rounds * self.steps_per_round - 1


SCHEDULES.base = Schedule
for _cls in (OneShot, Linear, Cubic, Exponential, LotteryTicket):
    SCHEDULES.register(_cls, name=_cls.kind)


def register_schedule(cls: type[Schedule]) -> type[Schedule]:
    """Class decorator: make a schedule available by its ``kind`` (``schedule={'kind': ...}``)."""
    return SCHEDULES.register(cls, name=cls.kind)


def make_schedule(value: Schedule | Mapping[str, Any] | str | None) -> Schedule:
    """A schedule from an instance, a kind name, or ``{'kind': ..., **fields}`` (recipes)."""
    if value is None:
        return OneShot()
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping) or "kind" not in value:
        raise ConfigError(f"a schedule is a dict with a 'kind' ({choices(SCHEDULES)}), got {value!r}")
    kind = value["kind"]
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule kind {kind!r}; valid: {choices(SCHEDULES)}")
    cls = SCHEDULES.get(kind)
    valid = {f.name for f in fields(cls)}
    unknown = set(value) - valid - {"kind"}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} for schedule {kind!r}; valid: {choices(valid)}")
    try:
        return cls(**{k: v for k, v in value.items() if k != "kind"})
    except TypeError as exc:
        raise ConfigError(f"schedule {kind!r}: {exc}") from exc
