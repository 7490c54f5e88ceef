"""SPDY-style allocation search: a database of pruned blocks, the exact knapsack, and a search over the
blocks' sensitivity coefficients scored by the calibration loss of the assembled model.

Why: a profile that measures each block alone (:mod:`.cells`) makes the knapsack assume the blocks'
damages add up. On ``pydoc-llama-12m`` at 70% that assumption picked allocations worse than uniform
(each block alone at 90% costs little; all of them pruned together do not). SPDY (Frantar &
Alistarh, ICML 2022, arXiv:2201.13096, sections 3.2-3.4) keeps the exact dynamic programme but does
not trust its damages: block ``b`` at sparsity ``s`` costs ``c_b * e_b(s)``, where ``e_b`` is a
measured error curve and ``c_b`` a coefficient; a local search over the coefficients maps each
candidate through the knapsack to one sparsity per block, assembles that model from a *database* of
blocks already pruned at every grid sparsity, and scores it end to end by its loss on calibration
batches. Only the calibration data is read.

The database follows the sequential block runner: block ``b`` is pruned at every grid sparsity on the
inputs the runner would give it (the outputs of the blocks before it, pruned at the target
sparsity), and ``e_b(s)`` is its relative reconstruction error on those inputs. Finally the best few
candidates are pruned for real by the block runner and the one of least calibration loss is kept.
The result is a :class:`SensitivityProfile` (damages ``c_b * e_b(s)``) that ``allocation='sensitivity'``
turns back into the very allocation the search chose.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import prune
from ..batches import default_loss, take
from ..blocks import block_owners, capture_inputs, find_blocks
from ..config import PruneConfig
from ..errors import ConfigError
from ..pipeline import Data
from ..progress import progress as progress_bar
from ..runners.blocks import block_targets, propagate, prune_block_alone
from ..trials import trial
from .budget import solve_budget
from .cells import _plain
from .profile import Cell, Entry, SensitivityProfile


@dataclass
class Database:
    """Per block: its entry, its target weights at dense (0.0) and every grid sparsity, and its local error."""

    entries: list[Entry]
    grid: list[float]  # the pruned options, without dense
    weights: list[dict[float, dict[str, torch.Tensor]]]  # block -> sparsity -> weight name -> tensor
    errors: list[dict[float, float]]  # block -> sparsity -> relative reconstruction error
    targets: list[list[Any]] = field(default_factory=list, repr=False)  # block -> its Targets (live modules)
    seconds: float = 0.0


@dataclass
class SearchResult:
    """What :func:`spdy_search` chose, and the evidence: pass ``profile`` to ``allocation='sensitivity'``."""

    profile: SensitivityProfile
    sparsities: dict[str, float]  # block -> sparsity of the chosen allocation
    coefficients: dict[str, float]
    loss: float  # calibration loss of the chosen allocation, pruned for real by the block runner
    uniform_loss: float  # the same for uniform sparsity (for reference; the search does not favour it)
    history: list[dict[str, Any]] = field(default_factory=list)  # every distinct assembled candidate
    seconds: dict[str, float] = field(default_factory=dict)


def default_grid(sparsity: float, step: float = 0.05, span: int = 4) -> list[float]:
    """``sparsity +- span * step`` in steps of ``step``, inside (0, 1)."""
    points = {round(sparsity + k * step, 9) for k in range(-span, span + 1)}
    return sorted(s for s in points if 0.0 < s < 1.0)


def _checked_grid(grid: Iterable[float] | None, sparsity: float) -> list[float]:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise ConfigError(f"spdy_search needs a sparsity in (0, 1), got {sparsity!r}")
    points = default_grid(sparsity) if grid is None else list(grid)
    if not points:
        raise ConfigError("spdy_search needs a non-empty grid of sparsities, e.g. grid=(0.6, 0.65, 0.7, 0.75, 0.8)")
    for s in points:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
            raise ConfigError(f"sparsity {s!r} in the grid is outside (0, 1); dense is always an option")
    return sorted({round(float(s), 9) for s in points} | {round(float(sparsity), 9)})  # the target: the reference


GRANULARITIES = ("blocks", "layers")


def build_database(
    model: nn.Module,
    batches: Sequence[Any],
    method: str,
    grid: Sequence[float],
    reference: float,
    options: dict,
    granularity: str = "blocks",
) -> Database:
    """Prune every block at every grid sparsity on the inputs the sequential runner would give it (the blocks
    before it pruned at ``reference``); the model is restored exactly afterwards.

    ``granularity='layers'`` makes every weight tensor its own option list: the block runner prunes a block's
    layers from one pass of the block's inputs, so a layer pruned with its whole block at ``s`` is the layer
    pruned alone at ``s``. Its error is ``tr(dW G dW^T) / tr(W G W^T)`` with ``G`` its inputs' Gram matrix."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    start = time.perf_counter()
    container, blocks, scoped, _ = block_targets(model, _config(method, reference, options))
    owner = block_owners(blocks)
    mine: list[list[Any]] = [[] for _ in blocks]
    for t in scoped:
        mine[owner[id(t.module)]].append(t)
    if granularity == "layers":
        odd = [t.name for t in scoped if not isinstance(t.module, nn.Linear) or t.param_name != "weight"]
        if odd:
            raise ConfigError(f"granularity='layers' scores linear weights; {odd[0]!r} is not one (use 'blocks')")
    groups = [[t] for ts in mine for t in ts] if granularity == "layers" else [ts for ts in mine if ts]
    entries = [
        Entry(g[0].module_name if granularity == "layers" else f"{container}.{owner[id(g[0].module)]}".lstrip("."),
              "layer" if granularity == "layers" else "block", {t.name: list(t.shape) for t in g},
              sum(t.numel for t in g))
        for g in groups
    ]  # fmt: skip
    weights: dict[int, dict[float, dict[str, torch.Tensor]]] = {}
    errors: dict[int, dict[float, float]] = {}
    index = {t.name: k for k, g in enumerate(groups) for t in g}
    was_training = model.training
    model.eval()
    try:
        with trial(model):
            inputs = capture_inputs(model, blocks, list(batches))
            for i, block in enumerate(blocks):
                if mine[i]:
                    found, block_errors = _block_options(model, i, inputs, mine[i], grid, method, options, batches,
                                                         granularity == "layers")  # fmt: skip
                    for k in dict.fromkeys(index[t.name] for t in mine[i]):
                        names = {t.name for t in groups[k]}
                        weights[k] = {g: {n: w for n, w in ws.items() if n in names} for g, ws in found.items()}
                        errors[k] = block_errors[groups[k][0].name if granularity == "layers" else None]
                    _load(mine[i], found[reference])  # the next block sees what the runner would give it
                propagate(block, i, inputs)
    finally:
        model.train(was_training)
    return Database(
        entries, list(grid), [weights[k] for k in range(len(groups))], [errors[k] for k in range(len(groups))],
        groups, time.perf_counter() - start,
    )  # fmt: skip


