"""Optional dependencies: import one, or fail with a single line naming the extra that installs it.

Standard library only, so that every layer (``core`` included) may use it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "require", "install_hint"]

#: Import name -> the distribution pip installs it from, where the two differ.
_DISTRIBUTIONS = {"yaml": "pyyaml", "lm_eval": "lm-eval", "sklearn": "scikit-learn", "PIL": "pillow"}


class MissingExtra(ImportError):
    """An optional package is not installed; the message says which extra installs it."""

    def __init__(self, module: str, extra: str, purpose: str | None = None) -> None:
        self.extra = extra
        super().__init__(f"{purpose or module} needs the optional package {_DISTRIBUTIONS.get(module, module)}: "
                         f"{install_hint(extra)}", name=module)


def install_hint(extra: str) -> str:
    """The command that installs ``extra``."""
    return f"pip install 'permsparse[{extra}]'"


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``), or raise :class:`MissingExtra`.

    ``purpose`` names what needs it in the message (default: the module). Only a module
    that is not installed becomes :class:`MissingExtra`; an installed package that fails
    to import for another reason raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise MissingExtra(missing.split(".")[0], extra, purpose or module) from err
        raise
