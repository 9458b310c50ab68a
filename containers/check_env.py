"""Build- and run-time checks of a nemo_aot container image (stdlib + ``packaging`` only).

    python check_env.py snapshot --out base_versions.txt --constraints constraints.txt \
        [--include /etc/pip/constraint.txt]
    python check_env.py verify --snapshot base_versions.txt [--megatron-core 0.16.1]
        [--no-apex] [--allow-te-mismatch] [--allow-mcore-mismatch] [--gpu]

``snapshot`` runs before any ``pip install``: it records the versions of the packages the base
image owns (torch and its CUDA-built companions, TransformerEngine, apex) and writes a pip
constraints file that pins exactly those versions (after the lines of ``--include``, e.g. the
NGC image's own ``/etc/pip/constraint.txt``). ``verify`` runs after the installs and fails
(exit 1, one line per problem) when a guarded package changed or vanished, torch is not a CUDA
build, TE/apex/megatron-core/nemo/nemo_aot do not import, megatron-core is not the requested
version or not one nemo_aot supports, or TE is outside the range megatron-core declares for it.

Without a GPU driver (``docker build``), TransformerEngine may be unable to load its CUDA
library; that one failure is reported as a note and the import is re-checked with ``--gpu``
inside a job (``srun ... python /opt/nemo_aot/check_env.py verify --snapshot ... --gpu``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import os
import re
import sys
from typing import Iterable, Mapping, Optional

# Distributions the base image owns; pip must never replace them.
GUARDED = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton|apex|flash-attn"
                     r"|transformer-engine(-.*)?)$")
DRIVER_HINTS = ("libcuda", "cuda driver", "no cuda-capable device", "cudaGetDeviceCount")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """{canonical distribution name: version} of everything installed."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[_canonical(name)] = dist.version
    return found


def guarded_versions(installed: Mapping[str, str]) -> dict[str, str]:
    return {name: version for name, version in sorted(installed.items()) if GUARDED.match(name)}


def read_versions(path: str) -> dict[str, str]:
    versions = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, version = line.partition("==")
                versions[_canonical(name)] = version
    return versions