def _block_options(
    model: nn.Module, index: int, inputs: Any, targets: list[Any], grid: Sequence[float], method: str,
    options: dict, batches: Sequence[Any], layers: bool,
) -> tuple[dict[float, dict[str, torch.Tensor]], dict[str | None, dict[float, float]]]:  # fmt: skip
    """One block pruned at every grid sparsity (restored after each): its weights per sparsity, dense
    included, and the errors, of the block (key None) or of each layer (key: the weight's name)."""
    block = find_blocks(model, options.get("blocks"))[1][index]
    grams = _grams(targets) if layers else None
    with grams or contextlib.nullcontext():
        dense = _outputs(block, index, inputs)
    found = {0.0: _copy(targets)}
    errors: dict[str | None, dict[float, float]] = {key: {0.0: 0.0} for key in ([t.name for t in targets] if layers
                                                                            else [None])}  # fmt: skip
    for s in grid:
        with trial(block):
            config = _config(method, s, options)
            prune_block_alone(model, config, Data.from_user(config, batches, None, None, False, True), index, inputs)
            found[s] = _copy(targets)
            if grams is None:
                errors[None][s] = _relative_error(_outputs(block, index, inputs), dense)
            else:
                for t in targets:
                    errors[t.name][s] = grams.error(t, found[0.0][t.name], found[s][t.name])
    return found, errors


