"""Evidence: what criteria, allocations and solvers need, gathered once and handed over.

Methods declare their needs (:class:`Need`); a runner gathers them and never asks which method
will read them. Two runners share one collector (:class:`StatsCollector`, forward hooks on the
targets): the whole-model runner feeds it the calibration batches (:func:`gather`), the
block-by-block runner feeds it one block's captured inputs (:func:`gather_block`). Layers fed
the very same tensor (q/k/v, gate/up) share one accumulator (convolutions share a Hessian only
when they also unfold the tensor alike).

Nothing about the model is changed: buffers (BatchNorm running statistics), ``.grad`` fields,
``requires_grad`` flags, the training mode and the RNG state are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import LossFn, default_loss, model_device, run_model, to_device
from .blocks import BlockInputs
from .errors import ConfigError, DataRequiredError
from .hessian import EigenFactor, HessianAccumulator, InverseFactor, eigen_factor, inverse_factor
from .layout import Layout, layout_of
from .progress import progress
from .scope import Target


class Need(str, Enum):
    ACTIVATIONS = "activations"  # statistics of each target's input channels (sum, sum of squares)
    OUTPUTS = "outputs"  # statistics of each target's output channels (mean |y|, zeros after ReLU)
    HESSIAN = "hessian"  # X X^T of each target's input (OBS saliency, reconstruction solvers)
    GRADIENTS = "gradients"  # loss gradients accumulated over the calibration batches
    BATCH_GRADIENTS = "batch_gradients"  # ... and kept per batch (memory: one copy per batch)
    DATA_PASSES = "data_passes"  # the method runs its own passes over calibration data
    INPUT_SHAPE = "input_shape"  # data-free passes that still need an input shape (SynFlow)


#: what forward hooks on the targets gather: the needs both runners can meet
HOOKED = frozenset({Need.ACTIVATIONS, Need.OUTPUTS, Need.HESSIAN})
#: needs that call for calibration batches
DATA_NEEDS = frozenset(
    {Need.ACTIVATIONS, Need.OUTPUTS, Need.HESSIAN, Need.GRADIENTS, Need.BATCH_GRADIENTS, Need.DATA_PASSES}
)
#: needs met by backward passes (the weights must be able to require gradients)
GRADIENT_NEEDS = frozenset({Need.GRADIENTS, Need.BATCH_GRADIENTS})
#: what to gather: one set for every target, or a set per target name (config groups read different evidence)
Needs = frozenset[Need] | Mapping[str, frozenset[Need]]


@dataclass
class InputStats:
    """Sums over every position of one input tensor (shared by the layers it feeds)."""

    sq_sum: Tensor  # (in_channels,): sum of x_j^2
    sum: Tensor  # (in_channels,): sum of x_j
    positions: int = 0

    def add(self, rows: Tensor) -> None:
        self.sq_sum += rows.square().sum(0).double()
        self.sum += rows.sum(0).double()
        self.positions += rows.shape[0]

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.positions, 1)


@dataclass
class ActivationStats:
    """Running sums over every position a target saw (tokens, pixels, samples)."""

    inputs: InputStats | None  # None: the layer takes integer inputs (an Embedding)
    output_abs_sum: Tensor  # (out_channels,): sum of |y_i| (gathered for Need.OUTPUTS)
    output_nonpositive: Tensor  # (out_channels,): count of y_i <= 0, i.e. zero after ReLU (Need.OUTPUTS)
    positions: int = 0
    #: a tied weight: each holder's own input sums, by module name (``inputs`` sums them all); else empty
    holders: dict[str, InputStats] = field(default_factory=dict)

    def _inputs(self) -> InputStats:
        if self.inputs is None:
            raise DataRequiredError("this layer takes integer inputs (an Embedding); it has no input statistics")
        return self.inputs

    def holder_input_mean(self, holder: str) -> Tensor:
        """The mean of each input channel as one holder of the weight saw it (a tied weight's holders see
        different inputs); the target's own mean when the weight is not tied."""
        if not self.holders:
            return self.input_mean
        stats = self.holders.get(holder)
        if stats is None:
            raise DataRequiredError(f"no calibration input reached {holder!r}; is it used in forward()?")
        return stats.mean

    @property
    def input_sq_sum(self) -> Tensor:
        return self._inputs().sq_sum

    @property
    def input_positions(self) -> int:
        return self._inputs().positions

    @property
    def input_mean(self) -> Tensor:
        return self._inputs().mean

    @property
    def input_variance(self) -> Tensor:
        """Unbiased variance of each input channel over all calibration positions."""
        stats = self._inputs()
        n = max(stats.positions, 2)
        return ((stats.sq_sum - stats.sum.square() / n) / (n - 1)).clamp_min(0.0)

    @property
    def input_norm(self) -> Tensor:
        """Wanda's ||X_j||_2 per input channel, over all calibration positions."""
        return self._inputs().sq_sum.sqrt()

    @property
    def output_mean_abs(self) -> Tensor:
        return self.output_abs_sum / max(self.positions, 1)

    @property
    def apoz(self) -> Tensor:
        """Average percentage of zeros after ReLU (Hu et al. 2016, arXiv:1607.03250)."""
        return self.output_nonpositive / max(self.positions, 1)


