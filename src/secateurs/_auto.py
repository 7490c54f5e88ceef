"""Register the variable-width configs with transformers' Auto classes once they exist.

``import secateurs`` imports no torch (the command line's ``--help`` stays fast), so the registration
of :mod:`secateurs.modeling_secateurs` cannot run at import. It runs as soon as transformers' Auto
config mapping (``transformers.models.auto.configuration_auto``) is loaded, whichever is imported
first: at once if it already is, otherwise from a one-shot import hook that runs after that module.
Then ``AutoModelForCausalLM.from_pretrained`` loads a model saved by
:func:`secateurs.hf_variable.save_pretrained_variable` without ``trust_remote_code``.

Registering costs nothing a user of transformers would not pay anyway:

- ``import transformers`` is lazy (no torch, no model code); the Auto mapping imports torch (about
  2.5 s here), so the hook waits for the mapping instead of running after ``import transformers``;
- building the variable-width classes imports every family's config and modeling modules (about 1 s
  more), so each family's ``model_type`` is registered with a placeholder class that builds and
  registers the real classes the first time anything is asked of it (``AutoConfig`` reading a saved
  ``config.json``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

#: The families :mod:`secateurs.modeling_secateurs` makes variable-width. That file must stay
#: self-contained (it is copied beside saved weights), so the list is repeated here; a test keeps both equal.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "opt", "gpt2")
PREFIX = "secateurs_"


class _Deferred(type):
    """Metaclass of the placeholder registered for a family: the first use of the placeholder (an attribute
    such as ``from_dict``, or a call) builds the real config class, registers it and the model class with
    the Auto classes in the placeholder's stead, and answers from it."""

    def real(cls) -> type:
        from . import modeling_secateurs

        try:
            config_class = modeling_secateurs.classes(cls.family)[0]
        except (AttributeError, ImportError) as exc:  # raised here, not as a missing attribute of the placeholder
            from .errors import ConfigError

            raise ConfigError(
                f"this transformers ({_version()}) cannot build the {cls.family!r} family a {cls.model_type!r} "
                f"model was saved from ({exc}); install the transformers version it was saved with"
            ) from exc
        return config_class  # classes() has registered it and its model class in the placeholder's stead

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls.real(), name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.real()(*args, **kwargs)


def register_now() -> None:
    """Register a placeholder per family; a failure (e.g. a broken transformers install) is a warning,
    never an import error."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

        for family in FAMILIES:
            if family not in CONFIG_MAPPING_NAMES or PREFIX + family in CONFIG_MAPPING:
                continue  # a family this transformers lacks; or registered already (the real classes stay)
            name = f"Deferred{family.capitalize()}Config"
            placeholder = _Deferred(name, (), {"family": family, "model_type": PREFIX + family,
                                               "__module__": __name__})  # fmt: skip
            globals()[name] = placeholder  # pickles by reference, as transformers' mapping pickles its classes
            CONFIG_MAPPING.register(PREFIX + family, placeholder)
    except Exception as exc:
        from .errors import SecateursWarning

        warnings.warn(
            f"secateurs could not register its variable-width model classes with transformers ({exc!r}); "
            "load such models with trust_remote_code=True",
            SecateursWarning,
            stacklevel=2,
        )


def _version() -> str:
    import transformers

    return getattr(transformers, "__version__", "unknown version")


AUTO_CONFIG = "transformers.models.auto.configuration_auto"


class _AfterAutoConfig(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of :data:`AUTO_CONFIG` to register after it ran."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != AUTO_CONFIG:
            return None
        sys.meta_path.remove(self)  # one shot, and the real finders answer below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            run(module)
            register_now()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    if AUTO_CONFIG in sys.modules:
        register_now()
    elif not any(isinstance(f, _AfterAutoConfig) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoConfig())
