"""What the machine is and what the check's processes import, as JSON.

    python -m scripts.gpu_check.probe --out probe.json [--site DIR]     # on the GPU machine
    python -m scripts.gpu_check.probe --imports-without-torch            # Python 3.12 here

Run with the installed bundle on ``PYTHONPATH`` (run.sh does). The first form records the
Python, torch, CUDA and GPU, the version and origin of every package the check depends on,
whether the heavy imports work (and how long they take), and whether the bundle's ``nemo-aot``
entry point in ``--site``/bin starts. The second imports every top-level module of the
bundle's distributions on a machine without torch (the cp312 wheels' own check here): a failure
whose cause is the missing torch is expected, any other fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
import traceback

PACKAGES = ("torch", "transformers", "numpy", "megatron-core", "nemo-toolkit", "nemo-aot",
            "lightning", "pytorch-lightning", "hydra-core", "omegaconf", "pydantic",
            "typing-extensions", "transformer-engine", "apex", "triton", "liger-kernel", "trl",
            "datasets", "safetensors", "tokenizers", "pytest", "pytest-timeout")
MODULES = ("nemo_aot.cli", "nemo_aot.models.aot_model", "nemo_aot.algorithms.run",
           "nemo_aot.conversion.cli", "megatron.core.optimizer")


def _package(name: str) -> dict:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return {"version": None}
    return {"version": dist.version, "at": str(dist.locate_file(""))}


def _gpu() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2 ** 30, 1),
                                    "multiprocessors": p.multi_processor_count})
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        info["nvidia_smi"] = f"unavailable: {err}"
    return info


def _imports() -> dict:
    out = {}
    for module in MODULES:
        started = time.time()
        try:
            importlib.import_module(module)
            out[module] = {"ok": True, "seconds": round(time.time() - started, 2)}
        except Exception:  # noqa: BLE001 - recorded
            out[module] = {"ok": False, "error": traceback.format_exc()[-2500:]}
    return out


def _entry_point(site: str) -> dict:
    script = os.path.join(site, "bin", "nemo-aot")
    if not os.path.exists(script):
        return {"ok": False, "error": f"{script} missing"}
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    return {"ok": proc.returncode == 0, "rc": proc.returncode, "tail": proc.stderr[-1500:]}


def report(site: str | None) -> dict:
    started = time.time()
    out = {"python": sys.version.split()[0], "executable": sys.executable,
           "platform": platform.platform(), "cpus": os.cpu_count(),
           "pythonpath": os.environ.get("PYTHONPATH", ""),
           "packages": {name: _package(name) for name in PACKAGES}}
    out["gpu"] = _gpu()
    out["imports"] = _imports()
    if site:
        out["entry_point"] = _entry_point(site)
    out["seconds"] = round(time.time() - started, 1)
    out["ok"] = all(v["ok"] for v in out["imports"].values()) and \
        out.get("entry_point", {"ok": True})["ok"]
    return out


# Import names that differ from their distribution's name (for packages the machine has).
ALIASES = {"yaml": "pyyaml", "PIL": "pillow", "attr": "attrs", "dateutil": "python-dateutil",
           "google": "protobuf", "sklearn": "scikit-learn", "jwt": "pyjwt"}


def _on_the_machine() -> set[str]:
    """Import names of the packages the GPU machine has (target_packages.txt)."""
    names = set()
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "target_packages.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(line.split("==")[0].lower().replace("-", "_"))
    return names | {k for k, v in ALIASES.items() if v.replace("-", "_") in names}


def _missing(err: BaseException) -> str | None:
    """The top-level module whose absence caused ``err`` (following the exception chain)."""
    while err is not None:
        if isinstance(err, ModuleNotFoundError) and err.name:
            return err.name.partition(".")[0]
        err = err.__cause__ or err.__context__
    return None


def imports_without_torch() -> dict:
    """Import every top-level module of the distributions found on PYTHONPATH's first entry.
    A module may fail only for lack of something the GPU machine has (torch, pyyaml, ...): this
    Python has none of the machine's packages."""
    site = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    machine = _on_the_machine()
    tops = set()
    for dist in md.distributions(path=[site]):
        for file in dist.files or ():
            top = file.parts[0]
            if top.endswith(".py"):
                tops.add(top[:-3])
            elif "." not in top and not top.startswith("_") and top != "bin":
                tops.add(top)
    results = {}
    for top in sorted(tops):
        try:
            importlib.import_module(top)
            results[top] = "ok"
        except Exception as err:  # noqa: BLE001 - recorded
            missing = _missing(err)
            results[top] = (f"needs {missing} (on the machine)"
                            if missing and missing.lower() in machine else f"FAILED: {err!r}")
    return {"site": site, "python": sys.version.split()[0], "modules": results,
            "ok": bool(results) and not any(v.startswith("FAILED") for v in results.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON file (default: print)")
    p.add_argument("--site", help="the installed bundle (its bin/nemo-aot is started)")
    p.add_argument("--imports-without-torch", action="store_true")
    args = p.parse_args(argv)
    result = imports_without_torch() if args.imports_without_torch else report(args.site)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text if not args.out else f"probe: {'ok' if result['ok'] else 'FAILED'} -> {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
