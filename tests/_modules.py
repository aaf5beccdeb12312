"""Importing a script that is not part of a package (benchmarks/, launch/) by its file path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_file_module(name: str, path: Path) -> ModuleType:
    """Execute the Python file ``path`` as a module called ``name`` (registered in ``sys.modules``,
    which dataclasses defined in it look up) and return it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
