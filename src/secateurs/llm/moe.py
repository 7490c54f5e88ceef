"""Mixture-of-experts LLMs: find the experts, rank them, remove the weakest, and prune inside them.

Current transformers (5.x) store a sparse MoE block's routed experts as two fused 3-D parameters,
``experts.gate_up_proj`` ``(experts, 2 * intermediate, hidden)`` and ``experts.down_proj``
``(experts, hidden, intermediate)``, called as ``experts(hidden, top_k_index, top_k_weights)``, next
to a router ``gate`` whose ``weight`` has one row per expert. A block class is known through
:func:`register_moe` (Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are registered); a module that looks
like an MoE block but is not registered is refused by name, never pruned as if it were dense.

- **Expert removal** (:func:`prune_experts`): one dense calibration pass records, per expert, the
  tokens routed to it, its router weights and its output norms. Saliencies: ``'reap'`` (REAP,
  Lasby et al. 2025: the mean over routed tokens of ``g_e(x) * ||f_e(x)||``),
  ``'frequency'`` (the share of routed tokens) and ``'random'`` (a seeded baseline). The lowest experts
  of every block are removed with their router rows; the config's expert count is updated (the same
  count in every block, so ``from_pretrained`` rebuilds the model), and at least ``top_k`` experts
  stay reachable. Shared experts (Qwen2-MoE) are not routed and are kept.
- **Pruning inside experts** (:func:`unfused_experts`, used by ``prune_llm``): each expert's slices
  become two ``nn.Linear`` layers for the run (``...experts.3.gate_up_proj``, ``...experts.3.down_proj``),
  called only on the tokens routed to that expert, so every criterion and solver sees per-expert
  statistics counted by routed tokens; the pruned weights are written back into the fused parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import batched
from ..errors import ConfigError, DataRequiredError
from ..guards import outside_inference_mode

#: saliencies :func:`prune_experts` ranks experts by
SALIENCIES = ("reap", "frequency", "random")


@dataclass(frozen=True)
class MoESpec:
    """Where a registered sparse-MoE block keeps its parts (attribute names on the block)."""

    router: str = "gate"
    experts: str = "experts"
    #: config keys holding the number of routed experts (the first one present is updated)
    config_keys: tuple[str, ...] = ("num_experts", "num_local_experts")


#: block class (``module.QualName``) -> its spec; extend with :func:`register_moe`
MOE_BLOCKS: dict[str, MoESpec] = {
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock": MoESpec(config_keys=("num_local_experts",)),
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock": MoESpec(),
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock": MoESpec(),
    "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock": MoESpec(),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_moe(block_cls: type | str, spec: MoESpec | None = None) -> None:
    """Declare a sparse-MoE block class: its router (``.weight`` with one row per expert, ``.top_k``) and its
    fused experts (``gate_up_proj``, ``down_proj``, ``act_fn``, called as ``experts(x, top_k_index,
    top_k_weights)``) live at ``spec``'s attribute names."""
    MOE_BLOCKS[block_cls if isinstance(block_cls, str) else _qualname(block_cls)] = spec or MoESpec()


@dataclass
class MoEBlock:
    """One sparse-MoE block of a model, checked against the fused layout."""

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    spec: MoESpec

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        for owner in (self.router, self.block):
            for key in ("top_k", "num_experts_per_tok"):
                if isinstance(getattr(owner, key, None), int):
                    return int(getattr(owner, key))
        raise ConfigError(f"cannot tell the top-k of {self.name!r}: its router has no 'top_k' attribute")

    def expert_output(self, e: int, x: Tensor) -> Tensor:
        """``f_e(x)``: expert ``e`` alone on tokens ``x`` (before the router weight), as the fused forward does."""
        ex = self.experts
        h = nn.functional.linear(x, ex.gate_up_proj[e], _bias(ex, "gate_up_proj_bias", e))
        gate, up = h.chunk(2, dim=-1)
        return nn.functional.linear(ex.act_fn(gate) * up, ex.down_proj[e], _bias(ex, "down_proj_bias", e))


