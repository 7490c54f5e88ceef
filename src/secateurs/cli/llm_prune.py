"""The LLM branch of ``secateurs prune``: a Hugging Face model pruned layer by layer.

``secateurs prune <hf-dir-or-hub-id> --method sparsegpt --sparsity 0.5 [--pattern 2:4]
--calib calib.txt --out DIR`` routes here (a Hugging Face model with ``--calib``, or a method
only the layerwise runner has). The output directory holds the compressed sparse checkpoint
(``--format hf``: the model as ``save_pretrained`` writes it, zeros in the weights; ``both``),
the config, the tokenizer, ``report.json`` and ``recipe.json`` (a valid ``LLMPruneConfig`` recipe).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import refuse_existing
from .threads import note_oversubscription

LAYERWISE_ONLY = ("sparsegpt", "shortgpt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layerwise LLM pruning (Hugging Face models with --calib)")
    g.add_argument("--calib", help="calibration text file; routes a Hugging Face model to the layerwise runner")
    g.add_argument("--nsamples", type=int, help="calibration segments (default 128)")
    g.add_argument("--seqlen", type=int, help="tokens per segment (default 2048, capped to the model's context)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="segments per forward pass (default 1)")
    g.add_argument("--owl", action="store_true", help="OWL outlier-weighted block sparsities (arXiv:2310.05175)")
    g.add_argument("--owl-m", dest="owl_m", type=float, help="OWL outlier threshold M (default 5)")
    g.add_argument("--owl-lambda", dest="owl_lambda", type=float, help="OWL sparsity spread lambda (default 0.08)")
    g.add_argument("--blocks", help="qualified name of the repeated blocks, e.g. model.layers (default: found)")
    g.add_argument("--dampening", type=float, help="SparseGPT dampening, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--blocksize", type=int, help="SparseGPT column block size (default 128)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    g.add_argument("--device", help="device to process each block on, e.g. cuda (default: the model's)")
    g.add_argument(
        "--format",
        choices=("hf", "compressed", "both"),
        help="what to save: compressed (default: sparse.safetensors, load with secateurs.export.load_pruned or "
        "secateurs eval), hf (save_pretrained: plain from_pretrained loads it), or both",
    )


def wants_layerwise(args: argparse.Namespace, is_factory: bool) -> bool:
    """A Hugging Face model with calibration text, or a method only the layerwise runner has."""
    if is_factory:
        return False
    return bool(args.calib) or args.method in LAYERWISE_ONLY or bool(args.owl)


def llm_recipe(args: argparse.Namespace) -> dict[str, Any]:
    from ..llm.config import LLMPruneConfig
    from ..recipes import load_recipe, parse_recipe
    from .prune import apply_scope_flags  # prune imports this module at load time

    for flag in ("mode", "iterations", "max_batches", "data", "weights", "input_shape", "allow_collapse"):
        if getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} does not apply to layerwise LLM pruning (--calib)")
    if args.allocation not in (None, "uniform", "owl", "global"):
        raise ConfigError(
            f"LLM pruning takes --allocation uniform, owl (--owl) or, for flap, global; not {args.allocation!r}"
        )
    recipe: dict[str, Any] = dict(load_recipe(args.recipe, LLMPruneConfig)) if args.recipe else {}
    for key in ("method", "sparsity", "pattern", "allocation", "seed", "nsamples", "seqlen", "batch_size"):
        if getattr(args, key, None) is not None:
            recipe[key] = getattr(args, key)
    for key in ("owl_m", "owl_lambda", "blocks"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    if args.owl:
        recipe["allocation"] = "owl"
    options = dict(recipe.get("method_options") or {})
    if args.dampening is not None:
        options["dampening"] = args.dampening
    if args.blocksize is not None:
        options["blocksize"] = args.blocksize
    if options:
        recipe["method_options"] = options
    apply_scope_flags(recipe, args)
    recipe.setdefault("method", "wanda")
    return parse_recipe(recipe, "command line", LLMPruneConfig)


def run(args: argparse.Namespace) -> int:
    from ..export import DEFAULT_FORMAT, save_pruned
    from ..hf import load_hf_model
    from ..llm import LLMPruneConfig, prune_llm
    from ..patterns import NM

    recipe = llm_recipe(args)
    config = LLMPruneConfig(**recipe)
    refuse_existing(Path(args.out), args.overwrite)  # before the long run, not after it
    if config.needs_calibration and not args.calib:
        raise ConfigError(f"method {config.method!r} needs calibration text: add --calib calib.txt")
    note_oversubscription()
    model = load_hf_model(args.model)
    tokenizer = _tokenizer(args.tokenizer or args.model)
    report = prune_llm(
        model,
        **recipe,
        calibration=args.calib,
        tokenizer=tokenizer,
        device=args.device,
    )
    print(report.table())
    files = {"report.json": report.to_json() + "\n", "recipe.json": json.dumps(config.to_dict(), indent=2) + "\n"}
    if config.structural:
        save_structural(model, args.out, tokenizer, files, args.overwrite)
        return 0
    pattern = config.pattern_ if isinstance(config.pattern_, NM) else None
    saved = save_pruned(
        model,
        args.out,
        tokenizer=tokenizer,
        format=args.format or DEFAULT_FORMAT,
        pattern=pattern,
        overwrite=args.overwrite,
        extra_files=files,
    )
    print(saved.summary())
    return 0


def save_structural(model: Any, out: str, tokenizer: Any, files: dict[str, str], overwrite: bool) -> None:
    """The structural module's directory (weights, pruning plan, config), plus tokenizer and report files;
    shared by both CLI paths."""
    from ..io import atomic_dir
    from ..structural import save_pruned

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_pruned(model, tmp, overwrite=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
    print(f"wrote {out} (structurally pruned: load it with secateurs.structural.load_pruned)")


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path!r}; pass --tokenizer DIR ({exc})") from exc
