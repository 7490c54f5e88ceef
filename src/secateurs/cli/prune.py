"""``secateurs prune MODEL``: prune by recipe and/or flags, write weights, masks and a report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..io import atomic_dir, refuse_existing
from . import llm_prune
from .help import lazy_help
from .models import call_object, is_factory, load_model
from .threads import add_threads_argument, apply_threads, note_oversubscription

if TYPE_CHECKING:
    import torch

# torch, the pipeline and safetensors are imported inside the functions that use them, so that
# `secateurs --help` (which builds this parser) does not pay seconds for importing torch.

_FLAGS = ("method", "sparsity", "pattern", "allocation", "mode", "iterations", "seed", "max_batches")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and save it", description=__doc__)
    p.add_argument("model", help="'package.module:factory' (returns an nn.Module) or a Hugging Face directory")
    p.add_argument("--weights", help="safetensors weights to load into a factory-built model")
    p.add_argument("--recipe", help="YAML/JSON recipe; flags below override its keys")
    lazy_help(p.add_argument("--method", metavar="NAME"), _method_help)
    p.add_argument(
        "--sparsity", type=float, help="fraction of the weights to remove, in [0, 1) (0.9 keeps 10%%); N:M implies it"
    )
    p.add_argument("--pattern", help="element | N:M (e.g. 2:4) | block:HxW | output_channel | input_channel")
    p.add_argument("--allocation", help="how sparsity is spread over layers: uniform | global | erk | lamp")
    p.add_argument("--mode", choices=("mask", "bake", "remove"), help="remove: structural (tensors really shrink)")
    p.add_argument(
        "--iterations", type=int, help="pruning rounds on an exponential schedule (default: the method's, SynFlow 100)"
    )
    p.add_argument("--seed", type=int, help="seeds every random choice: random scores, calibration segments (0)")
    p.add_argument("--max-batches", dest="max_batches", type=int, help="use at most this many calibration batches")
    p.add_argument("--include", nargs="+", help="module-name globs to prune (re:REGEX for regexes)")
    p.add_argument("--exclude", nargs="+", help="module-name globs to leave alone (a name covers its submodules)")
    p.add_argument("--data", help="'package.module:function' returning an iterable of calibration batches")
    p.add_argument("--input-shape", help="shape of one input without the batch, e.g. 1,8,8 (SynFlow, MACs, removal)")
    p.add_argument(
        "--allow-collapse",
        dest="allow_collapse",
        action="store_true",
        default=None,
        help="accept a layer pruned away entirely (refused by default: the model would compute a constant)",
    )
    add_threads_argument(p)
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    llm_prune.add_arguments(p)
    g = p.add_argument_group("structural removal (--mode remove --pattern channel, head, hidden, layer, head+channel)")
    g.add_argument("--round-to", dest="round_to", type=int, help="keep channel counts a multiple of this (e.g. 8)")
    g.add_argument("--max-ratio", dest="max_ratio", type=float, help="remove at most this fraction of any group")
    g.add_argument("--gqa", choices=("auto", "kv_groups", "query_heads"), help="how grouped-KV attention loses heads")
    p.set_defaults(run=run)


def _method_help() -> str:
    """The registered names, read when help is printed (importing the registry imports torch)."""
    from ..criteria import registry
    from ..llm.config import STRUCTURAL_METHODS
    from ..llm.methods import METHODS

    table = registry()
    masks = ", ".join(sorted(n for n, c in table.items() if not c.structural_only))
    structures = ", ".join(sorted(n for n, c in table.items() if c.structural_only))
    layerwise = ", ".join(sorted({*METHODS, *STRUCTURAL_METHODS}))
    return (
        f"pruning method (default: magnitude; wanda for layerwise LLM pruning). Any model: {masks}. "
        f"With --mode remove also: {structures}. Hugging Face LLMs with --calib (layerwise): {layerwise}"
    )


def recipe_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from ..recipes import load_recipe, parse_recipe

    recipe: dict[str, Any] = dict(load_recipe(args.recipe)) if args.recipe else {}
    for key in _FLAGS:
        value = getattr(args, key)
        if value is not None:
            recipe[key] = value
    structural = {k: getattr(args, k) for k in ("round_to", "max_ratio", "gqa") if getattr(args, k, None) is not None}
    if structural:
        recipe["structural"] = {**(recipe.get("structural") or {}), **structural}
    apply_scope_flags(recipe, args)
    return parse_recipe(recipe, "command line")


def apply_scope_flags(recipe: dict[str, Any], args: argparse.Namespace) -> None:
    """--include / --exclude override the recipe's scope globs."""
    if args.include or args.exclude:
        scope = dict(recipe.get("scope") or {})
        if args.include:
            scope["include"] = args.include
        if args.exclude:
            scope["exclude"] = args.exclude
        recipe["scope"] = scope