def _bias(experts: nn.Module, name: str, e: int) -> Tensor | None:
    bias = getattr(experts, name, None)
    return None if bias is None else bias[e]


def _looks_like_moe(module: nn.Module) -> bool:
    """An ``experts`` child (a router's block), or experts fused into 3-D parameters of the module itself."""
    if isinstance(getattr(module, "experts", None), nn.Module):
        return True
    fused = any(p.ndim == 3 for p in module.parameters(recurse=False))
    return fused and "expert" in type(module).__name__.lower()


def _fused(module: nn.Module) -> bool:
    """Holds 3-D (fused expert) parameters, itself or in its ``experts`` child: invisible to a Linear-layer scope."""
    return any(p.ndim == 3 for p in module.parameters())


def find_moe_blocks(model: nn.Module, fused_only: bool = False) -> list[MoEBlock]:
    """Every sparse-MoE block of ``model``. A module that looks like one (an ``experts`` child, or fused 3-D
    expert parameters) but whose class is not registered is refused, naming it and the hook to register it;
    with ``fused_only``, only when its experts are fused (per-expert Linear layers are ordinary targets, called on
    the tokens routed to them: pruning inside them needs no registration)."""
    found: list[MoEBlock] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        spec = MOE_BLOCKS.get(_qualname(type(module)))
        if spec is None:
            if _looks_like_moe(module) and (_fused(module) or not fused_only):
                raise ConfigError(
                    f"{name!r} ({type(module).__name__}) looks like a mixture-of-experts block that secateurs does "
                    "not know, so its experts would be left dense or cut wrongly; register it with "
                    f"secateurs.llm.moe.register_moe({_qualname(type(module))!r}, MoESpec(router=..., experts=..., "
                    "config_keys=...)) if it keeps its experts fused (gate_up_proj / down_proj) behind a router"
                )
            continue
        router, experts = getattr(module, spec.router, None), getattr(module, spec.experts, None)
        if router is None or experts is None:
            raise ConfigError(f"{name!r} ({type(module).__name__}) has no {spec.router!r} / {spec.experts!r} child")
        for attribute in ("gate_up_proj", "down_proj", "act_fn"):
            if not hasattr(experts, attribute):
                raise ConfigError(
                    f"{name}.{spec.experts} ({type(experts).__name__}) has no {attribute!r}: secateurs handles fused "
                    "experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]); this layout is not supported"
                )
        e = experts.gate_up_proj.shape[0]
        weight = getattr(router, "weight", None)
        if weight is None or weight.shape[0] != e or experts.down_proj.shape[0] != e:
            raise ConfigError(f"{name!r}: the router's rows and the experts' first dimension differ ({e} experts)")
        found.append(MoEBlock(name, module, router, experts, spec))
        inside.append(name)
    return found


# -- statistics per expert ---------------------------------------------------------------------------
@dataclass
class ExpertStats:
    """What one dense calibration pass saw of each expert of one block."""

    tokens: Tensor  # (E,) routed tokens
    gate_sum: Tensor  # (E,) sum of router weights over routed tokens
    reap_sum: Tensor  # (E,) sum of g_e(x) * ||f_e(x)|| over routed tokens
    total: int = 0  # tokens that reached the block

    def saliency(self, kind: str, generator: torch.Generator | None = None) -> Tensor:
        if kind == "reap":
            return self.reap_sum / self.tokens.clamp(min=1)
        if kind == "frequency":
            return self.tokens / max(self.total, 1)
        if kind == "random":
            return torch.rand(self.tokens.shape, generator=generator, dtype=torch.float64)
        raise ConfigError(f"unknown expert saliency {kind!r}; valid: {', '.join(SALIENCIES)}")


