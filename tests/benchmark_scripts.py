"""Import a script of benchmarks/ as a module, for the smoke tests of the benchmarks."""
import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str, module_name: str | None = None):
    """``benchmarks/<name>.py`` as the module ``module_name`` (default ``name``), registered in ``sys.modules``
    (its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(module_name or name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
