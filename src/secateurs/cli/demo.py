"""``secateurs demo``: train, prune several ways, fine-tune and compare, on bundled digits."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the tour: digits CNN + MLP pruned several ways", description=__doc__)
    p.add_argument("--out", help="output directory (default: runs/demo-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data split, initialisation and training (0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.run import run_demo

    out = Path(args.out) if args.out else Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    run_demo(out, overwrite=args.overwrite, quick=args.quick, seed=args.seed)
    return 0
