"""Calibration and solving spread over ``torch.distributed`` ranks (``torchrun``; gloo on CPU, NCCL on GPU).

The block runner's evidence is a set of *sums* with their counts (Wanda's sum of x^2 per input channel,
OWL's and FLAP's activation sums, SparseGPT's unscaled ``X X^T`` with its number of positions), so a
calibration set split across ranks gives the single-process statistics back by adding every rank's sums
(:func:`reduce_evidence`): each rank's share is weighted by the tokens it saw, because the counts are
summed with the sums. Each rank recomputes the next block's inputs on its own shard.

The expensive step, a solver's per-layer reconstruction (SparseGPT's OBS sweep), runs once per layer on
an owner rank, layers sharing a Hessian together, balanced by cost (:func:`assign_owners`); the owners
broadcast their results so every rank writes the same weights (:class:`OwnerSolver`). As llm-compressor
does for GPTQ, but for every solver of the pipeline.

Ranks must agree on what they prune: :func:`agree` exchanges fingerprints of the model, the configuration
and the calibration before anything runs and refuses a mismatch on every rank with the same message. A
rank that dies makes the others' next collective fail (gloo: connection closed, or the group's timeout);
that failure becomes a :class:`DistributedError` naming the step, and the run's rollback restores the model.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import BlockInputs
from .errors import ConfigError, SecateursError
from .evidence import ActivationStats, Evidence, InputStats, Need, Needs, needs_by_target
from .evidence import gather_block as gather_one_process
from .hessian import HessianAccumulator
from .patterns import Pattern
from .scope import Target
from .solvers.base import Solver, SolveResult

#: how long a collective waits for the other ranks before the run stops (the process group's timeout)
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class DistributedError(SecateursError, RuntimeError):
    """Ranks disagree on the run, or a rank stopped answering (died, or ran past the timeout)."""


@dataclass
class Group:
    """The ranks one run is spread over."""

    rank: int
    world: int
    backend: str
    process_group: Any = None  # None: torch's default group

    @property
    def writer(self) -> bool:
        """Rank 0 writes the output; the others only compute."""
        return self.rank == 0


def backend_for(device: torch.device | str | None) -> str:
    """NCCL for CUDA devices (where torch has it), gloo otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.distributed.is_nccl_available():
        return "nccl"
    return "gloo"


def detect(
    process_group: Any = None, device: torch.device | str | None = None, timeout: datetime.timedelta | None = None
) -> Group | None:
    """The run's group: ``process_group`` if given, else the default group if one is initialised, else one
    started from ``torchrun``'s environment (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``/``PORT``) with
    :func:`backend_for` ``device``. None for a single process."""
    dist = torch.distributed
    if not dist.is_available():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        return None
    if process_group is None and not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        backend = backend_for(device)
        dist.init_process_group(backend, timeout=timeout or DEFAULT_TIMEOUT)
    world = dist.get_world_size(process_group)
    if world <= 1:
        return None
    return Group(dist.get_rank(process_group), world, str(dist.get_backend(process_group)), process_group)


@contextlib.contextmanager
def collective(group: Group, step: str) -> Iterator[None]:
    """Turn a failed collective (a peer died, closed its connection or ran past the timeout) into a
    :class:`DistributedError` that names the step, on this rank."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ConnectionError, OSError) as exc:
        raise DistributedError(
            f"rank {group.rank} of {group.world}: the collective '{step}' failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); another rank stopped (it died, was killed or ran "
            "past the process group's timeout). The run stopped here: the model was restored and nothing was written"
        ) from exc


# -- agreeing on the run ------------------------------------------------------------------------------
def fingerprint_tensor(t: Tensor, samples: int = 4096) -> str:
    """A cheap fingerprint of a tensor: shape, dtype and up to ``samples`` evenly strided values (hashing
    every byte of a large model on every rank would cost as much as reading it)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    values = flat[::step][:samples].to("cpu", torch.float64).numpy().tobytes()
    return hashlib.sha256(repr((tuple(t.shape), str(t.dtype))).encode() + values).hexdigest()[:16]


