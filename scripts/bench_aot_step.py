"""The documented entry of the AOT step benchmark (benchmarks/aot_step/, its docstring says what
is compared and how):

    python scripts/bench_aot_step.py --shape tiny                               # CPU, ~1 minute
    python scripts/bench_aot_step.py --shape llama-1b --pairs 8 --seq 1024      # one GPU

is ``python -m benchmarks.aot_step ...`` from the repository root, runnable from anywhere.
"""

import importlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_main():
    """``benchmarks.aot_step.__main__.main``. Only nemo_aot is installed and Python puts this
    script's folder, not the repository root, on the import path, so the ``benchmarks`` package
    is loaded from its folder by name (the import path is left as it is)."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", os.path.join(ROOT, "benchmarks", "__init__.py"))
        sys.modules["benchmarks"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["benchmarks"])
    return importlib.import_module("benchmarks.aot_step.__main__").main


if __name__ == "__main__":
    sys.exit(benchmark_main()())
