"""Save a transformers model whose layers differ in size so that plain ``from_pretrained`` loads it.

A standard config has one ``intermediate_size``, one head count, no ranks: a model pruned by FLAP
(heads and MLP channels per layer), factored to low rank (:mod:`secateurs.lowrank`), or both, does not
fit it. :func:`save_pretrained_variable` writes the weights as ``save_pretrained`` does and a
``config.json`` whose ``model_type`` is ``secateurs_<base>`` (``secateurs_llama``, ``secateurs_gpt2``
...) with the per-module sizes that differ from the base architecture, plus the self-contained
``modeling_secateurs.py`` named by ``auto_map``. Then:

- without secateurs: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``;
- with secateurs imported: plain ``AutoModelForCausalLM.from_pretrained(dir)`` (the classes are
  registered with the Auto classes when transformers loads, see ``secateurs/_auto.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, StateError, choices
from .io import atomic_dir

MODELING_FILE = "modeling_secateurs.py"
_SIMPLE = (bool, int, float, str)


def _remote() -> Any:
    """The modeling file as a module (it imports transformers, an optional dependency: only when used)."""
    from . import modeling_secateurs

    return modeling_secateurs


def supports(model: nn.Module) -> bool:
    """Is ``model`` a transformers model of a family :func:`save_pretrained_variable` can describe?"""
    if not hasattr(model, "save_pretrained"):
        return False
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    return model_type.removeprefix(_remote().PREFIX) in _remote().FAMILIES


def family_of(model: nn.Module) -> str:
    """The base ``model_type`` (``'llama'``, ``'gpt2'`` ...) of a transformers causal LM, or a refusal."""
    remote = _remote()
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    family = model_type.removeprefix(remote.PREFIX)
    if not supports(model):
        raise ConfigError(
            f"{type(model).__name__} (model_type {model_type!r}) has no variable-width form; supported model "
            f"types: {choices(remote.FAMILIES)}. Save it with secateurs.structural.save_structured instead"
        )
    return family


_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "layer_types")


def base_config(model: nn.Module, family: str) -> Any:
    """A config of the base family's class that the base architecture can be built from, without the
    variable-width tables: the model's own config, or, when removal left it unbuildable (GPT-2 with 3 heads
    of a 32-wide model), the unpruned config of its pruning plan with the current number of layers."""
    remote = _remote()
    config_class = getattr(remote.transformers, remote.FAMILIES[family][1])
    data = _plain(model.config.to_dict())
    try:
        _build_meta(model, family, config_class.from_dict(data))
        return config_class.from_dict(data)
    except (ValueError, AssertionError, RuntimeError) as exc:
        plan = model.__dict__.get("_secateurs_plan")
        if plan is None or "config" not in plan.base:
            raise StateError(
                f"the config of {type(model).__name__} does not build its own architecture ({exc})"
            ) from exc
        original = _plain(plan.base["config"])
        original.update({k: data[k] for k in _LAYER_COUNTS if k in data})
        return config_class.from_dict(original)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items()
            if not k.startswith(_remote().PREFIX) and k not in ("model_type", "auto_map", "architectures")}  # fmt: skip


def _build_meta(model: nn.Module, family: str, config: Any) -> nn.Module:
    base_class = getattr(_remote().transformers, _remote().FAMILIES[family][0])
    with torch.device("meta"):
        return base_class(config)


def _own_shapes(module: nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}


def _module_spec(name: str, module: nn.Module, ref: nn.Module | None) -> dict[str, Any] | None:
    kind = type(module).__name__
    if kind == "LowRankLinear":
        return {"type": "lowrank", "in": module.in_features, "out": module.out_features, "rank": module.rank,
                "bias": module.up.bias is not None}  # fmt: skip
    if ref is None:
        raise StateError(f"module {name!r} ({kind}) has no counterpart in the base architecture; cannot describe it")
    shapes = _own_shapes(module)
    if shapes == _own_shapes(ref):
        return None
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if kind == "Conv1D":
        return {"type": "conv1d", "nx": module.weight.shape[0], "nf": module.weight.shape[1]}
    if isinstance(module, nn.Embedding):
        return {"type": "embedding", "num": module.num_embeddings, "dim": module.embedding_dim,
                "padding_idx": module.padding_idx}  # fmt: skip
    if type(ref) is not type(module) or set(shapes) != set(_own_shapes(ref)):
        raise StateError(f"module {name!r} ({kind}) changed type or parameters; its sizes cannot be described")
    return {"type": "params", "shapes": shapes}


def _changed_attributes(module: nn.Module, ref: nn.Module) -> dict[str, Any]:
    changed = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        simple = isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value))
        if simple and vars(ref).get(key) != value:
            changed[key] = list(value) if isinstance(value, tuple) else value
    return changed


def variable_layout(model: nn.Module) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(base config, secateurs_modules, secateurs_attributes)``: what differs from the base architecture
    built from the base config (see ``modeling_secateurs.py``). Reads the model; changes nothing."""
    family = family_of(model)
    config = base_config(model, family)
    fresh = dict(_build_meta(model, family, config).named_modules())
    modules: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    rebuilt: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(r + ".") for r in rebuilt):
            continue
        ref = fresh.get(name)
        spec = _module_spec(name, module, ref)
        if spec is not None:
            modules[name] = spec
            if spec["type"] != "params":
                rebuilt.append(name)
                continue
        changed = _changed_attributes(module, ref) if ref is not None else {}
        if changed:
            attributes[name] = changed
    return config, modules, attributes


def write_variable(model: nn.Module, directory: Path, layout: tuple[Any, dict, dict] | None = None) -> None:
    """``save_pretrained`` into an existing (temporary) directory, then the variable-width config and code."""
    remote = _remote()
    family = family_of(model)
    config, modules, attributes = layout if layout is not None else variable_layout(model)
    model.save_pretrained(directory)
    config_file = directory / "config.json"
    data = json.loads(config_file.read_text())  # save_pretrained's extras (dtype, version), then the base config
    data.update(config.to_dict())
    config_class, model_class = remote.classes(family)
    data.update({
        "model_type": config_class.model_type, "architectures": [model_class.__name__],
        "auto_map": {"AutoConfig": f"modeling_secateurs.{config_class.__name__}",
                     "AutoModelForCausalLM": f"modeling_secateurs.{model_class.__name__}"},
        "secateurs_modules": modules, "secateurs_attributes": attributes,
    })  # fmt: skip
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (directory / MODELING_FILE).write_text(Path(remote.__file__).read_text())


def save_pretrained_variable(
    model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write ``model`` (any layer sizes) so ``AutoModelForCausalLM.from_pretrained(path)`` loads it:
    with ``trust_remote_code=True`` anywhere, without it once secateurs is imported. Atomic; an existing
    ``path`` is refused unless ``overwrite=True``. Everything is checked before a file is written."""
    layout = variable_layout(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_variable(model, tmp, layout)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)