def fingerprint_model(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{fingerprint_tensor(tensor)};".encode())
    return digest.hexdigest()[:16]


def fingerprint(value: Any) -> str:
    """Fingerprint of a configuration (a JSON-able mapping), a tensor or a module."""
    if isinstance(value, nn.Module):
        return fingerprint_model(value)
    if isinstance(value, Tensor):
        return hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def agree(group: Group, parts: Mapping[str, str]) -> None:
    """Refuse, on every rank with the same message, a run whose ranks disagree on any of ``parts``
    (name -> fingerprint: the model, the configuration, the calibration settings)."""
    gathered: list[Any] = [None] * group.world
    with collective(group, "start-up fingerprint exchange"):
        torch.distributed.all_gather_object(gathered, dict(parts), group=group.process_group)
    differing = sorted({k for g in gathered for k in set(g) | set(gathered[0]) if g.get(k) != gathered[0].get(k)})
    if differing:
        per_rank = "; ".join(f"rank {r}: " + ", ".join(f"{k}={g.get(k)}" for k in differing) for r, g in
                             enumerate(gathered))  # fmt: skip
        raise DistributedError(
            f"the {group.world} ranks disagree on {', '.join(differing)} ({per_rank}); every rank must load the "
            "same model and pass the same configuration and calibration. Nothing was pruned"
        )


def shard(batches: Sequence[Any], group: Group) -> list[Any]:
    """This rank's contiguous share of the calibration batches (sizes differ by at most one batch)."""
    if len(batches) < group.world:
        raise ConfigError(
            f"{len(batches)} calibration batch(es) cannot be split over {group.world} ranks; use at least one "
            "batch per rank (more nsamples, or a smaller batch_size)"
        )
    per, extra = divmod(len(batches), group.world)
    start = group.rank * per + min(group.rank, extra)
    return list(batches[start : start + per + (1 if group.rank < extra else 0)])


# -- statistics: sums with their counts, added over the ranks ----------------------------------------
def _all_sum(group: Group, tensors: list[Tensor], step: str) -> None:
    """Add ``tensors`` over the ranks in place (one flat buffer per dtype and device: few collectives)."""
    by_kind: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    with collective(group, step):
        for same in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            torch.distributed.all_reduce(flat, group=group.process_group)
            offset = 0
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def add_over_ranks(group: Group, tensors: Sequence[Tensor], step: str) -> None:
    """Add ``tensors`` (sums and their counts, in the same order on every rank) over the ranks, in place; what a
    method running its own calibration passes (ShortGPT's block influence) gets as ``Evidence.sum_over_ranks``."""
    _check_same_layout(group, [f"{t.dtype}{tuple(t.shape)}" for t in tensors], step)
    _all_sum(group, list(tensors), step)


def reduce_evidence(
    group: Group, activations: Mapping[str, ActivationStats], hessians: Mapping[str, HessianAccumulator], step: str
) -> None:
    """Add every rank's statistics (in place): input sums and squares, output sums, Hessian sums, and their
    position counts. Accumulators shared by several layers (q/k/v read one tensor) are added once."""
    seen: set[int] = set()
    tensors: list[Tensor] = []
    counted: list[Any] = []  # objects with a ``positions`` count, in the same order on every rank

    def take(obj: Any, *parts: Tensor) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        tensors.extend(parts)
        counted.append(obj)

    for name in sorted(activations):
        stats = activations[name]
        take(stats, stats.output_abs_sum, stats.output_nonpositive)
        take(stats.inputs, *(() if stats.inputs is None else (stats.inputs.sq_sum, stats.inputs.sum)))
        for holder in sorted(stats.holders):
            take(stats.holders[holder], stats.holders[holder].sq_sum, stats.holders[holder].sum)
    for name in sorted(hessians):
        take(hessians[name], hessians[name]._sum)
    device = tensors[0].device if tensors else torch.device("cpu")
    counts = torch.tensor([float(obj.positions) for obj in counted], dtype=torch.float64, device=device)
    _check_same_layout(group, [_kind(obj) for obj in counted], step)
    _all_sum(group, [*tensors, counts], step)
    for obj, n in zip(counted, counts.tolist()):
        obj.positions = int(n)


def _kind(obj: Any) -> str:
    if isinstance(obj, HessianAccumulator):
        return f"H{tuple(obj._sum.shape)}"
    if isinstance(obj, InputStats):
        return f"I{tuple(obj.sum.shape)}"
    return f"A{tuple(obj.output_abs_sum.shape)}"


def _check_same_layout(group: Group, kinds: list[str], step: str) -> None:
    """Every rank must add the same statistics in the same order (a rank whose shard never reached a layer
    would silently add the wrong tensors); compared by a digest, one small collective."""
    digest = int(hashlib.sha256(repr(kinds).encode()).hexdigest()[:12], 16)
    mine = torch.tensor([digest, -digest], dtype=torch.float64)
    with collective(group, step):
        torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX, group=group.process_group)
    if int(mine[0]) != digest or int(-mine[1]) != digest:
        raise DistributedError(
            f"rank {group.rank}: the ranks gathered different statistics at '{step}' (a layer reached on one rank's "
            "calibration shard and not another's); give every rank calibration batches of the same kind"
        )


