"""``secateurs report MODEL``: per-layer sparsity, MACs and size of a (pruned) model."""

from __future__ import annotations

import argparse

import torch

from ..masking import load_masks
from ..report import build_report
from ..scope import ScopeSpec, resolve
from .models import input_shape, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="report the sparsity of a model", description=__doc__)
    p.add_argument("model", help="'package.module:factory' or a Hugging Face directory")
    p.add_argument("--weights", help="safetensors weights for a factory-built model")
    p.add_argument("--masks", help="masks.safetensors written by `secateurs prune`")
    p.add_argument("--input-shape", type=input_shape, help="shape of one input, e.g. 1,8,8, to count MACs")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.weights)
    if args.masks:
        load_masks(model, args.masks)
    targets = resolve(model, ScopeSpec(skip_first=False, skip_last=False, embeddings=True))
    example = torch.zeros(1, *args.input_shape) if args.input_shape else None
    report = build_report(model, targets, example_inputs=example)
    print(report.table())
    if args.json:
        report.to_json(args.json, overwrite=args.overwrite)
    return 0
