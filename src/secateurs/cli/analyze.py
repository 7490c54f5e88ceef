"""``secateurs analyze MODEL --out DIR``: how much each layer, block or channel group can lose.

Prunes one target at a time over a grid of sparsities (the model restored exactly after each
cell), writes ``DIR/profile.json`` and ``DIR/profile.csv`` (and PNG plots with ``--plot``), and
prints the ranked table. Finished cells are kept in ``DIR/cells.jsonl`` as they finish, so a rerun
with the same arguments resumes an interrupted analysis. Use the profile to allocate:
``secateurs prune MODEL --profile DIR/profile.json [--budget latency=0.5] ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .models import call_object, input_shape, is_factory, load_model, sparsity_list
from .threads import add_threads_argument, apply_threads, note_oversubscription


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="measure each layer's sensitivity to pruning", description=__doc__)
    p.add_argument("model", help="'package.module:factory' (returns an nn.Module) or a Hugging Face directory")
    p.add_argument("--weights", help="safetensors weights to load into a factory-built model")
    p.add_argument("--method", default=None, help="pruning method per cell (default magnitude; wanda for an LLM)")
    p.add_argument(
        "--grid", type=sparsity_list, default=None, help="sparsities, e.g. 0.1,0.3,0.5,0.7,0.9 (default 0.1..0.95)"
    )
    p.add_argument(
        "--targets",
        choices=("layers", "blocks", "groups"),
        default=None,
        help="what is pruned alone: weight tensors, repeated blocks, or channel groups (removal)",
    )
    p.add_argument("--metric", choices=("loss", "perplexity", "accuracy"), default=None, help="what is measured")
    p.add_argument("--local", action="store_true", help="blocks: relative reconstruction error on captured inputs")
    p.add_argument("--pattern", help="element | N:M | block:HxW (masks) or channel | head (groups)")
    p.add_argument("--costs", default=None, help="comma-separated: params,macs,latency (latency: groups only)")
    p.add_argument("--include", nargs="+", help="module-name globs to analyse")
    p.add_argument("--exclude", nargs="+", help="module-name globs to leave out")
    p.add_argument("--data", help="'package.module:function' returning calibration batches (factory models)")
    p.add_argument("--calib", help="calibration text (Hugging Face language models)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration segments (LLMs, default 16)")
    p.add_argument(
        "--seqlen", type=int, default=256, help="tokens per segment (LLMs, default 256, capped to the model's context)"
    )
    p.add_argument("--input-shape", type=input_shape, help="shape of one input without the batch, e.g. 1,8,8")
    p.add_argument("--workers", type=int, default=1, help="cells in parallel (local processes or Ray tasks)")
    p.add_argument(
        "--backend",
        choices=("local", "processes", "ray"),
        default=None,
        help="where cells run (default: processes when --workers > 1)",
    )
    p.add_argument("--ray", action="store_true", help="= --backend ray")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--plot", action="store_true", help="also write curves.png and heatmap.png")
    add_threads_argument(p)
    p.add_argument("--out", required=True, help="output directory; an earlier analysis there is resumed")
    p.add_argument("--overwrite", action="store_true", help="start afresh in --out")
    p.set_defaults(run=run)


def _llm_batches(args: argparse.Namespace, model: Any) -> tuple[list, list]:
    from ..blocks import batched
    from ..calibration import model_context, sample_segments
    from ..errors import ConfigError
    from ..hf import load_tokenizer

    if not args.calib:
        raise ConfigError("a Hugging Face language model is analysed on text: pass --calib FILE")
    seqlen = min(args.seqlen, model_context(model) or args.seqlen)  # a short-context model's own limit
    segments = sample_segments(args.calib, load_tokenizer(args.model), args.nsamples, seqlen, seed=0)
    calibration = list(batched(segments, 4))
    return calibration, [{"input_ids": b, "labels": b} for b in calibration]


def run(args: argparse.Namespace) -> int:
    from ..analysis.cells import sensitivity
    from ..errors import ConfigError

    apply_threads(args)
    language_model = not is_factory(args.model)
    backend = "ray" if args.ray else args.backend or ("processes" if args.workers > 1 else "local")
    costs = tuple(c for c in (args.costs or "params,macs").split(",") if c)
    options: dict[str, Any] = {}
    if args.pattern:
        options["pattern"] = args.pattern
    if args.include or args.exclude:
        options["scope"] = {k: v for k, v in (("include", args.include), ("exclude", args.exclude)) if v}
    if args.data and language_model:
        raise ConfigError("--data feeds a factory-built model; a Hugging Face language model calibrates on --calib")
    note_oversubscription()
    model = load_model(args.model, args.weights)
    example = None
    if language_model:
        calibration, evaluation = _llm_batches(args, model)
        method, targets, metric = args.method or "wanda", args.targets or "blocks", args.metric or "perplexity"
        if targets == "blocks" and not args.local:
            options["runner"] = "blocks"
    else:
        import torch

        calibration = call_object(args.data, "--data") if args.data else None
        evaluation = None
        method, targets, metric = args.method or "magnitude", args.targets or "layers", args.metric or "loss"
        example = torch.zeros(1, *args.input_shape) if args.input_shape else None
    grid = args.grid if args.grid is not None else None
    profile = sensitivity(
        model,
        calibration,
        method=method,
        targets=targets,
        metric=metric,
        evaluation=evaluation,
        costs=costs,
        example_inputs=example,
        local=args.local,
        out=args.out,
        overwrite=args.overwrite,
        workers=args.workers,
        backend=backend,
        ray_address=args.ray_address,
        **({"sparsities": grid} if grid is not None else {}),
        **options,
    )
    print(profile.table())
    if args.plot:
        from ..analysis.plots import plot_curves, plot_heatmap

        plot_curves(profile, Path(args.out) / "curves.png", overwrite=True)
        plot_heatmap(profile, Path(args.out) / "heatmap.png", overwrite=True)
    print(f"wrote {Path(args.out) / 'profile.json'}")
    return 0
