"""``secateurs prune MODEL``: prune by recipe and/or flags, write weights, masks and a report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..api import prune
from ..errors import ConfigError
from ..io import atomic_dir, refuse_existing
from ..masking import bake, save_masks
from ..recipes import load_recipe, parse_recipe
from . import llm_prune
from .models import call_factory, input_shape, is_factory, load_model

_FLAGS = ("method", "sparsity", "pattern", "allocation", "mode", "iterations", "seed", "max_batches")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and save it", description=__doc__)
    p.add_argument("model", help="'package.module:factory' (returns an nn.Module) or a Hugging Face directory")
    p.add_argument("--weights", help="safetensors weights to load into a factory-built model")
    p.add_argument("--recipe", help="YAML/JSON recipe; flags below override its keys")
    p.add_argument("--method")
    p.add_argument("--sparsity", type=float)
    p.add_argument("--pattern", help="element | N:M (e.g. 2:4) | block:HxW | output_channel | input_channel")
    p.add_argument("--allocation", help="uniform | global | erk | lamp")
    p.add_argument("--mode", choices=("mask", "bake", "remove"), help="remove: structural (tensors really shrink)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-batches", dest="max_batches", type=int)
    p.add_argument("--include", nargs="+", help="module-name globs to prune (re:REGEX for regexes)")
    p.add_argument("--exclude", nargs="+", help="module-name globs to leave alone")
    p.add_argument("--data", help="'package.module:function' returning an iterable of calibration batches")
    p.add_argument("--input-shape", type=input_shape, help="shape of one input, e.g. 1,8,8 (for SynFlow and MACs)")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    llm_prune.add_arguments(p)
    g = p.add_argument_group("structural removal (--mode remove --pattern channel, head, hidden, layer, head+channel)")
    g.add_argument("--round-to", dest="round_to", type=int, help="keep channel counts a multiple of this (e.g. 8)")
    g.add_argument("--max-ratio", dest="max_ratio", type=float, help="remove at most this fraction of any group")
    g.add_argument("--gqa", choices=("auto", "kv_groups", "query_heads"), help="how grouped-KV attention loses heads")
    p.set_defaults(run=run)


def recipe_from_args(args: argparse.Namespace) -> dict[str, Any]:
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


def run(args: argparse.Namespace) -> int:
    if args.mode != "remove" and llm_prune.wants_layerwise(args, is_factory(args.model)):
        return llm_prune.run(args)
    recipe = recipe_from_args(args)
    refuse_existing(Path(args.out), args.overwrite)  # before loading and pruning, not after
    model = load_model(args.model, args.weights)
    calibration = (
        call_factory(args.data, "--data") if args.data else _text_calibration(model, args) if args.calib else None
    )
    example = torch.zeros(1, *args.input_shape) if args.input_shape else None
    report = prune(model, **recipe, calibration=calibration, example_inputs=example)
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
    from ..masking import masked_targets

    if masked_targets(model):
        save_masks(model, path)
