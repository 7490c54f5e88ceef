"""Saving and loading structurally pruned models without pickled code.

A pruned model is saved as its weights (safetensors) plus ``pruning_plan.json``: the
steps that were applied, as plain data. Loading builds the *original* architecture
(from the saved base config for transformers models, or the model you construct),
replays the steps, and loads the weights strictly. Transformers models also get
``save_pretrained`` output with the updated config; when every layer has the same
shape, stock ``from_pretrained`` loads them too, and the plan records whether it can; when layers
differ (FLAP), a Llama-family or GPT-2 model is saved with per-layer sizes in ``config.json`` and a
modeling file, which ``from_pretrained`` loads as well (:mod:`secateurs.hf_variable`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import Tensor, nn

from .. import hf_variable
from ..errors import CheckpointError, StateError
from ..hf import require_transformers
from ..io import atomic_dir
from ..loading import load_safetensors, load_state_strict
from . import hf
from .apply import apply_steps
from .step import Step
from .surgery import Surgery

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
    """The model's plan, or a new one describing the unpruned model (taken now, before the first
    structural change alters its config). A new plan is attached to the model by
    :func:`record_step` only, once a step has really been applied: a removal that was refused
    and rolled back must leave no plan behind, or ``save_structured`` would write a "pruned" model
    nothing was removed from."""
    plan = plan_of(model)
    if plan is None:
        base: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
        if hf.is_hf(model):
            base = {"hf_class": type(model).__name__, "config": model.config.to_dict()}
        plan = PruningPlan(base)
    return plan


def record_step(model: nn.Module, plan: PruningPlan, step: Step) -> None:
    """Note an applied ``step`` in ``plan`` and make sure the model carries the plan."""
    plan.steps.append(step)
    model.__dict__["_secateurs_plan"] = plan


def save_structured(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``path/`` with the weights, the pruning plan and (transformers) ``config.json``."""
    plan = plan_of(model)
    if plan is None or not plan.steps:
        raise StateError("this model carries no pruning plan; prune it with mode='remove' first")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        data = plan.to_dict()
        if hf.is_hf(model):
            data["config_expressible"] = hf.config_expressible(model)
            # layers of different widths: a config.json + modeling file plain from_pretrained loads
            data["variable_width"] = not data["config_expressible"] and hf_variable.supports(model)
            if data["variable_width"]:
                hf_variable.write_variable(model, tmp)
            else:
                model.save_pretrained(tmp, **_save_format(model, data["config_expressible"]))
        else:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PLAN_FILE).write_text(json.dumps(data, indent=1) + "\n")
    return Path(path)


def _save_format(model: nn.Module, expressible: bool) -> dict[str, Any]:
    """transformers renames some tensors on save (fused MoE experts are written per expert) and maps them
    back only in ``from_pretrained``. A model its config cannot describe is only ever rebuilt by
    :func:`load_structured`, which replays the cuts onto the in-memory layout: save it under those names."""
    import inspect

    if expressible or "save_original_format" not in inspect.signature(model.save_pretrained).parameters:
        return {}
    return {"save_original_format": False}


def _stock_reload(path: Path, plan: PruningPlan) -> nn.Module:
    """A folder whose config describes the pruned model but whose tensor names transformers changed on
    save: stock ``from_pretrained`` maps them back (and is exact: the config expresses every shape)."""
    transformers = require_transformers()
    cls = getattr(transformers, str(plan.base.get("hf_class")), None)
    if cls is None:
        raise StateError(f"transformers has no model class {plan.base.get('hf_class')!r}")
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:  # from_pretrained only warns, and fills what is missing with random values
        raise CheckpointError(f"{path} does not reload exactly with {cls.__name__}.from_pretrained: {problems}")
    model.__dict__["_secateurs_plan"] = plan
    return model.eval()


def _renamed_on_save(path: Path, state: dict[str, Tensor], model: nn.Module) -> bool:
    try:
        expressible = bool(json.loads((path / PLAN_FILE).read_text()).get("config_expressible"))
    except (OSError, ValueError, AttributeError):
        return False
    return expressible and not set(state) <= set(model.state_dict())


def read_plan(path: str | os.PathLike) -> PruningPlan:
    file = Path(path) / PLAN_FILE
    try:
        data = json.loads(file.read_text())
    except OSError as exc:
        raise StateError(f"cannot read {file}: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); the saved model is corrupted") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a {type(data).__name__}, not a pruning plan")
    try:
        return PruningPlan.from_dict(data, str(file))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{file} is malformed ({problem}); the saved model is corrupted") from exc


def load_structured(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_structured`. Transformers models are built from the saved
    base config; for any other model pass a freshly constructed, unpruned ``model``.

    All or nothing: the plan and the weights are read and checked first, the steps and the
    weights are applied as one surgery, and on any error (a plan for another architecture,
    weights that do not fit) a given ``model`` is put back exactly as it was."""
    plan = read_plan(path)
    state = _read_weights(Path(path))
    if model is None:
        if "hf_class" not in plan.base:
            raise StateError(
                f"{path} holds a plain PyTorch model: construct the unpruned model ({plan.base.get('class')}) "
                "and pass it as load_structured(path, model=...)"
            )
        model = _build_hf(plan.base)
        if _renamed_on_save(Path(path), state, model):
            return _stock_reload(Path(path), plan)

    def load_weights(m: nn.Module, edit: Surgery) -> None:
        hf.sync_config(m, edit)
        # tensors transformers never saves (Marian's sinusoidal positions): the rebuilt model's own
        skipped = set(getattr(m, "_keys_to_ignore_on_save", None) or ())
        own = m.state_dict()
        fill = {k: own[k] for k in skipped if k in own and k not in state}
        load_state_strict(m, {**state, **fill}, f"weights in {path}")  # checked before a single tensor is written

    apply_steps(model, plan.steps, check=False, after=load_weights)
    model.__dict__["_secateurs_plan"] = plan
    return model.eval()


def _build_hf(base: dict[str, Any]) -> nn.Module:
    transformers = require_transformers()
    name = base.get("hf_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise StateError(f"transformers has no model class {name!r}; is the installed version older?")
    config = cls.config_class.from_dict(dict(base["config"]))
    return cls(config)


def _read_weights(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid weight index ({exc})") from exc
    else:
        files = [WEIGHTS_FILE]
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_safetensors(path / Path(name).name))  # a name, never a path out of the folder
    return state
