"""Progress bars that appear only for work that takes more than a second."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Wrap ``items`` in a bar shown after one second (``delay``), on stderr."""
    if not enabled:
        yield from items
        return
    yield from tqdm(items, desc=description, total=total, delay=1.0, leave=False, dynamic_ncols=True)