# -- Hessians: handed on in rank order, so the float32 sums are the single process's bits ---------------
def gather_block(
    group: Group, block: nn.Module, index: int, targets: Sequence[Target], inputs: BlockInputs, needs: Needs
) -> tuple[dict[str, ActivationStats], dict[str, HessianAccumulator]]:
    """One block's statistics over every rank's shard. Input/output sums (float64: Wanda, OWL, FLAP) are added
    over the ranks at once. A float32 Hessian sum depends on the order its batches are added, and a different
    sum can flip SparseGPT's near-tied choices (seen on pydoc-llama-12m), so Hessians are accumulated rank
    after rank instead: each rank continues from the previous rank's sums over its own (contiguous) shard and
    the last rank hands the total to everyone -- the same ``addmm`` calls in the same order as one process,
    so the same bits. The passes that build Hessians wait for each other; next-block inputs and the solves
    still run in parallel."""
    step = f"block {index} statistics"
    hessian_needed = any(Need.HESSIAN in n for n in needs_by_target(targets, needs).values())
    device = inputs.hidden[0].device if inputs.hidden else torch.device("cpu")
    initial = _receive_hessians(group, step, device) if hessian_needed and group.rank > 0 else None
    activations, hessians = gather_one_process(block, index, targets, inputs, needs, initial)
    if hessian_needed:
        if group.rank < group.world - 1:
            _send_hessians(group, hessians, group.rank + 1, step)
        _share_final_hessians(group, hessians, step)
    reduce_evidence(group, activations, {}, step)
    return activations, hessians


def _unique(hessians: Mapping[str, HessianAccumulator]) -> tuple[list[tuple[str, int, int]], list[Tensor]]:
    """``(name, index of its accumulator, positions)`` for every name (shared accumulators once) and the sums."""
    order: dict[int, int] = {}
    tensors: list[Tensor] = []
    header = []
    for name in sorted(hessians):
        total, positions = hessians[name].state
        if id(total) not in order:
            order[id(total)] = len(tensors)
            tensors.append(total)
        header.append((name, order[id(total)], positions))
    return header, tensors


def _send_hessians(group: Group, hessians: Mapping[str, HessianAccumulator], dst: int, step: str) -> None:
    header, tensors = _unique(hessians)
    shapes = [(tuple(t.shape), t.dtype) for t in tensors]
    with collective(group, step + " (Hessians to the next rank)"):
        torch.distributed.send_object_list([header, shapes], dst=_global(group, dst), group=group.process_group)
        for t in tensors:
            torch.distributed.send(t.contiguous(), dst=_global(group, dst), group=group.process_group)


def _receive_hessians(group: Group, step: str, device: torch.device) -> dict[str, tuple[Tensor, int]]:
    holder: list[Any] = [None, None]
    source = _global(group, group.rank - 1)
    with collective(group, step + " (Hessians from the previous rank)"):
        torch.distributed.recv_object_list(holder, src=source, group=group.process_group)
        header, shapes = holder
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
        for t in tensors:
            torch.distributed.recv(t, src=source, group=group.process_group)
    return {name: (tensors[i], positions) for name, i, positions in header}


def _share_final_hessians(group: Group, hessians: Mapping[str, HessianAccumulator], step: str) -> None:
    """The last rank's sums (every batch of every rank, in order) on every rank."""
    last = group.world - 1
    header, tensors = _unique(hessians)
    holder: list[Any] = [[(name, tuple(tensors[i].shape)) for name, i, _ in header]]
    with collective(group, step + " (final Hessians)"):
        torch.distributed.broadcast_object_list(holder, src=_global(group, last), group=group.process_group)
        if holder[0] != [(name, tuple(tensors[i].shape)) for name, i, _ in header]:
            raise DistributedError(
                f"rank {group.rank}: the ranks built different Hessians at '{step}' (a layer reached on one rank's "
                "calibration shard and not another's); give every rank calibration batches of the same kind"
            )
        positions = torch.tensor([p for _, _, p in header], dtype=torch.float64)
        for t in [*tensors, positions]:
            torch.distributed.broadcast(t, src=_global(group, last), group=group.process_group)
    for (name, _, _), n in zip(header, positions.tolist()):
        hessians[name].positions = int(n)


# -- solving each layer once, on its owner rank --------------------------------------------------------
def solve_cost(target: Target) -> float:
    """Work of a reconstruction, up to a constant: a Cholesky of the columns x columns Hessian plus the
    sweep over rows x columns^2 (SparseGPT, arXiv:2301.00774, section 3.2)."""
    out, spatial, inp = target.canonical_shape
    columns = spatial * inp
    return float(columns) ** 3 + float(out) * float(columns) ** 2


