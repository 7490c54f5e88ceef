"""``secateurs`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import SecateursError
from . import analyze, demo, dynamic, eval, methods, prune, report
from .help import HelpParser

SUBCOMMANDS = (prune, analyze, dynamic, eval, report, methods, demo)


DEBUG_FLAG = "--debug"


def build_parser() -> argparse.ArgumentParser:
    parser = HelpParser(prog="secateurs", description="Prune PyTorch models and measure the result.")
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help="show the full traceback of an error (accepted anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Every error secateurs raises on purpose, and every error of the
    environment (a read-only or full disk, a missing file), ends as one line on stderr and exit
    status 2; a traceback means a bug in secateurs, or was asked for with ``--debug``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv  # anywhere, so `secateurs prune ... --debug` works too
    args = build_parser().parse_args([a for a in argv if a != DEBUG_FLAG])
    try:
        return int(args.run(args) or 0)
    except (SecateursError, OSError) as exc:
        if debug:
            raise
        print(f"secateurs {args.command}: error: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"secateurs {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; an OS error says what failed on which file."""
    if isinstance(exc, OSError) and not isinstance(exc, SecateursError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{exc.strerror}: {where}" if where else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
