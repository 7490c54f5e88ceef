"""``secateurs`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import SecateursError
from . import demo, eval, prune, report
from .help import HelpParser

SUBCOMMANDS = (prune, eval, report, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = HelpParser(prog="secateurs", description="Prune PyTorch models and measure the result.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except SecateursError as exc:
        print(f"secateurs {args.command}: error: {exc}", file=sys.stderr)
        return 2
