"""Find a model's repeated blocks, and capture what each block is called with.

Shared by the block-by-block runner (LLMs), whole-block removal (ShortGPT) and OWL's layer
grouping, so it sits below all three.

Reference pruning scripts hard-code ``model.model.layers`` (Llama), ``model.model.decoder.layers``
(OPT) or ``model.transformer.h`` (GPT-2), and break when transformers changes a layer's
signature (e.g. ``position_embeddings`` arriving as a keyword). Here the blocks are the
largest ``nn.ModuleList`` of same-type modules holding prunable layers, and each block's
inputs are recorded from a real forward pass -- positional arguments *and* keywords
(attention masks, position ids and rotary embeddings, cache flags) -- so any signature works.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .batches import blaming_inputs, model_inputs
from .errors import ConfigError
from .layout import Layout, layout_of

#: a second stack holding at least this share of the largest one's parameters is not an afterthought
_COMPARABLE = 0.25


class BlockDiscoveryError(ConfigError):
    """The model has no recognisable stack of repeated blocks (name it with ``blocks=``)."""


def _prunable_layers(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if layout_of(m) in (Layout.LINEAR, Layout.TRANSPOSED))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, list[nn.Module]]:
    """``(qualified name, blocks)`` of the model's repeated blocks, in execution order.

    ``blocks`` names the container explicitly (``'model.layers'``; ``''``: the model itself);
    otherwise the ``ModuleList``/``Sequential`` of same-type modules that holds prunable
    Linear/Conv1D layers and the most parameters is taken. A model with several such stacks of
    comparable size (an encoder and a decoder) is refused: one stack per run, named.
    """
    if blocks is not None:
        try:
            container = model.get_submodule(blocks)
        except AttributeError as exc:
            raise BlockDiscoveryError(
                f"blocks={blocks!r} names no submodule of {type(model).__name__}; {_candidates_hint(model)}"
            ) from exc
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            raise BlockDiscoveryError(
                f"blocks={blocks!r} is a {type(container).__name__}, not a non-empty ModuleList/Sequential "
                f"of blocks; {_candidates_hint(model)}"
            )
        return blocks, list(container)
    stacks: list[tuple[int, str, list[nn.Module]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or _prunable_layers(children[0]) == 0:
            continue
        if any(name.startswith(outer + ".") for _, outer, _ in stacks):
            continue  # nested in a stack already found (the experts of a block): part of that stack
        stacks.append((_params(module), name, children))
    best = max(stacks, key=lambda s: s[0], default=None)
    others = [s for s in stacks if s is not best and best is not None and s[0] >= _COMPARABLE * best[0]]
    if others:
        listed = ", ".join(f"{n!r} ({size:,} parameters)" for size, n, _ in sorted(stacks, key=lambda s: s[1]))
        raise BlockDiscoveryError(
            f"{type(model).__name__} has {len(others) + 1} stacks of repeated blocks: {listed}. Blocks are pruned "
            "one stack per run: name it with blocks='<qualified.name>' (CLI: --blocks) and run once per stack, or "
            "prune every layer at once with runner='model'"
        )
    if best is None:
        raise BlockDiscoveryError(
            f"found no repeated blocks in {type(model).__name__}: no nn.ModuleList of same-type modules "
            f"holding Linear/Conv1D layers. Name the container of the transformer blocks with "
            f"blocks='<qualified.name>' (CLI: --blocks <qualified.name>); {_candidates_hint(model)}"
        )
    return best[1], best[2]


def block_owners(blocks: Sequence[nn.Module]) -> dict[int, int]:
    """``id(module) -> index`` of the block holding it, for every module inside ``blocks``."""
    return {id(m): i for i, block in enumerate(blocks) for m in block.modules()}


def _candidates_hint(model: nn.Module) -> str:
    lists = [n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and n]
    if lists:
        return f"containers in this model: {', '.join(lists[:8])}{' ...' if len(lists) > 8 else ''}"
    return "this model has no nn.ModuleList/nn.Sequential at all, so it has no stack of blocks to walk"


class _Stop(Exception):
    """Raised from a pre-hook to end a forward pass once the first block's inputs are known."""