@dataclass
class GradientStats:
    grad_sum: Tensor
    abs_sum: Tensor
    sq_sum: Tensor
    batches: int = 0
    per_batch: list[Tensor] = field(default_factory=list)  # only with Need.BATCH_GRADIENTS

    @property
    def mean(self) -> Tensor:
        return self.grad_sum / max(self.batches, 1)

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.batches, 1)

    @property
    def fisher(self) -> Tensor:
        """Empirical diagonal Fisher: mean of squared batch gradients."""
        return self.sq_sum / max(self.batches, 1)


@dataclass
class Evidence:
    """Everything a method may read. Methods never reach back into the runner."""

    model: nn.Module
    targets: Sequence[Target]
    batches: list[Any] = field(default_factory=list)
    loss_fn: LossFn | None = None  # the user's; None means batches.default_loss
    example_inputs: Any = None
    generator: torch.Generator | None = None
    activations: dict[str, ActivationStats] = field(default_factory=dict)
    hessians: dict[str, HessianAccumulator] = field(default_factory=dict)
    gradients: dict[str, GradientStats] = field(default_factory=dict)
    show_progress: bool = True
    #: dampened inverse factors already computed, per (Hessian, group, dampening, retries allowed)
    inverses: dict[tuple, InverseFactor | EigenFactor] = field(default_factory=dict, repr=False)
    #: per target: the dampening its Hessian finally took and how many retries that needed (for the report)
    dampening: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)
    #: a distributed run: adds sums made over this rank's calibration share over every rank, in place (a
    #: method running its own passes, e.g. ShortGPT, adds its sums and counts with it); None in one process
    sum_over_ranks: Callable[[Sequence[Tensor]], None] | None = field(default=None, repr=False)

    def hessian(self, target: Target) -> HessianAccumulator:
        found = self.hessians.get(target.name)
        if found is None:
            raise DataRequiredError(f"no calibration input reached {target.module_name!r}; is it used in forward()?")
        return found

    def eigen_factors(self, target: Target, dampening: float) -> list[EigenFactor]:
        """The dampened, unit-diagonal Hessian of ``target`` and its eigendecomposition, one per conv group
        (:func:`~secateurs.hessian.eigen_factor`); a Hessian shared by several targets is decomposed once."""
        accumulator = self.hessian(target)
        keys = [(id(accumulator), g, dampening, "eigh") for g in range(accumulator.groups)]
        if any(key not in self.inverses for key in keys):
            hessian = accumulator.hessian
            for key, h in zip(keys, hessian.reshape(-1, *hessian.shape[-2:])):
                self.inverses.setdefault(key, eigen_factor(h, dampening))
        factors = [self.inverses[key] for key in keys]
        self.dampening[target.name] = (dampening, 0)
        return factors

    def inverse_factors(self, target: Target, dampening: float, max_retries: int = 5) -> list[InverseFactor]:
        """The dampened inverse factor of the Hessian of ``target``, one per conv group
        (:func:`~secateurs.hessian.inverse_factor`). A Hessian shared by several targets (q/k/v) is
        factored once; the dampening it took and the retries are recorded in :attr:`dampening`, so
        whoever factors (a criterion or a solver) gets them reported."""
        accumulator = self.hessian(target)
        keys = [(id(accumulator), g, dampening, max_retries) for g in range(accumulator.groups)]
        if any(key not in self.inverses for key in keys):
            hessian = accumulator.hessian
            for key, h in zip(keys, hessian.reshape(-1, *hessian.shape[-2:])):
                if key not in self.inverses:
                    self.inverses[key] = inverse_factor(h, dampening, max_retries)
        factors = [self.inverses[key] for key in keys]
        self.dampening[target.name] = (max(f.dampening for f in factors), max(f.retries for f in factors))
        return factors


