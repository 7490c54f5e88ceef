"""``secateurs report MODEL``: per-layer sparsity, MACs and size of a (pruned) model.

A structurally pruned output is read with its plan: ``secateurs report package.module:factory
--weights pruned/`` (a plain PyTorch model) or ``secateurs report pruned/`` (a Hugging Face one).
"""

from __future__ import annotations

import argparse

from .models import input_shape, load_model, plan_directory


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="report the sparsity of a model", description=__doc__)
    p.add_argument("model", help="'package.module:factory' or a model directory (Hugging Face, or written by prune)")
    p.add_argument(
        "--weights",
        help="safetensors weights for a factory-built model, or the output folder of a structural prune",
    )
    p.add_argument("--masks", help="masks.safetensors written by `secateurs prune`")
    p.add_argument(
        "--input-shape", type=input_shape, help="shape of one input without the batch, e.g. 1,8,8, to count MACs"
    )
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..io import refuse_existing
    from ..masking import load_masks
    from ..report import build_report
    from ..scope import ScopeSpec, resolve
    from ..structural import plan_of

    if args.json:
        from pathlib import Path

        refuse_existing(Path(args.json), args.overwrite)  # before loading, not after
    model = load_model(args.model, args.weights)
    if args.masks:
        load_masks(model, args.masks)
    targets = resolve(model, ScopeSpec(skip_first=False, skip_last=False, embeddings=True))
    example = torch.zeros(1, *args.input_shape) if args.input_shape else None
    report = build_report(model, targets, example_inputs=example)
    print(report.table())
    plan = plan_of(model)
    if plan is not None:
        where = plan_directory(args.weights) if args.weights else args.model
        print(f"structurally pruned: {len(plan.steps)} removal step(s) replayed from {where}/pruning_plan.json")
    if args.json:
        report.to_json(args.json, overwrite=args.overwrite)
    return 0