@torch.no_grad()
def expert_statistics(
    model: nn.Module, batches: Sequence[Any], blocks: Sequence[MoEBlock] | None = None, outputs: bool = True
) -> dict[str, ExpertStats]:
    """Run ``model`` (dense) over ``batches`` and record, per block and expert, routed tokens, router weights and
    (``outputs``) the REAP sum ``g_e(x) * ||f_e(x)||``, from the arguments each fused experts module is called with."""
    blocks = find_moe_blocks(model) if blocks is None else blocks
    stats = {b.name: ExpertStats(*(torch.zeros(b.num_experts, dtype=torch.float64) for _ in range(3))) for b in blocks}
    handles = []

    def hook_for(b: MoEBlock) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x, index, weights = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
            if index is None or weights is None:
                raise ConfigError(f"{b.name}.{b.spec.experts} was not called as experts(x, top_k_index, top_k_weights)")
            s = stats[b.name]
            x = x.reshape(-1, x.shape[-1])
            s.total += x.shape[0]
            flat, w = index.reshape(-1).cpu(), weights.reshape(-1).double().cpu()
            s.tokens += torch.bincount(flat, minlength=b.num_experts)[: b.num_experts].double()
            s.gate_sum.index_add_(0, flat, w)
            if outputs:
                rows = torch.arange(index.shape[0]).repeat_interleave(index.shape[1])
                for e in flat.unique().tolist():
                    chosen = flat == e
                    out = b.expert_output(e, x[rows[chosen].to(x.device)])
                    s.reap_sum[e] += float((w[chosen] * out.double().norm(dim=-1).cpu()).sum())

        return hook

    try:
        for b in blocks:
            handles.append(b.experts.register_forward_pre_hook(hook_for(b), with_kwargs=True))
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                model(batch.to(_device(model))) if isinstance(batch, Tensor) else model(**batch)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return stats


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- expert removal ----------------------------------------------------------------------------------
@dataclass
class ExpertReport:
    """What :func:`prune_experts` did, per block."""

    saliency: str
    experts_before: int
    experts_after: int
    top_k: int
    removed: dict[str, list[int]] = field(default_factory=dict)  # original indices, per block
    kept: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)  # saliency of every original expert
    tokens: dict[str, list[int]] = field(default_factory=dict)  # routed calibration tokens per original expert
    config_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def summary(self) -> str:
        lines = [
            f"experts: {self.experts_before} -> {self.experts_after} per block (top-{self.top_k}, saliency "
            f"{self.saliency!r}, config {self.config_key!r} updated)"
        ]
        lines += [f"  {name}: removed {removed}" for name, removed in self.removed.items()]
        return "\n".join(lines)


def _count(fraction: float | None, count: int | None, experts: int) -> int:
    if (fraction is None) == (count is None):
        raise ConfigError("give exactly one of fraction= (a share of each block's experts) or count=")
    if fraction is not None:
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"fraction must be in [0, 1), got {fraction!r}")
        return round(fraction * experts)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ConfigError(f"count must be a non-negative integer, got {count!r}")
    return count


def _calibration_batches(model: nn.Module, calibration: Any, tokenizer: Any, nsamples: int, seqlen: int | None,
                         batch_size: int, seed: int) -> list[Tensor]:  # fmt: skip
    from ..calibration import model_tokenizer, resolve_seqlen, sample_segments

    if isinstance(calibration, Tensor) and calibration.ndim == 2 and not calibration.is_floating_point():
        segments = calibration[:nsamples]
    else:
        if tokenizer is None:
            tokenizer = model_tokenizer(model)
        segments = sample_segments(calibration, tokenizer, nsamples, resolve_seqlen(model, seqlen), seed)
    return list(batched(segments, batch_size))


