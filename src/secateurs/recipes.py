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


def load_recipe(path: str | os.PathLike, schema: Any = PruneConfig) -> dict[str, Any]:
    """Read and validate a ``.yaml``/``.yml``/``.json`` recipe (YAML via ``safe_load``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return parse_recipe(data if data is not None else {}, str(path), schema)