# -- what a layer's input looks like to a statistic -----------------------------------------------
def _channels_last(x: Tensor, layout: Layout) -> Tensor:
    """Rows are positions, columns are channels."""
    if layout is Layout.CONV:
        return x.transpose(0, 1).reshape(x.shape[1], -1).t()
    return x.reshape(-1, x.shape[-1])


def hessian_columns(target: Target) -> tuple[int, int]:
    """``(groups, columns)`` of the Hessian of ``target``: the canonical ``spatial x in`` per group."""
    _, spatial, inp = target.canonical_shape
    groups = getattr(target.module, "groups", 1) if target.layout is Layout.CONV else 1
    return groups, spatial * inp


def check_hessian_target(target: Target) -> None:
    """Refuse, before anything runs, layers whose input cannot be written as Hessian columns."""
    module = target.module
    if target.layout is Layout.EMBEDDING:
        raise ConfigError(
            f"{target.module_name!r} is an Embedding: its input is a token index, so it has no Hessian; "
            "exclude it from the scope"
        )
    if isinstance(module, nn.Conv3d):
        raise ConfigError(
            f"{target.module_name!r} is a Conv3d, whose input patches torch cannot unfold for the Hessian; "
            "exclude it from the scope or use a criterion that needs no Hessian"
        )
    check_tied_groups(target, "its Hessian")


def check_tied_groups(target: Target, what: str) -> None:
    """Refuse a conv weight tied across convolutions with different ``groups``: they split ``what`` (its Hessian,
    its input channels) differently."""
    groups = getattr(target.module, "groups", 1)
    for name, holder, _ in target.tied:
        if layout_of(holder) is Layout.CONV and holder.groups != groups:
            raise ConfigError(
                f"{target.name} is shared by {target.module_name!r} (groups={groups}) and {name!r} "
                f"(groups={holder.groups}), which split {what} differently; exclude it from the scope"
            )


