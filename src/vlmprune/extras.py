"""Optional integrations (matplotlib, accelerate, pyarrow, lmms-eval), imported only by the commands that need them.

A missing or broken extra is one clear error naming the install command; everything else keeps working.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from vlmprune.errors import MissingExtraError

__all__ = ["EXTRAS", "import_extra"]

# module -> (distribution, how to install it)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "pip install 'vlmprune[viz]'"),
    "accelerate": ("accelerate", "pip install 'vlmprune[eval]'"),
    "pyarrow": ("pyarrow", "pip install 'vlmprune[eval]'"),
    "lmms_eval": ("lmms-eval", "bash scripts/setup.sh (it installs lmms-eval without its heavy dependencies)"),
}


def import_extra(module: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or `MissingExtraError` saying `purpose` needs it and how to install it.

    `module` may be a submodule (`"pyarrow.parquet"`); its top-level package names the extra.
    """
    package = module.partition(".")[0]
    distribution, install = EXTRAS[package]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        problem = "is not installed" if importlib.util.find_spec(package) is None else f"fails to import ({error})"
        raise MissingExtraError(
            f"{purpose} needs {distribution}, which {problem}; install it with: {install}"
        ) from None
