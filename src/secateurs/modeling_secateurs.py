"""Variable-width transformers models: layers of different sizes (pruned heads, MLP channels, ranks).

This file is self-contained (it imports only torch and transformers) because secateurs copies it
beside the weights of every model it saves with per-layer sizes, and names it in ``config.json``'s
``auto_map``: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` then loads the
model on a machine without secateurs, as other variable-width models on the hub do. With secateurs
imported, :func:`register` has already told the Auto classes about these configs, so
``trust_remote_code`` is not needed.

A saved model is its base architecture (``LlamaForCausalLM``, ``GPT2LMHeadModel`` ...) built from the
config as usual, then reshaped by two tables of the config:

- ``secateurs_modules``: module path -> what it is now: ``{"type": "linear", "in", "out", "bias"}``,
  ``{"type": "conv1d", "nx", "nf"}`` (GPT-2), ``{"type": "lowrank", "in", "out", "rank", "bias"}``
  (two Linears, ``down`` then ``up``), ``{"type": "embedding", "num", "dim", "padding_idx"}``, or
  ``{"type": "params", "shapes": {name: shape}}`` (a norm whose parameters changed size);
- ``secateurs_attributes``: module path -> attributes whose values changed (head counts, split sizes);
  a list is restored as a tuple.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

PREFIX = "secateurs_"
#: base model_type -> its causal-LM class and config class in transformers
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
    "mistral": ("MistralForCausalLM", "MistralConfig"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig"),
    "opt": ("OPTForCausalLM", "OPTConfig"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config"),
}


class LowRankLinear(nn.Module):
    """``y = up(down(x))``, a rank-``rank`` Linear layer (the same keys as ``secateurs.lowrank.LowRankLinear``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _build(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    if kind == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    if kind == "lowrank":
        return LowRankLinear(spec["in"], spec["out"], spec["rank"], bias=spec["bias"])
    if kind == "conv1d":
        return transformers.pytorch_utils.Conv1D(spec["nf"], spec["nx"])
    if kind == "embedding":
        return nn.Embedding(spec["num"], spec["dim"], padding_idx=spec.get("padding_idx"))
    raise ValueError(f"unknown module type {kind!r} in secateurs_modules; is this file older than the model?")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def reshape(model: nn.Module, config: Any) -> None:
    """Give ``model`` (built from ``config`` as the base architecture) the saved per-layer sizes."""
    for name, spec in (getattr(config, "secateurs_modules", None) or {}).items():
        if spec["type"] == "params":
            module = model.get_submodule(name)
            for param, shape in spec["shapes"].items():
                old = getattr(module, param)
                new = torch.empty(shape, dtype=old.dtype, device=old.device)
                setattr(module, param, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            _replace(model, name, _build(spec))
    for name, attributes in (getattr(config, "secateurs_attributes", None) or {}).items():
        module = model.get_submodule(name)
        for key, value in attributes.items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)


def classes(family: str) -> tuple[type, type]:
    """The config and causal-LM classes of the variable-width form of ``family`` (e.g. ``'llama'``)."""
    if family in _CACHE:
        return _CACHE[family]
    base_model = getattr(transformers, FAMILIES[family][0])
    base_config = base_model.config_class
    config_name = f"Secateurs{base_config.__name__}"
    config_class = type(config_name, (base_config,), {"model_type": PREFIX + family, "__module__": __name__})
    config_class.__qualname__ = config_name

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        reshape(self, config)

    model_name = f"Secateurs{base_model.__name__}"
    model_class = type(model_name, (base_model,), {"config_class": config_class, "__init__": __init__,
                                                   "__module__": __name__})  # fmt: skip
    model_class.__qualname__ = model_name
    _CACHE[family] = (config_class, model_class)
    if __name__ == "secateurs.modeling_secateurs":  # the installed package (not a copy beside saved weights):
        _register(config_class, model_class)  # every class it builds is known to the Auto classes
    return config_class, model_class


def _register(config_class: type, model_class: type) -> None:
    transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    transformers.AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


_CACHE: dict[str, tuple[type, type]] = {}


def _family_of(name: str) -> str | None:
    for family, (model_name, config_name) in FAMILIES.items():
        if name in (f"Secateurs{model_name}", f"Secateurs{config_name}"):
            return family
    return None


def __getattr__(name: str) -> type:  # the classes config.json's auto_map names, made on first use
    family = _family_of(name) if name.startswith("Secateurs") else None
    if family is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    config_class, model_class = classes(family)
    return model_class if name == model_class.__name__ else config_class


def register(families: Any = None) -> None:
    """Tell ``AutoConfig`` and ``AutoModelForCausalLM`` about the variable-width classes (idempotent)."""
    for family in families or FAMILIES:
        try:
            config_class, model_class = classes(family)
        except (AttributeError, ImportError):  # an older transformers without this family
            continue
        _register(config_class, model_class)
