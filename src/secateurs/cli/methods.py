"""``secateurs methods``: every registered method, with what it needs and which modes and runners it supports."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list criteria, solvers, allocations, patterns ... and where they run",
                       description=__doc__)  # fmt: skip
    p.add_argument("--role", help="only one role: criterion, solver, allocation, pattern, granularity, mode, runner, "
                   "schedule, regularizer, handler")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..catalog import methods, table

    found = methods(args.role)
    print(json.dumps([m.to_dict() for m in found], indent=1) if args.json else table(found))
    return 0
