"""Attention heads and GQA groups as removable units: the one rule every attention handler shares."""

from __future__ import annotations

from typing import Any

from .trace import Trace


def head_units(t: Trace, name: str, heads: int, kv_heads: int) -> tuple[Any, Any]:
    """Classes of the query heads and of the KV heads (None: KV heads stay).

    ``kv_groups``: a unit is one KV head with its query heads; ``query_heads``: a unit is one query
    head, and every KV group loses the same number (rows), so the model stays a valid GQA model."""
    per_group = heads // kv_heads
    mode = t.options.get("gqa", "auto")
    if mode == "auto":
        mode = "query_heads" if per_group > 1 else "kv_groups"
    if mode == "kv_groups":
        units = t.source(name, f"{name}:heads", kv_heads, kind="head")
        return units.repeat_interleave(per_group), units
    return t.source(name, f"{name}:heads", heads, kind="head", rows=kv_heads), None
