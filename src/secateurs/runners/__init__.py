"""The two runners of the one pipeline (see :mod:`secateurs.runner` for their declared traits)."""

from __future__ import annotations

from .blocks import BlockRunner
from .model import ModelRunner

__all__ = ["BlockRunner", "ModelRunner"]