class _grams:
    """Forward hooks that add up each linear target's input Gram matrix ``sum x^T x`` (float64) while active."""

    def __init__(self, targets: Sequence[Any]) -> None:
        self.targets = list(targets)
        self.gram: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _grams:
        for t in self.targets:
            self.handles.append(t.module.register_forward_hook(self._hook(t.name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.gram[name] = self.gram.get(name, 0) + x.T @ x

        return hook

    def error(self, target: Any, dense: torch.Tensor, pruned: torch.Tensor) -> float:
        g = self.gram[target.name]
        w, delta = dense.double(), (pruned.double() - dense.double())
        return float(((delta @ g) * delta).sum()) / max(float(((w @ g) * w).sum()), 1e-300)


def _config(method: str, sparsity: float, options: dict) -> PruneConfig:
    return PruneConfig(method=method, sparsity=sparsity, runner="blocks", **options)


WRITING_MODES = ("bake", "reconstruct")


def _mode(method: str, options: dict) -> str:
    """The mode of the LLM front door: the method's own (SparseGPT reconstructs), else ``bake``. The database holds
    weights, so only the modes that write them are accepted (a mask or a removal would not be assembled)."""
    given = options.get("mode")
    if given is None:
        resolved = PruneConfig(method=method, sparsity=0.5, runner="blocks", **options).mode_
        given = "bake" if resolved == "mask" else resolved
    if given not in WRITING_MODES:
        raise ConfigError(
            f"spdy_search assembles candidates from pruned weights: mode must be one of {', '.join(WRITING_MODES)} "
            f"(default: the method's own, else 'bake'), got {given!r}"
        )
    return given


def _copy(targets: Sequence[Any]) -> dict[str, torch.Tensor]:
    return {t.name: getattr(t.module, t.param_name).detach().clone() for t in targets}


def _load(targets: Sequence[Any], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for t in targets:
            getattr(t.module, t.param_name).copy_(values[t.name])


def _outputs(block: nn.Module, index: int, inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        return [inputs.call(index, b).invoke(block, inputs.hidden[b]) for b in range(len(inputs.hidden))]


def _relative_error(outputs: Sequence[torch.Tensor], dense: Sequence[torch.Tensor]) -> float:
    error = math.fsum(float((o.double() - d.double()).pow(2).sum()) for o, d in zip(outputs, dense))
    norm = math.fsum(float(d.double().pow(2).sum()) for d in dense)
    return error / max(norm, 1e-300)


def profile_of(db: Database, coefficients: Sequence[float], model_name: str, settings: dict) -> SensitivityProfile:
    """The profile whose knapsack is the search's: block ``b`` at ``s`` damages ``c_b * e_b(s)``."""
    cells = [
        Cell(e.name, s, float(c) * db.errors[b][s])
        for b, (e, c) in enumerate(zip(db.entries, coefficients))
        for s in db.grid
    ]
    numel = sum(e.numel for e in db.entries)
    return SensitivityProfile(
        model_name, "spdy_damage", False, 0.0, list(db.grid), list(db.entries), cells, {"params": numel}, settings
    )


def _allocation(db: Database, coefficients: Sequence[float], sparsity: float) -> tuple[float, ...]:
    profile = profile_of(db, coefficients, "", {})
    allocated = solve_budget(profile, "sparsity", sparsity)
    return tuple(round(allocated.sparsities[e.name], 9) for e in db.entries)


def _loss(model: nn.Module, evaluation: Sequence[Any], loss_fn: Callable | None) -> float:
    loss_fn = loss_fn or default_loss
    with torch.no_grad():
        losses = [float(loss_fn(model, batch)) for batch in evaluation]
    value = math.fsum(losses) / len(losses)
    if not math.isfinite(value):
        raise ConfigError(f"the calibration loss of an assembled candidate is {value}; check loss_fn and the batches")
    return value


def _assembled_loss(model, db, targets, allocation, evaluation, loss_fn) -> float:
    """The loss of the model with each block's weights taken from the database (inside the caller's trial)."""
    for b, s in enumerate(allocation):
        nearest = min(db.weights[b], key=lambda g: abs(g - s))  # off-grid only when the remainder is handed back
        _load(targets[b], db.weights[b][nearest])
    return _loss(model, evaluation, loss_fn)


def spdy_search(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    method: str,
    sparsity: float,
    evaluation: Iterable[Any] | None = None,
    grid: Iterable[float] | None = None,
    evaluations: int = 60,
    steps: int = 2000,
    verify: int = 3,
    sigma: float = 0.5,
    granularity: str = "blocks",
    seed: int = 0,
    loss_fn: Callable | None = None,
    progress: bool = True,
    **options: Any,
) -> SearchResult:
    """Search per-block sparsities averaging ``sparsity`` that minimise the calibration loss (SPDY).

    Args:
        calibration: the batches every prune reads (the same ones the final run will read).
        method: the pruning method (``wanda``, ``sparsegpt``, ``magnitude`` ...), unstructured or N:M
            patterns as ``pattern=`` in ``options``; the block runner prunes in the method's own mode as
            ``prune_llm`` does (SparseGPT reconstructs), else ``'bake'``.
        evaluation: the batches the candidates are scored on (calibration data, never the test set);
            default: ``calibration``.
        grid: the sparsities each block may take (dense is always one); default ``sparsity +- 0.2`` in
            steps of 0.05. The target sparsity is added: it is the reference the database is built on.
        evaluations: distinct assembled candidates scored; steps: local-search steps at most (each is a
            knapsack solve; a step that lands on a scored allocation costs no forward pass).
        verify: the best candidates then pruned for real by the block runner, the best of them kept.
        sigma: the spread of the log-normal factor a mutated coefficient is multiplied by.
        granularity: ``'blocks'`` (one sparsity per block) or ``'layers'`` (one per weight tensor).
        options: other :func:`secateurs.prune` options (``scope``, ``pattern``, ``blocks``, ``method_options``).

    Returns a :class:`SearchResult` whose ``profile`` reproduces the chosen allocation under
    ``allocation='sensitivity'`` (its knapsack is the one the search solved). The model is left as it was.
    """
    grid_ = _checked_grid(grid, sparsity)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ConfigError(f"spdy_search sigma must be a positive number, got {sigma!r}")
    for name, value, least in (("evaluations", evaluations, 1), ("steps", steps, 0), ("verify", verify, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"spdy_search {name} must be an integer >= {least}, got {value!r}")
    for fixed in ("allocation", "allocation_options", "runner", "sparsity"):
        if fixed in options:
            raise ConfigError(f"spdy_search sets {fixed!r} itself (the block runner, the searched allocation); drop it")
    batches = take(calibration, None)
    scored = take(evaluation, None) if evaluation is not None else batches
    if not batches or not scored:
        raise ConfigError("spdy_search needs calibration batches (and evaluation batches, default the same)")
    target = round(float(sparsity), 9)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    options = {**options, "mode": _mode(method, options)}  # the final prune_llm's mode, fixed for every prune here
    db = build_database(model, batches, method, grid_, target, options, granularity)
    settings = {
        "search": "spdy",
        "method": method,
        "sparsity": target,
        "options": _plain(options),
        "seed": seed,
        "sigma": sigma,
        "evaluations": evaluations,
        "granularity": granularity,
    }
    start = time.perf_counter()
    tried, first_coefficients, history = _local_search(
        model, db, target, scored, loss_fn, evaluations, steps, sigma, seed, progress
    )
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    best = sorted(tried, key=lambda a: (tried[a], a))[:verify]
    verified = {}
    for allocation in best:
        profile = profile_of(db, first_coefficients[allocation], type(model).__name__, settings)
        verified[allocation] = _pruned_loss(model, method, target, batches, scored, loss_fn, options, profile)
    chosen = min(verified, key=lambda a: (verified[a], a))
    uniform = _pruned_loss(model, method, target, batches, scored, loss_fn, options, None)
    coefficients = first_coefficients[chosen]
    settings.update(
        coefficients=list(coefficients), local_errors=[[errors[s] for s in db.grid] for errors in db.errors],
        assembled_loss=tried[chosen], loss=verified[chosen], uniform_loss=uniform,
        verified={" ".join(f"{s:g}" for s in a): v for a, v in verified.items()},
    )  # fmt: skip
    profile = profile_of(db, coefficients, type(model).__name__, settings)
    return SearchResult(
        profile,
        {e.name: s for e, s in zip(db.entries, chosen)},
        {e.name: c for e, c in zip(db.entries, coefficients)},
        verified[chosen],
        uniform,
        history,
        {"database": db.seconds, "search": search_seconds, "verify": time.perf_counter() - start},
    )


def _local_search(model, db, sparsity, scored, loss_fn, evaluations, steps, sigma, seed, show):
    """SPDY's local search (section 3.4): mutate a shrinking number of coefficients of the best candidate so
    far (log-normal factors), map it through the knapsack, keep it when the assembled model's loss falls.
    Returns the loss of every distinct allocation scored, the first coefficients that gave it, the history."""
    rng = random.Random(seed)
    count = len(db.entries)
    tried: dict[tuple[float, ...], float] = {}
    first: dict[tuple[float, ...], list[float]] = {}
    history: list[dict[str, Any]] = []
    bar = progress_bar(range(evaluations), "spdy candidates", show)

    def score(coefficients: list[float]) -> tuple[float, tuple[float, ...]] | None:
        allocation = _allocation(db, coefficients, sparsity)
        if allocation not in tried:
            if len(tried) >= evaluations:
                return None
            tried[allocation] = _assembled_loss(model, db, db.targets, allocation, scored, loss_fn)
            first[allocation] = list(coefficients)
            history.append({"sparsities": list(allocation), "loss": tried[allocation]})
            next(bar, None)
        return tried[allocation], allocation

    with trial(model):
        starts = [[1.0] * count, [1.0 / max(db.errors[b][sparsity], 1e-300) for b in range(count)]]
        best_coefficients, best_loss = starts[0], math.inf
        for coefficients in starts:  # the raw local errors, and errors normalised to 1 at the target
            result = score(coefficients)
            if result is None:  # evaluations=1: the cap was reached by the first start
                break
            loss = result[0]
            if loss < best_loss:
                best_coefficients, best_loss = coefficients, loss
        for step in range(steps):
            mutated = max(1, round(count / 2 * (1 - step / max(steps, 1))))
            candidate = list(best_coefficients)
            for j in rng.sample(range(count), mutated):
                candidate[j] *= math.exp(rng.gauss(0.0, sigma))
            result = score(candidate)
            if result is None:
                break
            if result[0] < best_loss:
                best_coefficients, best_loss = candidate, result[0]
    for _ in bar:  # close the bar when the search stops early
        pass
    return tried, first, history


def _pruned_loss(model, method, sparsity, batches, scored, loss_fn, options, profile) -> float:
    """The calibration loss after a real block-runner prune (uniform when ``profile`` is None); model restored."""
    allocation = {} if profile is None else {"allocation": "sensitivity", "allocation_options": {"profile": profile}}
    with trial(model):
        prune(model, method, sparsity, calibration=batches, runner="blocks", progress=False,
              allow_collapse=True, **allocation, **options)  # fmt: skip
        return _loss(model, scored, loss_fn)
