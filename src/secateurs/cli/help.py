"""Help that reads well in a terminal and costs nothing until it is printed."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

_RST = re.compile(r"``(.+?)``|:\w+:`~?(.+?)`", re.DOTALL)


def plain(text: str | None) -> str | None:
    """Docstrings double as help: drop reStructuredText markup (````code````, ``:class:`X```)."""
    return None if text is None else _RST.sub(lambda m: m.group(1) or m.group(2), text)


def lazy_help(action: argparse.Action, fill: Callable[[], str]) -> argparse.Action:
    """Give ``action`` a help text that is computed only when help is printed (e.g. it needs the
    method registry, which imports torch)."""
    action.lazy_help = fill  # type: ignore[attr-defined]
    return action


class HelpParser(argparse.ArgumentParser):
    """Keeps the docstring's paragraphs, without RST markup; fills lazy help texts on demand.
    Subparsers are built with the same class (argparse's default for ``add_subparsers``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        for key in ("description", "epilog"):
            kwargs[key] = plain(kwargs.get(key))
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        for action in self._actions:
            fill = getattr(action, "lazy_help", None)
            if fill is not None:
                action.help = fill()
        return super().format_help()
