"""Saving and loading structurally pruned models without pickled code.

A pruned model is saved as its weights (safetensors) plus ``pruning_plan.json``: the
steps that were applied, as plain data. Loading builds the *original* architecture
(from the saved base config for transformers models, or the model you construct),
replays the steps, and loads the weights strictly. Transformers models also get
``save_pretrained`` output with the updated config; when every layer has the same
shape, stock ``from_pretrained`` loads them too, and the plan records whether it can.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, load_model, save_model
from torch import nn

from ..errors import StateError, StructureError
from ..io import atomic_dir
from . import hf
from .apply import apply_steps
from .step import Step

FORMAT = "secateurs.pruning_plan"
VERSION = 1
PLAN_FILE = "pruning_plan.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class PruningPlan:
    base: dict[str, Any]  # how to build the unpruned model: {'hf_class', 'config'} or {'class'}
    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "base": self.base, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> PruningPlan:
        if data.get("format") != FORMAT:
            raise StateError(f"{source} is not a secateurs pruning plan (format {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise StateError(f"{source} has plan version {data.get('version')}; this secateurs reads {VERSION}")
        return cls(dict(data["base"]), [Step.from_dict(s) for s in data["steps"]])


def plan_of(model: nn.Module) -> PruningPlan | None:
    return model.__dict__.get("_secateurs_plan")


def start_plan(model: nn.Module) -> PruningPlan:
    """The model's plan, created (with its unpruned description) before its first structural change."""
    plan = plan_of(model)
    if plan is None:
        base: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
        if hf.is_hf(model):
            base = {"hf_class": type(model).__name__, "config": model.config.to_dict()}
        plan = PruningPlan(base)
        model.__dict__["_secateurs_plan"] = plan
    return plan


def save_structured(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``path/`` with the weights, the pruning plan and (transformers) ``config.json``."""
    plan = plan_of(model)
    if plan is None:
        raise StateError("this model carries no pruning plan; prune it with mode='remove' first")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        data = plan.to_dict()
        if hf.is_hf(model):
            model.save_pretrained(tmp)
            data["config_expressible"] = hf.config_expressible(model)
        else:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PLAN_FILE).write_text(json.dumps(data, indent=1) + "\n")
    return Path(path)


def read_plan(path: str | os.PathLike) -> PruningPlan:
    file = Path(path) / PLAN_FILE
    try:
        return PruningPlan.from_dict(json.loads(file.read_text()), str(file))
    except OSError as exc:
        raise StateError(f"cannot read {file}: {exc}") from exc


def load_structured(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_structured`. Transformers models are built from the saved
    base config; for any other model pass a freshly constructed, unpruned ``model``."""
    plan = read_plan(path)
    if model is None:
        if "hf_class" not in plan.base:
            raise StateError(
                f"{path} holds a plain PyTorch model: construct the unpruned model ({plan.base.get('class')}) "
                "and pass it as load_structured(path, model=...)"
            )
        model = _build_hf(plan.base)
    apply_steps(model, plan.steps, check=False, after=hf.sync_config)
    model.__dict__["_secateurs_plan"] = plan
    if hf.is_hf(model):
        _load_hf_weights(model, Path(path))
    else:
        missing, unexpected = load_model(model, str(Path(path) / WEIGHTS_FILE), strict=False)
        if missing or unexpected:
            raise StructureError(f"weights in {path} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _build_hf(base: dict[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, base["hf_class"], None)
    if cls is None:
        raise StateError(f"transformers has no class {base['hf_class']!r}; is the installed version older?")
    config = cls.config_class.from_dict(dict(base["config"]))
    return cls(config)


def _load_hf_weights(model: nn.Module, path: Path) -> None:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_FILE]
    state = {}
    for name in files:
        state.update(load_file(str(path / name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensors[k]) for k in state if k in tensors}
    untied = [k for k in missing if id(tensors[k]) not in loaded]
    if untied or unexpected:
        raise StructureError(f"weights in {path} do not fit: missing {untied[:5]}, unexpected {unexpected[:5]}")