@outside_inference_mode
def prune_experts(
    model: nn.Module,
    fraction: float | None = None,
    *,
    count: int | None = None,
    saliency: str = "reap",
    calibration: Any = None,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> ExpertReport:
    """Remove the ``fraction`` (or ``count``) lowest-saliency routed experts of every MoE block, in place.

    ``saliency``: ``'reap'`` (router weight x expert output norm over routed tokens), ``'frequency'`` (share of
    routed tokens) or ``'random'`` (seeded). ``calibration``: text (file, list), token ids, or ``(N, L)`` segments,
    as for ``prune_llm`` (``'random'`` needs none). Refused, before anything changes, when fewer than top-k experts
    would remain, or for a model with no (known) MoE block.
    """
    if saliency not in SALIENCIES:
        raise ConfigError(f"unknown expert saliency {saliency!r}; valid: {', '.join(SALIENCIES)}")
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no mixture-of-experts block; nothing to remove")
    sizes = {b.num_experts for b in blocks}
    if len(sizes) != 1:
        raise ConfigError(f"MoE blocks with different expert counts {sorted(sizes)}: the config cannot describe them")
    experts = sizes.pop()
    top_k = max(b.top_k for b in blocks)
    remove = _count(fraction, count, experts)
    if experts - remove < top_k:
        raise ConfigError(
            f"removing {remove} of {experts} experts per block would leave fewer than top-k = {top_k} reachable; "
            f"at most {experts - top_k} may be removed (fraction <= {(experts - top_k) / experts:.3f})"
        )
    config = getattr(model, "config", None)
    key = next((k for k in blocks[0].spec.config_keys if getattr(config, k, None) == experts), None)
    if config is not None and key is None:
        raise ConfigError(
            f"the model config has none of {list(blocks[0].spec.config_keys)} equal to {experts}; "
            "register the block with the config key that counts its experts (MoESpec(config_keys=...))"
        )
    generator = torch.Generator().manual_seed(seed)
    if saliency == "random":
        stats = {b.name: ExpertStats(*(torch.zeros(experts, dtype=torch.float64) for _ in range(3))) for b in blocks}
    else:
        if calibration is None:
            raise ConfigError(f"saliency {saliency!r} needs calibration data: pass calibration='calib.txt'")
        batches = _calibration_batches(model, calibration, tokenizer, nsamples, seqlen, batch_size, seed)
        stats = expert_statistics(model, batches, blocks, outputs=saliency == "reap")
        for b in blocks:  # all-zero scores would remove experts 0, 1, ... by the index tie-break
            if stats[b.name].total == 0:
                raise DataRequiredError(
                    f"no calibration token reached {b.name!r}, so its experts cannot be ranked by {saliency!r}; "
                    "pass calibration text that the model runs through every MoE block (or saliency='random')"
                )
    report = ExpertReport(saliency, experts, experts - remove, top_k, config_key=key)
    plans = []
    for b in blocks:
        scores = stats[b.name].saliency(saliency, generator)
        order = sorted(range(experts), key=lambda e: (float(scores[e]), e))  # lowest first, ties by index
        removed = sorted(order[:remove])
        kept = [e for e in range(experts) if e not in set(removed)]
        report.removed[b.name], report.kept[b.name] = removed, kept
        report.scores[b.name] = [float(s) for s in scores]
        report.tokens[b.name] = [int(t) for t in stats[b.name].tokens]
        plans.append((b, kept))
    if remove:
        for b, kept in plans:  # everything was checked above: from here on nothing refuses
            _keep_experts(b, kept)
        if key is not None:
            setattr(config, key, experts - remove)
    return report


def _keep_experts(b: MoEBlock, kept: list[int]) -> None:
    index = torch.tensor(kept, device=b.router.weight.device)
    experts = b.num_experts  # read once: it follows gate_up_proj, which changes below
    with torch.no_grad():
        for owner, name in ((b.router, "weight"), (b.router, "bias"), (b.experts, "gate_up_proj"),
                            (b.experts, "down_proj"), (b.experts, "gate_up_proj_bias"),
                            (b.experts, "down_proj_bias")):  # fmt: skip
            p = getattr(owner, name, None)
            if isinstance(p, nn.Parameter) and p.ndim >= 1 and p.shape[0] == experts:
                setattr(owner, name, nn.Parameter(p.index_select(0, index.to(p.device)), requires_grad=p.requires_grad))
    for owner in (b.router, b.experts, b.block):
        for attribute in ("num_experts", "num_local_experts"):
            if isinstance(getattr(owner, attribute, None), int):
                setattr(owner, attribute, len(kept))


# -- pruning inside experts --------------------------------------------------------------------------
class ExpertMLP(nn.Module):
    """One expert of a fused block as two Linear layers (the run's targets)."""

    def __init__(self, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None, down_bias: Tensor | None,
                 act_fn: Callable) -> None:  # fmt: skip
        super().__init__()
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=gate_up_bias is not None)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=down_bias is not None)
        self.gate_up_proj.to(gate_up.device, gate_up.dtype)
        self.down_proj.to(down.device, down.dtype)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(gate_up)
            self.down_proj.weight.copy_(down)
            if gate_up_bias is not None:
                self.gate_up_proj.bias.copy_(gate_up_bias)
            if down_bias is not None:
                self.down_proj.bias.copy_(down_bias)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class UnfusedExperts(nn.ModuleList):
    """A fused experts module as a list of :class:`ExpertMLP`, with the fused module's call signature: each expert
    runs on exactly the tokens routed to it, so hooks on its Linear layers see per-expert statistics."""

    def __init__(self, fused: nn.Module) -> None:
        def bias(name: str, e: int) -> Tensor | None:
            return _bias(fused, name, e)

        e_count = fused.gate_up_proj.shape[0]
        super().__init__(
            ExpertMLP(
                fused.gate_up_proj[e].detach(),
                fused.down_proj[e].detach(),
                bias("gate_up_proj_bias", e),
                bias("down_proj_bias", e),
                fused.act_fn,
            )
            for e in range(e_count)
        )
        self.num_experts = e_count

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, position = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def write_back(self, fused: nn.Module) -> None:
        """Copy every expert's (pruned) weights into the fused parameters."""
        with torch.no_grad():
            for e, expert in enumerate(self):
                fused.gate_up_proj[e].copy_(expert.gate_up_proj.weight)
                fused.down_proj[e].copy_(expert.down_proj.weight)
                if getattr(fused, "gate_up_proj_bias", None) is not None:
                    fused.gate_up_proj_bias[e].copy_(expert.gate_up_proj.bias)
                if getattr(fused, "down_proj_bias", None) is not None:
                    fused.down_proj_bias[e].copy_(expert.down_proj.bias)


