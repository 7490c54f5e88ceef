"""``--threads``: how many CPU threads torch uses, and a note when the machine is oversubscribed."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: one per core); on a busy machine fewer threads can be much faster",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from ``--threads`` (checked first: no work starts on a bad value)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    import torch

    torch.set_num_threads(threads)


def note_oversubscription() -> None:
    """Say so when torch's threads and the machine's load exceed the cores; called once the arguments
    are validated, right before the long work, so an error is never preceded by a note."""
    import torch

    from ..threads import oversubscription

    note = oversubscription(torch.get_num_threads())
    if note:
        print(f"secateurs: note: {note}", file=sys.stderr)