def _call(spec: str) -> Any:
    if not is_factory(spec):
        raise ConfigError(f"--data must be 'package.module:function', got {spec!r}")
    return call_object(spec, "calibration data function")


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from ..api import prune
    from ..masking import bake

    apply_threads(args)  # before torch does any work, on both paths
    if args.mode != "remove" and llm_prune.wants_layerwise(args, is_factory(args.model)):
        return llm_prune.run(args)
    recipe = recipe_from_args(args)
    refuse_existing(Path(args.out), args.overwrite)  # before loading and pruning, not after
    note_oversubscription()
    model = load_model(args.model, args.weights)
    calibration = _call(args.data) if args.data else _text_calibration(model, args) if args.calib else None
    example = torch.zeros(1, *map(int, args.input_shape.split(","))) if args.input_shape else None
    allow = bool(args.allow_collapse)
    report = prune(model, **recipe, calibration=calibration, example_inputs=example, allow_collapse=allow)
    print(report.table())
    if recipe.get("mode") == "remove":
        return _write_structural(model, report, args)
    tokenizer = _tokenizer_if_any(model, args)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        save_masks_if_any(model, tmp / "masks.safetensors")
        bake(model)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "report.json").write_text(report.to_json() + "\n")
        (tmp / "recipe.json").write_text(json.dumps(report.config, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


def _text_calibration(model: torch.nn.Module, args: argparse.Namespace) -> list[torch.Tensor]:
    """``--calib FILE`` with ``--mode remove``: seeded segments of token ids, one per batch."""
    from ..calibration import DEFAULT_NSAMPLES, resolve_seqlen, sample_segments
    from .llm_prune import _tokenizer

    tokenizer = _tokenizer(args.tokenizer or args.model)
    seqlen = resolve_seqlen(model, args.seqlen)
    segments = sample_segments(args.calib, tokenizer, args.nsamples or DEFAULT_NSAMPLES, seqlen, args.seed or 0)
    return [s.unsqueeze(0) for s in segments]


def _tokenizer_if_any(model: torch.nn.Module, args: argparse.Namespace) -> Any:
    """A transformers model's tokenizer, to save beside it so the output directory is usable as is."""
    if not hasattr(model, "save_pretrained") or is_factory(args.model):
        return None
    try:
        return llm_prune._tokenizer(args.tokenizer or args.model)
    except ConfigError:  # a model without a tokenizer (vision, or weights only)
        return None


def _write_structural(model: torch.nn.Module, report: Any, args: argparse.Namespace) -> int:
    """Weights + pruning plan (+ save_pretrained with the updated config for transformers models)."""
    files = {"report.json": report.to_json() + "\n",
             "recipe.json": json.dumps(report.config, indent=2, default=str) + "\n"}  # fmt: skip
    llm_prune.save_structural(model, args.out, _tokenizer_if_any(model, args), files, args.overwrite)
    return 0


def save_masks_if_any(model: torch.nn.Module, path) -> None:
    from ..masking import masked_targets, save_masks

    if masked_targets(model):
        save_masks(model, path)