class Unfolding(NamedTuple):
    """How a convolution turns its input into patches: with the input, this decides its Hessian rows."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[int, ...]  # in F.pad's order
    padding_mode: str
    groups: int
    in_channels: int
    height_one: bool  # a Conv1d: torch unfolds only 2-D inputs, so it is a 2-D conv of height 1

    @classmethod
    def of(cls, module: nn.Module) -> Unfolding:
        pad = tuple(module._reversed_padding_repeated_twice)
        if isinstance(module, nn.Conv1d):
            return cls((1, *module.kernel_size), (1, *module.stride), (1, *module.dilation), (*pad, 0, 0),
                       module.padding_mode, module.groups, module.in_channels, True)  # fmt: skip
        return cls(tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation), pad, module.padding_mode,
                   module.groups, module.in_channels, False)  # fmt: skip


def hessian_rows(target: Target, x: Tensor, module: nn.Module | None = None) -> Tensor:
    """The input of ``target`` as rows of Hessian columns, ordered like the canonical ``(spatial, in)``
    weight: ``(positions, columns)``, or ``(positions, groups, columns)`` for a grouped conv.
    A conv's rows are its unfolded input patches (OBC, arXiv:2208.11580, section 4). ``module``: the
    holder that read ``x`` (the holders of a tied weight may unfold differently); the target's by default."""
    if target.layout is not Layout.CONV:
        return x.reshape(-1, x.shape[-1])
    unfolding = Unfolding.of(target.module if module is None else module)
    if unfolding.height_one:
        x = x.unsqueeze(2)
    if any(unfolding.pad):
        mode = "constant" if unfolding.padding_mode == "zeros" else unfolding.padding_mode
        x = F.pad(x, unfolding.pad, mode=mode)
    patches = F.unfold(x, unfolding.kernel, dilation=unfolding.dilation, stride=unfolding.stride)  # (N, C*K, L)
    groups, columns = hessian_columns(target)
    n, _, length = patches.shape
    in_per_group = unfolding.in_channels // groups
    spatial = columns // in_per_group
    # (N, groups, C_g, K, L) -> (N, L, groups, K, C_g): spatial-major, as the canonical (out, spatial, in) weight
    rows = patches.reshape(n, groups, in_per_group, spatial, length).permute(0, 4, 1, 3, 2)
    rows = rows.reshape(n * length, groups, columns)
    return rows[:, 0] if groups == 1 else rows


# -- the collector ------------------------------------------------------------------------------
def _sums(table: dict, key: str, rows: Tensor) -> InputStats:
    """``table[key]``, started at zero for ``rows``' channels if missing."""
    stats = table.get(key)
    if stats is None:
        zeros = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        stats = table[key] = InputStats(zeros, zeros.clone())
    return stats


def _input_key(x: Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)


def _reading(layout: Layout, module: nn.Module) -> tuple[str, Unfolding | None]:
    """How a layer reads its input tensor: which axis holds the channels (its input statistics), and
    for a convolution how it unfolds it (its Hessian rows too)."""
    if layout is Layout.CONV:
        return "channels first", Unfolding.of(module)
    return ("indices" if layout is Layout.EMBEDDING else "channels last"), None


