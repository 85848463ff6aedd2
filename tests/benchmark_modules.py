"""Scripts under benchmarks/ imported by path, for the tests that check their parts (they are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(script: str, module_name: str) -> ModuleType:
    """benchmarks/<script>.py as module `module_name` (registered in sys.modules, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod
