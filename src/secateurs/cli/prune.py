"""``secateurs prune MODEL``: prune by recipe and/or flags, write the model, masks and a report.

One path for every model: the flags and the recipe build one configuration. A Hugging Face
language-model directory gets the LLM front door's defaults (:class:`~secateurs.llm.LLMPruneConfig`:
Wanda, zeros in the weights, the block runner, text calibration with ``--calib``); a
``package.module:factory`` model gets :class:`~secateurs.PruneConfig`'s (magnitude, masks, the
whole-model runner, batches from ``--data``). ``--runner`` / ``--mode`` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .help import lazy_help
from .models import call_object, input_shape, is_factory, load_model, sparsity_list
from .threads import add_threads_argument, apply_threads, note_oversubscription

# torch, the pipeline and safetensors are imported inside the functions that use them, so that
# `secateurs --help` (which builds this parser) does not pay seconds for importing torch.

_FLAGS = ("method", "sparsity", "pattern", "allocation", "mode", "solver", "runner", "iterations", "seed",
          "max_batches", "blocks", "nsamples", "seqlen", "batch_size")  # fmt: skip
_LLM_ONLY = ("nsamples", "seqlen", "batch_size")
_HF_ONLY = {
    "calib": "is text calibration for a Hugging Face language model (use --data for a factory)",
    "format": "chooses how a Hugging Face model is saved (a factory model is saved as safetensors)",
    "tokenizer": "tokenizes --calib text",
    "device": "moves each block of a Hugging Face model to the device while the block runner prunes it",
    "out_of_core": "reads a Hugging Face model's safetensors block by block",
}


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
    p.add_argument("--allocation", help="how sparsity is spread over layers: uniform | global | erk | lamp | owl")
    p.add_argument(
        "--mode",
        choices=("mask", "bake", "reconstruct", "remove"),
        help="reconstruct: a solver updates the surviving weights; remove: structural (tensors shrink)",
    )
    p.add_argument("--solver", help="sparsegpt | bias_compensation | none (reconstruct / remove modes)")
    p.add_argument(
        "--runner",
        choices=("model", "blocks"),
        help="model: the whole model at once; blocks: one repeated block at a time (default for LLMs)",
    )
    p.add_argument(
        "--iterations", type=int, help="pruning rounds on an exponential schedule (default: the method's, SynFlow 100)"
    )
    p.add_argument("--seed", type=int, help="seeds every random choice: random scores, calibration segments (0)")
    p.add_argument("--max-batches", dest="max_batches", type=int, help="use at most this many calibration batches")
    p.add_argument("--include", nargs="+", help="module-name globs to prune (re:REGEX for regexes)")
    p.add_argument("--exclude", nargs="+", help="module-name globs to leave alone (a name covers its submodules)")
    p.add_argument("--data", help="'package.module:function' returning an iterable of calibration batches")
    p.add_argument(
        "--input-shape",
        type=input_shape,
        help="shape of one input without the batch, e.g. 1,8,8 (SynFlow, MACs, removal)",
    )
    p.add_argument(
        "--allow-collapse",
        dest="allow_collapse",
        action="store_true",
        help="accept a layer pruned away entirely (refused by default: the model would compute a constant)",
    )
    add_threads_argument(p)
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--profile",
        help="a sensitivity profile (secateurs analyze): allocate by it; --allocation sensitivity without it "
        "measures one first (written to OUT/sensitivity_profile.json)",
    )
    p.add_argument(
        "--budget",
        type=_budget,
        help="with --profile or --allocation sensitivity: sparsity=S | params=N | macs=N | latency=RATIO",
    )
    p.add_argument(
        "--grid",
        type=sparsity_list,
        help="with --allocation sensitivity and no --profile: the sparsities the profile measures, e.g. "
        "0.3,0.5,0.7,0.9 (default 0.1..0.95)",
    )
    g = p.add_argument_group("language models (Hugging Face directories; text calibration)")
    g.add_argument("--calib", help="calibration text file, cut into seeded token segments")
    g.add_argument("--nsamples", type=int, help="calibration segments (default 128)")
    g.add_argument("--seqlen", type=int, help="tokens per segment (default 2048, capped to the model's context)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="segments per forward pass (default 1)")
    g.add_argument("--owl", action="store_true", help="OWL outlier-weighted layer sparsities (= --allocation owl)")
    g.add_argument("--owl-m", dest="owl_m", type=float, help="OWL outlier threshold M (default 5)")
    g.add_argument("--owl-lambda", dest="owl_lambda", type=float, help="OWL sparsity spread lambda (default 0.08)")
    g.add_argument(
        "--search",
        metavar="NAME",
        help="search the per-block sparsities (averaging --sparsity) before pruning: spdy (SPDY, scored by the "
        "calibration loss); writes the searched profile to OUT/search_profile.json",
    )
    g.add_argument(
        "--search-evaluations",
        dest="search_evaluations",
        type=int,
        help="with --search: candidate allocations scored, one forward pass over the calibration each (default 60)",
    )
    g.add_argument("--blocks", help="qualified name of the repeated blocks, e.g. model.layers (default: found)")
    g.add_argument("--dampening", type=float, help="SparseGPT dampening, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--blocksize", type=int, help="SparseGPT column block size (default 128)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    g.add_argument("--device", help="device to process each block on, e.g. cuda (default: the model's)")
    g.add_argument(
        "--out-of-core",
        dest="out_of_core",
        action="store_true",
        default=None,
        help="never load the whole model: read, prune and write one block at a time from its safetensors "
        "(resumable: run the same command again after an interruption); writes a sharded Hugging Face checkpoint",
    )
    g.add_argument(
        "--format",
        choices=("hf", "compressed", "both"),
        help="what to save for a Hugging Face model: compressed (default: sparse.safetensors, load it with "
        "secateurs.export.load_sparse or secateurs eval), hf (save_pretrained: plain from_pretrained loads it), "
        "or both",
    )
    s = p.add_argument_group("structural removal (--mode remove --pattern channel, head, hidden, layer, head+channel)")
    s.add_argument("--round-to", dest="round_to", type=int, help="keep channel counts a multiple of this (e.g. 8)")
    s.add_argument("--max-ratio", dest="max_ratio", type=float, help="remove at most this fraction of any group")
    s.add_argument("--gqa", choices=("auto", "kv_groups", "query_heads"), help="how grouped-KV attention loses heads")
    p.set_defaults(run=run)


def _budget(text: str) -> dict[str, float]:
    kind, _, value = text.partition("=")
    try:
        return {kind.strip(): float(value)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget takes KIND=VALUE (e.g. latency=0.5), got {text!r}") from None


def _method_help() -> str:
    """The registered names, read when help is printed (importing the registry imports torch). The
    configuration module imports everything that registers a method (the structural group criteria
    too), so the list does not depend on what else the process imported first."""
    from .. import config  # noqa: F401  (registration)
    from ..criteria import CRITERIA

    masks = ", ".join(sorted(n for n, c in CRITERIA.items() if "mask" in c.modes))
    structures = ", ".join(sorted(n for n, c in CRITERIA.items() if "mask" not in c.modes))
    return (
        f"pruning method (default: magnitude; wanda for a Hugging Face language model). Masks or zeros: {masks}. "
        f"Only with --mode remove: {structures}. `secateurs methods` says what each needs and where it runs"
    )


def recipe_from_args(args: argparse.Namespace, schema: Any) -> dict[str, Any]:
    """The recipe file, overridden by the flags, validated by ``schema`` (a config class)."""
    from ..errors import ConfigError
    from ..recipes import load_recipe, parse_recipe

    recipe: dict[str, Any] = dict(load_recipe(args.recipe, schema)) if args.recipe else {}
    for key in _FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            if key in _LLM_ONLY and key not in schema.field_names():
                raise ConfigError(f"--{key.replace('_', '-')} applies to text calibration of a Hugging Face model")
            recipe[key] = value
    if args.owl:
        recipe["allocation"] = "owl"
    owl = {k: v for k, v in (("m", args.owl_m), ("lam", args.owl_lambda)) if v is not None}
    if owl:
        recipe["allocation_options"] = {**(recipe.get("allocation_options") or {}), **owl}
    if args.profile:
        recipe["allocation"] = "sensitivity"
        recipe["allocation_options"] = {**(recipe.get("allocation_options") or {}), "profile": args.profile}
    for flag, key in (("budget", "budget"), ("grid", "sparsities")):
        value = getattr(args, flag)
        if value is None:
            continue
        if recipe.get("allocation") != "sensitivity":
            raise ConfigError(
                f"--{flag} applies to a sensitivity allocation: pass --profile PROFILE.json or --allocation sensitivity"
            )
        recipe["allocation_options"] = {**(recipe.get("allocation_options") or {}), key: value}
    solver = {k: v for k, v in (("dampening", args.dampening), ("blocksize", args.blocksize)) if v is not None}
    if solver:
        recipe["solver_options"] = {**(recipe.get("solver_options") or {}), **solver}
    structural = {k: getattr(args, k) for k in ("round_to", "max_ratio", "gqa") if getattr(args, k, None) is not None}
    if structural:
        recipe["structural"] = {**(recipe.get("structural") or {}), **structural}
    if args.include or args.exclude:
        scope = dict(recipe.get("scope") or {})
        scope.update({k: v for k, v in (("include", args.include), ("exclude", args.exclude)) if v})
        recipe["scope"] = scope
    return parse_recipe(recipe, "command line", schema)


def run(args: argparse.Namespace) -> int:
    from ..analysis.measured import measures
    from ..api import prune
    from ..config import PruneConfig
    from ..errors import ConfigError
    from ..io import refuse_existing
    from ..llm import LLMPruneConfig, prune_llm

    apply_threads(args)  # before torch does any work
    language_model = not is_factory(args.model)
    schema = LLMPruneConfig if language_model else PruneConfig
    recipe = recipe_from_args(args, schema)
    config = schema(**recipe)
    refuse_existing(Path(args.out), args.overwrite)  # before loading and pruning, not after
    if not language_model:  # flags only the Hugging Face path reads would be silently ignored
        for flag, why in _HF_ONLY.items():
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag} {why}; it does not apply to a factory-built model ({args.model})")
    if args.data and language_model:
        raise ConfigError("--data feeds a factory-built model; a Hugging Face language model calibrates on --calib")
    _check_search(args, recipe, language_model)
    calibration = call_object(args.data, "--data") if args.data else None
    note_oversubscription()
    if args.out_of_core:
        return _run_out_of_core(args, recipe)
    model = load_model(args.model, args.weights)
    tokenizer = _tokenizer_if_any(args) if language_model else None
    allow = args.allow_collapse
    searched: dict[str, str] = {}
    if args.search:
        recipe, searched = _searched(model, recipe, args, tokenizer)
    measuring = measures(config)  # allocation 'sensitivity' without a profile: the run measures one
    if language_model:
        report = prune_llm(model, **recipe, calibration=args.calib, tokenizer=tokenizer, device=args.device,
                           allow_collapse=allow)  # fmt: skip
    else:
        import torch

        example = torch.zeros(1, *args.input_shape) if args.input_shape else None
        report = prune(model, **recipe, calibration=calibration, example_inputs=example, allow_collapse=allow)
    if not _writes(language_model):
        return 0  # under torchrun every rank pruned the same model; rank 0 writes it
    print(report.table())
    files = {"report.json": report.to_json() + "\n",
             "recipe.json": json.dumps(report.config, indent=2, default=str) + "\n", **searched}  # fmt: skip
    if measuring:  # the profile the run measured, to reuse with --profile
        profile = report.config["allocation_options"]["profile"]
        files["sensitivity_profile.json"] = json.dumps(profile, indent=1) + "\n"
    if config.application_.structural:
        save_structural(model, args.out, tokenizer, files, args.overwrite)
    else:
        _save_sparse(model, config, args, tokenizer, files)
    return 0


def _check_search(args: argparse.Namespace, recipe: dict[str, Any], language_model: bool) -> None:
    """Refuse a search the run cannot do, before the model is loaded."""
    from ..errors import ConfigError
    from ..llm.search import SEARCHES

    if args.search is None:
        if args.search_evaluations is not None:
            raise ConfigError("--search-evaluations applies to --search spdy")
        return
    if args.search not in SEARCHES:
        raise ConfigError(f"--search must be one of {', '.join(SEARCHES)}, got {args.search!r}")
    if not language_model:
        raise ConfigError(
            f"--search {args.search} runs the block runner on a Hugging Face language model with --calib text; "
            f"for {args.model}, measure a profile with `secateurs analyze` and pass --profile"
        )
    flags = (("--profile", args.profile), ("--owl", args.owl), ("--out-of-core", args.out_of_core),
             ("--device", args.device))  # fmt: skip
    given = [flag for flag, on in flags if on]
    if recipe.get("allocation") is not None and not args.profile and not args.owl:
        given.append(f"allocation {recipe['allocation']!r}")
    if given:
        raise ConfigError(f"--search {args.search} chooses the per-block sparsities itself on this process's CPU; "
                          f"drop {' and '.join(given)}")  # fmt: skip
    if recipe.get("sparsity") is None:
        raise ConfigError(f"--search {args.search} needs the average sparsity to allocate: pass --sparsity, e.g. 0.7")
    if args.search_evaluations is not None and args.search_evaluations < 1:
        raise ConfigError(f"--search-evaluations must be an integer >= 1, got {args.search_evaluations}")
    if args.calib is None:
        raise ConfigError(f"--search {args.search} scores candidates on calibration text: pass --calib calib.txt")


def _searched(model: Any, recipe: dict[str, Any], args: argparse.Namespace, tokenizer: Any):
    """The recipe with the searched allocation, and the profile's file for the output directory."""
    from ..llm.search import search_allocation

    evaluations = args.search_evaluations if args.search_evaluations is not None else 60
    result = search_allocation(model, recipe, calibration=args.calib, tokenizer=tokenizer, search=args.search,
                               evaluations=evaluations)  # fmt: skip
    shares = " ".join(f"{s:.2f}" for s in result.sparsities.values())
    print(f"{args.search} search: block sparsities {shares}; calibration loss {result.loss:.4f} "
          f"(uniform {result.uniform_loss:.4f})")  # fmt: skip
    if result.uniform_loss <= result.loss:  # the search found nothing better than its baseline: do not use it
        print(f"{args.search} search: uniform allocation scored no worse than the searched one; pruning uniformly "
              "and writing no search profile", file=sys.stderr)  # fmt: skip
        return recipe, {}
    profile = result.profile.to_dict()
    recipe = {**recipe, "allocation": "sensitivity", "allocation_options": {"profile": profile}}
    return recipe, {"search_profile.json": json.dumps(profile, indent=2) + "\n"}


def _writes(language_model: bool) -> bool:
    """False on every rank but 0 of a distributed run (prune_llm started or joined its group)."""
    from ..distributed import detect

    group = detect() if language_model else None
    return group is None or group.writer


def _run_out_of_core(args: argparse.Namespace, recipe: dict[str, Any]) -> int:
    from ..errors import ConfigError
    from ..outofcore import prune_from_disk

    for flag in ("weights", "format"):
        if getattr(args, flag) is not None:
            raise ConfigError(
                f"--{flag} does not apply to --out-of-core, which writes a sharded Hugging Face checkpoint"
            )
    result = prune_from_disk(args.model, args.out, **recipe, calibration=args.calib, tokenizer=_tokenizer_if_any(args),
                             device=args.device, overwrite=args.overwrite)  # fmt: skip
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "layers"}))
    return 0


def _tokenizer_if_any(args: argparse.Namespace) -> Any:
    """A transformers model's tokenizer, to save beside it so the output directory is usable as is."""
    from ..errors import ConfigError
    from ..hf import load_tokenizer

    try:
        return load_tokenizer(args.tokenizer or args.model)
    except ConfigError:  # a model without a tokenizer (vision, or weights only)
        if args.calib or args.tokenizer:
            raise
        return None


def _save_sparse(model: Any, config: Any, args: argparse.Namespace, tokenizer: Any, files: dict[str, str]) -> None:
    """Masks (if any), then zeros baked in: a Hugging Face model as save_pretrained and/or the compressed
    checkpoint, any other model as safetensors."""
    from safetensors.torch import save_file

    from ..export.hf import DEFAULT_FORMAT, write_sparse
    from ..io import atomic_dir
    from ..masking import bake, masked_targets, save_masks
    from ..patterns import NM

    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        if masked_targets(model):
            save_masks(model, tmp / "masks.safetensors")
        bake(model)
        if hasattr(model, "save_pretrained"):
            pattern = config.pattern_ if isinstance(config.pattern_, NM) else None
            saved = write_sparse(model, tmp, tokenizer, args.format or DEFAULT_FORMAT, pattern)
        else:
            saved = None
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text)
    if saved is not None:
        print(saved.moved_to(args.out).summary())
    else:
        print(f"wrote {args.out}")


def save_structural(model: Any, out: str, tokenizer: Any, files: dict[str, str], overwrite: bool) -> None:
    """The structural module's directory (weights, pruning plan, config), plus tokenizer and report files."""
    from ..io import atomic_dir
    from ..structural import save_structured

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_structured(model, tmp, overwrite=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
    print(f"wrote {out} (structurally pruned: load it with secateurs.structural.load_structured)")