class StatsCollector:
    """Forward hooks on ``targets`` accumulating input/output statistics and Hessians.

    Which targets share one accumulator is decided after the first batch: targets that saw
    exactly the same input tensors (same storage, shape, stride and version) in the same order,
    read the same way, share, and from then on only one of them computes. Input statistics need
    the channels on the same axis; a Hessian needs identical rows, so convolutions share one only
    when they also unfold alike (a 3x3 conv and a strided or 1x1 one reading the same ``x`` do not).
    (Object identity cannot tell inputs apart: every hook call's ``detach()`` is a new tensor over
    the same data.)
    """

    def __init__(
        self, targets: Sequence[Target], needs: Needs, initial: Mapping[str, tuple[Tensor, int]] | None = None
    ) -> None:
        self._needs = {name: n & HOOKED for name, n in needs_by_target(targets, needs).items()}
        self._initial = dict(initial or {})  # target name -> Hessian state to continue from (distributed ranks)
        self.targets = [t for t in targets if self._needs[t.name]]
        self.needs = frozenset().union(*self._needs.values())
        self.activations: dict[str, ActivationStats] = {}
        self.hessians: dict[str, HessianAccumulator] = {}
        self._inputs: dict[str, InputStats | None] = {}
        self._holder_inputs: dict[str, dict[str, InputStats]] = {}  # tied weights: target -> holder -> sums
        self._calls: dict[str, list[tuple]] = {}  # first batch: (input, channel axis, unfolding) per call
        self._alive: list[Tensor] = []  # first-batch inputs kept alive so their addresses stay unique
        self._shared_inputs: set[str] = set()  # targets whose input statistics another target accumulates
        self._shared_hessians: set[str] = set()  # ... and whose Hessian
        self._first = True
        self._handles: list[Any] = []

    def __enter__(self) -> StatsCollector:
        if self.targets:
            # a tied weight (one tensor, several modules) is one target: every holder of the same kind feeds
            # it (the same W multiplies both inputs, so both belong to its statistics and its Hessian)
            self._handles = [
                module.register_forward_hook(self._hook(t, holder))
                for t in self.targets
                for holder, module, _ in t.users
                if layout_of(module) is t.layout
            ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._alive.clear()

    def _hook(self, target: Target, holder: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0].detach()
            name = target.name
            needs = self._needs[name]
            if needs & {Need.ACTIVATIONS, Need.OUTPUTS} and isinstance(output, Tensor):
                self._outputs(target, output.detach())
            if self._first:
                self._calls.setdefault(name, []).append((_input_key(x), *_reading(target.layout, module)))
                self._alive.append(x)
            if Need.ACTIVATIONS in needs and target.layout is not Layout.EMBEDDING:
                self._add_inputs(target, holder, x)
            if Need.HESSIAN in needs and name not in self._shared_hessians:
                accumulator = self.hessians.get(name)
                if accumulator is None:
                    groups, columns = hessian_columns(target)
                    accumulator = self.hessians[name] = HessianAccumulator(columns, x.device, groups)
                    if name in self._initial:
                        accumulator.continue_from(*self._initial[name])
                accumulator.add(hessian_rows(target, x, module))

        return hook

    def _add_inputs(self, target: Target, holder: str, x: Tensor) -> None:
        """The target's input sums (unless another target reading the same inputs keeps them) and, for a tied
        weight, each holder's own: bias compensation corrects each holder by the mean of its own input."""
        own = target.name not in self._shared_inputs
        if not own and not target.tied:
            return
        rows = _channels_last(x.float(), target.layout)
        if own:
            _sums(self._inputs, target.name, rows).add(rows)
        if target.tied:
            _sums(self._holder_inputs.setdefault(target.name, {}), holder, rows).add(rows)

    def _outputs(self, target: Target, y: Tensor) -> None:
        """The target's ActivationStats; output statistics only when something reads them (two passes over
        every output are a real cost on an LLM's MLP)."""
        stats = self.activations.get(target.name)
        channels = y.shape[1] if target.layout is Layout.CONV else y.shape[-1]
        if stats is None:
            zeros = torch.zeros(channels, dtype=torch.float64, device=y.device)
            # the input sums are attached by result(): the hook records outputs before inputs
            stats = self.activations[target.name] = ActivationStats(None, zeros, zeros.clone())
        positions = y.numel() // max(channels, 1)
        if Need.OUTPUTS in self._needs[target.name]:
            rows = _channels_last(y.float(), target.layout)
            stats.output_abs_sum += rows.abs().sum(0).double()
            stats.output_nonpositive += (rows <= 0).sum(0).double()
        stats.positions += positions

    def end_batch(self) -> None:
        """After the first batch, targets with identical input histories share one accumulator: of input
        statistics when they read the channels alike, of the Hessian when their rows are the same too."""
        if not self._first:
            return
        self._first = False
        inputs_owner: dict[tuple, str] = {}
        hessian_owner: dict[tuple, str] = {}
        for t in self.targets:
            calls = self._calls.get(t.name)
            if not calls:
                continue
            # an owner keeps what the sharer needs: targets only share with one that gathers the same thing
            if t.name in self._inputs:
                owner = inputs_owner.setdefault(tuple((key, axis) for key, axis, _ in calls), t.name)
                if owner != t.name:
                    self._shared_inputs.add(t.name)
                    self._inputs[t.name] = self._inputs[owner]
            if t.name not in self.hessians:
                continue
            owner = hessian_owner.setdefault(tuple(calls), t.name)
            if owner != t.name:
                self._shared_hessians.add(t.name)
                self.hessians[t.name] = self.hessians[owner]
        self._calls.clear()
        self._alive.clear()

    def result(self) -> tuple[dict[str, ActivationStats], dict[str, HessianAccumulator]]:
        for name, stats in self.activations.items():
            stats.inputs = self._inputs.get(name)
            stats.holders = self._holder_inputs.get(name, {})
        return self.activations, self.hessians


# -- the two drivers ----------------------------------------------------------------------------
@contextlib.contextmanager
def preserved(model: nn.Module, targets: Sequence[Target]) -> Iterator[None]:
    """Run passes without leaving a trace on the model."""
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    flags = {t.parameter: t.parameter.requires_grad for t in targets}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g
        for p, flag in flags.items():
            p.requires_grad_(flag)
        torch.set_rng_state(rng)


def needs_by_target(targets: Sequence[Target], needs: Needs) -> dict[str, frozenset[Need]]:
    """What each target needs: the same for all (a set) or each its own (a mapping by target name;
    config groups of one run may read different evidence)."""
    if isinstance(needs, Mapping):
        return {t.name: needs.get(t.name, frozenset()) for t in targets}
    return dict.fromkeys((t.name for t in targets), needs)


def _collect(
    targets: Sequence[Target], needs: Needs, batches: Iterable[Any], run,
    initial: Mapping[str, tuple[Tensor, int]] | None = None,
) -> StatsCollector:  # fmt: skip
    with StatsCollector(targets, needs, initial) as collector, torch.no_grad():
        for batch in batches:
            run(batch)
            collector.end_batch()
    return collector


def gather(evidence: Evidence, needs: Needs) -> None:
    """Whole-model runner: fill ``evidence`` with what ``needs`` asks for (for every target, or per target),
    from the calibration batches."""
    per_target = needs_by_target(evidence.targets, needs)
    needs = frozenset().union(*per_target.values())
    if needs & HOOKED:
        device = model_device(evidence.model)
        label = "+".join(sorted(n.value for n in needs & HOOKED))
        batches = progress(evidence.batches, label, evidence.show_progress)
        collector = _collect(
            evidence.targets, per_target, batches, lambda b: run_model(evidence.model, to_device(b, device))
        )
        evidence.activations, evidence.hessians = collector.result()
    if needs & GRADIENT_NEEDS:
        wanted = [t for t in evidence.targets if per_target[t.name] & GRADIENT_NEEDS]
        _gather_gradients(evidence, wanted, keep_batches=Need.BATCH_GRADIENTS in needs)


def gather_block(
    block: nn.Module, block_index: int, targets: Sequence[Target], inputs: BlockInputs, needs: Needs,
    initial: Mapping[str, tuple[Tensor, int]] | None = None,
) -> tuple[dict[str, ActivationStats], dict[str, HessianAccumulator]]:  # fmt: skip
    """Block runner: one pass of ``block`` over every captured calibration batch, hooks on ``targets``.
    ``initial``: Hessian states to continue from, by target name (the previous rank's, in a distributed run)."""

    def run(b: int) -> None:
        inputs.call(block_index, b).invoke(block, inputs.hidden[b])

    return _collect(targets, needs, range(len(inputs.hidden)), run, initial).result()


def _gather_gradients(evidence: Evidence, targets: Sequence[Target], keep_batches: bool) -> None:
    loss_fn = evidence.loss_fn or default_loss
    model, device = evidence.model, model_device(evidence.model)
    params = {t.name: t.parameter for t in targets}
    for p in params.values():
        p.requires_grad_(True)
    stats = {
        name: GradientStats(
            torch.zeros_like(p, dtype=torch.float64),
            torch.zeros_like(p, dtype=torch.float64),
            torch.zeros_like(p, dtype=torch.float64),
        )
        for name, p in params.items()
    }
    with torch.enable_grad():
        for batch in progress(evidence.batches, "gradients", evidence.show_progress):
            for p in model.parameters():
                p.grad = None
            loss = loss_fn(model, to_device(batch, device))
            loss.backward()
            for name, p in params.items():
                g = p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                s = stats[name]
                s.grad_sum += g
                s.abs_sum += g.abs()
                s.sq_sum += g.square()
                s.batches += 1
                if keep_batches:
                    s.per_batch.append(g.float())
    evidence.gradients = stats