@contextmanager
def unfused_experts(model: nn.Module, blocks: Sequence[MoEBlock] | None = None) -> Iterator[list[str]]:
    """For the ``with`` body, every MoE block's fused experts are per-expert Linear layers (yields the expert
    modules' names); on a normal exit the weights are written back into the fused parameters, on an exception
    the fused parameters are left as they were."""
    blocks = find_moe_blocks(model) if blocks is None else blocks
    swaps = []
    try:
        for b in blocks:
            unfused = UnfusedExperts(b.experts)
            setattr(b.block, b.spec.experts, unfused)
            swaps.append((b, unfused))
        yield [f"{b.name}.{b.spec.experts}.{e}" for b, u in swaps for e in range(len(u))]
        for b, unfused in swaps:
            for expert in unfused:
                for layer in (expert.gate_up_proj, expert.down_proj):
                    if nn.utils.parametrize.is_parametrized(layer):
                        raise ConfigError(
                            f"{b.name}.{b.spec.experts}: a mask (mode='mask') cannot live on fused experts; prune them "
                            "with mode='bake' or 'reconstruct'"
                        )
        for b, unfused in swaps:
            unfused.write_back(b.experts)
    finally:
        for b, _ in swaps:
            setattr(b.block, b.spec.experts, b.experts)


def starved_experts(stats: dict[str, ExpertStats], blocks: Sequence[MoEBlock], minimum: int | None) -> dict[str, int]:
    """Expert modules (``block.experts.e``) that saw fewer than ``minimum`` routed calibration tokens (default: the
    hidden size, below which an expert's input Hessian is singular), with their token counts."""
    out = {}
    for b in blocks:
        threshold = b.experts.gate_up_proj.shape[-1] if minimum is None else minimum
        for e, tokens in enumerate(stats[b.name].tokens.tolist()):
            if tokens < threshold:
                out[f"{b.name}.{b.spec.experts}.{e}"] = int(tokens)
    return out


def check_calibrated(stats: dict[str, ExpertStats]) -> None:
    if all(s.total == 0 for s in stats.values()):
        raise DataRequiredError("no calibration token reached any mixture-of-experts block")