def assign_owners(targets: Sequence[Target], evidence: Evidence, world: int) -> dict[str, int]:
    """Target name -> owner rank. Layers sharing a Hessian (q/k/v) go together, so their inverse is factored
    once; groups are placed largest first on the least-loaded rank (LPT), ties to the lower rank and the
    order of ``targets``, so every rank computes the same assignment."""
    groups: dict[int, list[Target]] = {}
    for t in targets:
        key = id(evidence.hessians.get(t.name, t))
        groups.setdefault(key, []).append(t)
    ordered = sorted(groups.values(), key=lambda g: -sum(solve_cost(t) for t in g))  # stable: keeps target order
    load = [0.0] * world
    owner: dict[str, int] = {}
    for members in ordered:
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += sum(solve_cost(t) for t in members)
        owner.update(dict.fromkeys((t.name for t in members), rank))
    return owner


class OwnerSolver(Solver):
    """Runs ``inner`` on the layers this rank owns and broadcasts every layer's result from its owner, so each
    rank ends with the same :class:`SolveResult` for every layer (and applies it alike)."""

    def __init__(self, inner: Solver, group: Group) -> None:
        self.inner, self.group = inner, group
        self.name = inner.name  # type: ignore[misc]
        self.needs = inner.needs  # type: ignore[misc]
        self.adaptive = inner.adaptive  # type: ignore[misc]

    def validate(self, targets: Sequence[Target], mode: str) -> None:
        self.inner.validate(targets, mode)

    def solve(
        self, targets: Sequence[Target], evidence: Evidence, masks: Mapping[str, Tensor] | None,
        sparsities: Mapping[str, float] | None = None, pattern: Pattern | None = None,
    ) -> dict[str, SolveResult]:  # fmt: skip
        owner = assign_owners(targets, evidence, self.group.world)
        mine = [t for t in targets if owner[t.name] == self.group.rank]
        failure: BaseException | None = None
        solved: dict[str, SolveResult] = {}
        try:
            solved = self.inner.solve(mine, evidence, masks, sparsities, pattern) if mine else {}
        except Exception as exc:  # every rank must hear of it, or the others wait for a broadcast forever
            failure = exc
        self._share_failure(failure)
        results: dict[str, SolveResult] = {}
        for t in targets:
            results[t.name] = self._broadcast(solved.get(t.name), owner[t.name], t.name, t.parameter.device)
        return results

    def _share_failure(self, failure: BaseException | None) -> None:
        flags: list[Any] = [None] * self.group.world
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        with collective(self.group, f"{self.inner.name} solve"):
            torch.distributed.all_gather_object(flags, message, group=self.group.process_group)
        if failure is not None:
            raise failure
        failed = [(r, m) for r, m in enumerate(flags) if m is not None]
        if failed:
            rank, message = failed[0]
            raise DistributedError(f"the {self.inner.name} solve failed on rank {rank}: {message}")

    def _broadcast(self, result: SolveResult | None, source: int, name: str, device: torch.device) -> SolveResult:
        """The owner's result, on every rank (tensors through the backend: NCCL needs them on the device)."""
        group = self.group
        holder: list[Any] = [None]
        if group.rank == source:
            assert result is not None  # the owner solved it (a failure was raised above)
            holder = [_describe(result)]
        with collective(group, f"broadcast of {name}"):
            torch.distributed.broadcast_object_list(holder, src=_global(group, source), group=group.process_group)
            layout = holder[0]
            tensors = _result_tensors(result) if group.rank == source else _empty(layout, device)
            for t in tensors.values():
                torch.distributed.broadcast(t, src=_global(group, source), group=group.process_group)
        if group.rank == source:
            assert result is not None
            return result
        return _rebuild(layout, tensors)


def _global(group: Group, rank: int) -> int:
    if group.process_group is None:
        return rank
    return torch.distributed.get_global_rank(group.process_group, rank)


def _result_tensors(result: SolveResult) -> dict[str, Tensor]:
    out = {"keep": result.keep.to(torch.uint8).contiguous()}
    if result.weight is not None:
        out["weight"] = result.weight.contiguous()
    if result.bias_delta is not None:
        out["bias_delta"] = result.bias_delta.contiguous()
    for holder, delta in result.tied_bias_deltas.items():
        out[f"tied:{holder}"] = delta.contiguous()
    return out


def _describe(result: SolveResult) -> dict[str, Any]:
    tensors = _result_tensors(result)
    return {
        "tensors": {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()},
        "info": result.info,
    }


def _empty(layout: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    """Receiving buffers on this rank's device (each NCCL rank has its own GPU)."""
    return {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in layout["tensors"].items()}


def _rebuild(layout: dict[str, Any], tensors: dict[str, Tensor]) -> SolveResult:
    tied = {k.removeprefix("tied:"): v for k, v in tensors.items() if k.startswith("tied:")}
    return SolveResult(
        keep=tensors["keep"].bool(), weight=tensors.get("weight"), bias_delta=tensors.get("bias_delta"),
        tied_bias_deltas=tied, info=dict(layout["info"]),
    )  # fmt: skip