def changed_packages(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Problems for every guarded package that changed version or disappeared."""
    problems = []
    for name, version in sorted(before.items()):
        now = after.get(name)
        if now is None:
            problems.append(f"{name}=={version} from the base image was uninstalled")
        elif now != version:
            problems.append(f"{name} was replaced: base image {version}, now {now}")
    return problems


def te_requirement(requires: Iterable[str]) -> Optional[str]:
    """The TransformerEngine specifier megatron-core declares (its ``dev`` extra), if any."""
    from packaging.requirements import Requirement

    for line in requires or ():
        req = Requirement(line)
        in_dev = req.marker is None or req.marker.evaluate({"extra": "dev"})
        if _canonical(req.name) == "transformer-engine" and str(req.specifier) and in_dev:
            return str(req.specifier)
    return None


def te_in_range(te_version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    # Strip the local label (2.10.0+abc1234): NGC builds carry one; ranges never do.
    return SpecifierSet(specifier).contains(Version(te_version).public, prereleases=True)


def snapshot(args: argparse.Namespace) -> int:
    guarded = guarded_versions(installed_versions())
    if "torch" not in guarded:
        print("check_env: torch is not installed in the base image", file=sys.stderr)
        return 1
    with open(args.out, "w") as f:
        f.writelines(f"{name}=={version}\n" for name, version in guarded.items())
    with open(args.constraints, "w") as f:
        for path in args.include or ():
            with open(path) as base:
                f.write(f"# from {path}\n{base.read().rstrip()}\n")
        f.write("# pinned by nemo_aot: the base image's own builds\n")
        f.writelines(f"{name}=={version}\n" for name, version in guarded.items())
    for name, version in guarded.items():
        print(f"check_env: base image ships {name}=={version}")
    return 0


def _import(module: str, problems: list, notes: list, gpu: bool, what: str) -> Optional[object]:
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        text = f"{type(err).__name__}: {err}"
        if not gpu and any(h.lower() in text.lower() for h in DRIVER_HINTS):
            notes.append(f"{module} needs a GPU driver to import ({text.splitlines()[0]}); "
                         "re-check with --gpu inside a job")
        else:
            problems.append(f"{what}: import {module} failed: {text.splitlines()[0]}")
        return None


def verify(args: argparse.Namespace) -> int:
    problems: list[str] = []
    notes: list[str] = []
    installed = installed_versions()
    before = read_versions(args.snapshot)
    problems += changed_packages(before, guarded_versions(installed))

    torch = _import("torch", problems, notes, True, "torch")
    if torch is not None:
        if before.get("torch") and torch.__version__ != before["torch"]:
            problems.append(f"torch {torch.__version__} imports, the base image had {before['torch']}")
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is a CPU-only build")
        if args.gpu and not torch.cuda.is_available():
            problems.append("--gpu: torch.cuda.is_available() is False")
        if args.gpu and torch.cuda.is_available() and not torch.distributed.is_nccl_available():
            problems.append("--gpu: torch.distributed has no NCCL backend")

    te_version = installed.get("transformer-engine") or installed.get("transformer-engine-torch")
    if te_version is None:
        problems.append("TransformerEngine is not installed (the NGC PyTorch image ships it)")
    else:
        _import("transformer_engine.pytorch", problems, notes, args.gpu, "TransformerEngine")
    if args.require_apex:
        _import("apex", problems, notes, args.gpu, "apex (use --no-apex if the base lacks it)")
    core = _import("megatron.core", problems, notes, args.gpu, "megatron-core")
    if core is not None:
        problems += _check_megatron(installed.get("megatron-core", "?"), te_version, args)
    if _import("nemo.core", problems, notes, args.gpu, "nemo-toolkit") is not None:
        nemo_major = re.match(r"\d+", installed.get("nemo-toolkit", "0"))
        if int(nemo_major.group(0) if nemo_major else 0) < 2:
            problems.append(f"nemo-toolkit {installed.get('nemo-toolkit')}: nemo_aot needs >= 2.0")
    for module in ("nemo_aot.cli", "nemo_aot.launcher", "nemo_aot.algorithms.run"):
        _import(module, problems, notes, args.gpu, "nemo_aot")
    problems += _check_configs()

    for note in notes:
        print(f"check_env: note: {note}")
    for problem in problems:
        print(f"check_env: FAIL: {problem}", file=sys.stderr)
    if not problems:
        summary = ", ".join(f"{k} {installed[k]}" for k in
                            ("torch", "transformer-engine", "apex", "megatron-core", "nemo-toolkit")
                            if k in installed)
        print(f"check_env: OK ({summary})")
    return 1 if problems else 0


def _check_configs() -> list:
    """The installed package must carry conf/ (package data behind the nemo_aot/conf link)."""
    try:
        from nemo_aot.algorithms.config import find_config_dir

        found = os.path.isfile(os.path.join(find_config_dir(), "gpt_aot.yaml"))
    except Exception as err:  # noqa: BLE001 - reported as the finding
        return [f"nemo_aot: its conf/ directory is missing ({err})"]
    return [] if found else ["nemo_aot: conf/gpt_aot.yaml is missing from the installed package"]


def _check_megatron(version: str, te_version: Optional[str], args: argparse.Namespace) -> list:
    problems = []
    if args.megatron_core and version != args.megatron_core:
        problems.append(f"megatron-core {version} installed, {args.megatron_core} requested")
    try:
        from nemo_aot.distributed.cpu_support import SUPPORTED_MEGATRON_CORE
    except Exception:  # noqa: BLE001 - reported by the nemo_aot import check
        SUPPORTED_MEGATRON_CORE = ()
    major_minor = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if SUPPORTED_MEGATRON_CORE and major_minor not in SUPPORTED_MEGATRON_CORE \
            and not args.allow_mcore_mismatch:
        supported = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_MEGATRON_CORE)
        problems.append(f"megatron-core {version}: nemo_aot is written for {supported}.x "
                        "(--allow-mcore-mismatch to build anyway)")
    spec = te_requirement(metadata.requires("megatron-core") or ())
    if te_version and spec and not te_in_range(te_version, spec) and not args.allow_te_mismatch:
        problems.append(f"TransformerEngine {te_version} is outside the range megatron-core "
                        f"{version} declares ({spec}): pick the base image or MCORE_VERSION of "
                        "the matrix in containers/README.md (--allow-te-mismatch to build anyway)")
    return problems


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="check_env.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="record and pin the base image's torch/TE/apex")
    snap.add_argument("--out", required=True, help="versions file for verify --snapshot")
    snap.add_argument("--constraints", required=True, help="pip constraints file to write")
    snap.add_argument("--include", action="append", help="constraints file to prepend")
    snap.set_defaults(func=snapshot)
    ver = sub.add_parser("verify", help="fail if torch/TE/apex changed or imports fail")
    ver.add_argument("--snapshot", required=True, help="the file snapshot --out wrote")
    ver.add_argument("--megatron-core", default="", help="required megatron-core version")
    ver.add_argument("--no-apex", dest="require_apex", action="store_false",
                     help="do not require apex (for base images without it)")
    ver.add_argument("--allow-te-mismatch", action="store_true")
    ver.add_argument("--allow-mcore-mismatch", action="store_true")
    ver.add_argument("--gpu", action="store_true",
                     help="also require CUDA, NCCL and driver-dependent imports (run in a job)")
    ver.set_defaults(func=verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
