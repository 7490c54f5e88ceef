"""Recipes: YAML or JSON files whose keys are exactly :class:`PruneConfig`'s.

``prune(model, **load_recipe("r.yaml"))`` and ``Pruner(model, **load_recipe("r.yaml"))``
do what the file says; unknown keys and bad values are refused with the valid
choices, before any model is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .config import PruneConfig
from .errors import RecipeError


def parse_recipe(data: Any, source: str = "recipe", schema: Any = PruneConfig) -> dict[str, Any]:
    """Validate plain data as a recipe and return it as keyword arguments.
    ``schema`` is the config class whose strict ``from_dict`` checks it (e.g. ``LLMPruneConfig``)."""
    schema.from_dict(data, source)
    return dict(data)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; explicit keys may override merged ones
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise RecipeError(f"key(s) {twice} given twice in one object; keep one")
    return dict(pairs)


def load_recipe(path: str | os.PathLike, schema: Any = PruneConfig) -> dict[str, Any]:
    """Read and validate a ``.yaml``/``.yml``/``.json`` recipe (YAML via a safe loader: no tags run
    code, and a key given twice is an error rather than the last one silently winning)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        if kind == "JSON":
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        else:
            data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: tags never run code
    except RecipeError as exc:
        raise RecipeError(f"recipe {path}: {exc}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe {path} is not valid {kind}: {exc}") from exc
    return parse_recipe(data if data is not None else {}, str(path), schema)
