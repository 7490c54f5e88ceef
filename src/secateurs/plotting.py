"""matplotlib for the library's figures: the non-interactive backend, a clear error without the
``plot`` extra, and PNGs written atomically (never over an existing file without ``overwrite``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; a :class:`ConfigError` naming the extra without it."""
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # a session that already plots keeps its backend
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plots need matplotlib: pip install 'secateurs[plot]'") from e
    return plt


def save_png(fig: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically) and close it."""
    plt = pyplot()
    fig.tight_layout()
    try:
        with atomic_path(path, overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return Path(path)