def _strip_caches(value: Any) -> Any:
    """Caches must not leak between calibration batches: any cache object becomes None."""
    if type(value).__name__.endswith("Cache"):
        return None
    if isinstance(value, tuple):
        return tuple(_strip_caches(v) for v in value)
    if isinstance(value, list):
        return [_strip_caches(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_caches(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return a is b


@dataclass
class Call:
    """How a block is called, minus its hidden states: other positional args and keywords."""

    hidden_in_kwargs: bool
    args: tuple
    kwargs: dict

    def invoke(self, block: nn.Module, hidden: Tensor) -> Tensor:
        if self.hidden_in_kwargs:
            out = block(*self.args, **{**self.kwargs, "hidden_states": hidden})
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return block_output(out)

    def same_as(self, other: Call) -> bool:
        if self.hidden_in_kwargs != other.hidden_in_kwargs:
            return False
        return _same((self.args, self.kwargs), (other.args, other.kwargs))


def block_output(out: Any) -> Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple/ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    hidden = getattr(out, "hidden_states", None) or getattr(out, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise ConfigError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


def _split(args: tuple, kwargs: dict) -> tuple[Tensor, Call]:
    kwargs = _strip_caches(dict(kwargs))
    if args and isinstance(args[0], Tensor):
        return args[0], Call(False, _strip_caches(tuple(args[1:])), kwargs)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        hidden = kwargs.pop("hidden_states")
        return hidden, Call(True, _strip_caches(tuple(args)), kwargs)
    raise ConfigError("the first block was called without a hidden-states tensor (first argument or hidden_states=)")


@dataclass
class BlockInputs:
    """Inputs of the current block for every calibration batch, and each block's calls.

    ``calls[b]`` is the first block's call for batch b. Blocks whose keywords differ from the
    first block's (e.g. sliding-window masks on some layers) get their own, recorded once per
    batch shape from a full forward pass (the keywords depend on shapes, not on token values,
    since calibration segments carry no padding).
    """

    hidden: list[Tensor]
    calls: list[Call]
    own_calls: dict[int, dict[tuple[int, ...], Call]] = field(default_factory=dict)

    def call(self, block_index: int, batch_index: int) -> Call:
        own = self.own_calls.get(block_index, {}).get(tuple(self.hidden[batch_index].shape[:2]))
        return self.calls[batch_index] if own is None else own


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_kwargs(model: nn.Module) -> dict[str, Any]:
    return {"use_cache": False} if _accepts(model, "use_cache") else {}


def _run_until_blocks(model: nn.Module, batch: Any, extra: dict[str, Any]) -> None:
    """One forward of a calibration batch (token ids, pixels, a dict of inputs, or (inputs, targets)).
    An encoder-decoder given token ids alone reads them on both sides (the decoder's blocks need
    inputs too), as a denoising model does."""
    inputs = model_inputs(batch)
    with blaming_inputs(inputs, "a calibration batch"):
        if isinstance(inputs, dict):
            model(**inputs, **extra)
        elif isinstance(inputs, Tensor) and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            model(input_ids=inputs, decoder_input_ids=inputs, **extra)
        else:
            model(inputs, **extra)


def capture_inputs(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[Any]) -> BlockInputs:
    """Run the model up to the first block for each calibration batch, recording its inputs.

    The first batch of each distinct shape runs through the whole model so every block's
    own call is seen; blocks called exactly like the first block share its calls.
    """
    hidden: list[Tensor] = []
    calls: list[Call] = []
    probes: dict[tuple, tuple[tuple[int, ...], dict[int, Call]]] = {}  # batch shape -> (hidden shape, calls)
    extra = _model_kwargs(model)

    for batch in batches:
        shape = _shape_key(batch)
        recorder = _Recorder(hidden, calls, probe=shape not in probes)
        handles = [b.register_forward_pre_hook(recorder.hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            with torch.no_grad():
                _run_until_blocks(model, batch, extra)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if recorder.probe:
            probes[shape] = (tuple(hidden[-1].shape[:2]), recorder.seen)
    return _with_own_calls(hidden, calls, probes, len(blocks))


class _Recorder:
    """Pre-hooks for one batch: keep the first block's inputs, and every block's call when probing."""

    def __init__(self, hidden: list[Tensor], calls: list[Call], probe: bool) -> None:
        self.hidden, self.calls, self.probe = hidden, calls, probe
        self.seen: dict[int, Call] = {}

    def hook(self, index: int):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h, call = _split(args, kwargs)
            if index == 0:
                self.hidden.append(h.detach())
                self.calls.append(_reuse(call, self.calls))
            self.seen[index] = call
            if not self.probe:
                raise _Stop

        return pre_hook


def _reuse(call: Call, previous: list[Call]) -> Call:
    """Share one Call object among batches called identically (masks can be large)."""
    if previous and previous[-1].same_as(call):
        return previous[-1]
    return call


def _with_own_calls(
    hidden: list[Tensor], calls: list[Call], probes: dict[tuple, tuple[tuple[int, ...], dict[int, Call]]], n_blocks: int
) -> BlockInputs:
    inputs = BlockInputs(hidden, calls)
    for shape, seen in probes.values():
        first = seen.get(0)
        for index in range(1, n_blocks):
            call = seen.get(index)
            if call is None:
                raise ConfigError(f"block {index} was not called in the forward pass; are the blocks run in order?")
            if first is not None and call.same_as(first):
                continue
            inputs.own_calls.setdefault(index, {})[shape] = call
    return inputs


def _shape_key(batch: Any) -> tuple:
    """Batches of one shape share their blocks' keyword arguments (masks, positions)."""
    inputs = model_inputs(batch)
    if isinstance(inputs, dict):
        return tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items() if isinstance(v, Tensor)))
    return tuple(inputs.shape) if isinstance(inputs, Tensor) else (type(inputs).__name__,)


def batched(segments: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, segments.shape[0], batch_size):
        yield segments[start : start + batch_size]
