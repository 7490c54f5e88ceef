"""Register the variable-width configs with transformers' Auto classes once transformers is imported.

``import secateurs`` imports no torch (the command line's ``--help`` stays fast), so the registration
of :mod:`secateurs.modeling_secateurs` cannot run at import. It runs as soon as transformers is
loaded, whichever is imported first: at once if transformers already is, otherwise from a one-shot
import hook that runs after transformers' own ``__init__``. Then ``AutoModelForCausalLM.from_pretrained``
loads a model saved by :func:`secateurs.hf_variable.save_pretrained_variable` without
``trust_remote_code``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any


def register_now() -> None:
    """Register; a failure (e.g. a broken transformers install) is a warning, never an import error."""
    try:
        from . import modeling_secateurs

        modeling_secateurs.register()
    except Exception as exc:
        from .errors import SecateursWarning

        warnings.warn(
            f"secateurs could not register its variable-width model classes with transformers ({exc!r}); "
            "load such models with trust_remote_code=True",
            SecateursWarning,
            stacklevel=2,
        )


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``transformers`` to register after it ran."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers":
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
    if "transformers" in sys.modules:
        register_now()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
