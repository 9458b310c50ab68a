"""Build the wheel bundle that ``run.sh`` installs on a lent GPU machine (it has no network).

    .venv/bin/python -m scripts.gpu_check.build_bundle             # -> .gpu_bundle/ (git-ignored)
    .venv/bin/python -m scripts.gpu_check.build_bundle --plan      # the plan as JSON, no network
    .venv/bin/python -m scripts.gpu_check.build_bundle --verify    # then check it (minutes)

The machine (``target_packages.txt``: Python 3.12, torch 2.11 + CUDA 13, transformers, numpy,
pyarrow, einops, sentencepiece, lightning, matplotlib, tensorboard, pytest ...) lacks what
``PLAN`` lists: each entry says who imports it. The list is the import closure of the check's
workloads (the GPU tests, ``nemo-aot train`` / ``convert``, the step benchmark) minus what the
machine has, found by running them under ``target_sim`` (which hides every other package);
``--verify`` repeats that. Versions are the ones installed here (the tested combination) unless
pinned. ``run.sh`` installs with ``--no-deps`` into a folder of its own: pip ignores the
machine's packages under ``--target`` and would otherwise fetch torch.

Bundle layout: ``wheels/`` (cp312 manylinux or pure wheels; antlr4-python3-runtime, an sdist,
built here; nemo_aot built from the working tree), ``requirements.txt`` (megatron-core 0.16),
``requirements-mcore019.txt`` (the same with megatron-core 0.19, the second pass),
``manifest.json`` (versions, sizes, sha256, why). Fails above ``--limit-mib`` (40).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(ROOT, ".gpu_bundle")
MCORE_SECOND = "0.19.2"  # the newest megatron-core 0.19.x on PyPI when this was written
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    why: str
    version: str | None = None  # None: the version installed here
    group: str = "main"         # main | bench (optional baseline) | mcore019 (second pass)
    sdist: bool = False         # no wheel on PyPI: build one here


PLAN = (
    Member("megatron-core", "the model engine (nemo_aot.models, .distributed)"),
    Member("nemo-toolkit", "nemo.core.ModelPT, the model class's base (models/aot_model.py)"),
    Member("hydra-core", "config composition (algorithms/config.py), imported by nemo.core"),
    Member("omegaconf", "configs (models/aot_model.py, nemo.core)"),
    Member("antlr4-python3-runtime", "omegaconf's interpolation grammar", sdist=True),
    Member("lightning", "imported by nemo.core; nemo-toolkit 3.0 pins lightning<=2.4.0 and the "
                        "machine's lightning follows its pytorch-lightning 2.6"),
    Member("nv-one-logger-core", "imported by nemo.lightning.one_logger_callback at import "
                                 "of nemo.core"),
    Member("nv-one-logger-training-telemetry", "nemo.lightning.one_logger_callback"),
    Member("nv-one-logger-pytorch-lightning-integration", "nemo.lightning.one_logger_callback"),
    Member("strenum", "nv-one-logger-core"),
    Member("overrides", "nv-one-logger-core"),
    Member("toml", "nv-one-logger-core"),
    Member("pydantic", "nv_one_logger.api.config (the machine has no pydantic)"),
    Member("pydantic-core", "pydantic"),
    Member("annotated-types", "pydantic"),
    Member("typing-inspection", "pydantic"),
    Member("typing-extensions", "pydantic 2.14 needs >= 4.16; the machine's version is unknown"),
    Member("liger-kernel", "the step benchmark's hf_liger baseline (issue 9's target; triton is "
                           "on the machine)", version="0.8.5", group="bench"),
    Member("megatron-core", "the second pass (megatron-core 0.19, Python >= 3.12)",
           version=MCORE_SECOND, group="mcore019"),
)
NEMO_AOT = "nemo-aot"  # built from the working tree, in every pass


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(member: Member) -> str:
    if member.version:
        return member.version
    try:
        return md.version(member.name)
    except md.PackageNotFoundError:
        raise SystemExit(f"{member.name} is not installed in this environment ({sys.executable})"
                         f": install the project's dependencies (make install) or pin a version "
                         f"in PLAN") from None


def plan() -> dict:
    """What the bundle holds, without touching the network."""
    members = [dict(name=m.name, version=resolved(m), group=m.group, why=m.why, sdist=m.sdist)
               for m in PLAN]
    members.append(dict(name=NEMO_AOT, version=_nemo_aot_version(), group="main",
                        why="this repository, built from the working tree", sdist=False))
    target = _target_names()
    return {"python": "3.12", "members": members, "target_packages": sorted(target)}


def _nemo_aot_version() -> str:
    with open(os.path.join(ROOT, "nemo_aot", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _target_names() -> set[str]:
    names = set()
    with open(os.path.join(HERE, "target_packages.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(normalize(line.split("==")[0]))
    return names


# ---------------------------------------------------------------------------- build
def _pip(*args: str) -> None:
    """pip, quietly: its output only when it fails (then CalledProcessError)."""
    cmd = [sys.executable, "-m", "pip", *args]
    print("+ pip", args[0], " ".join(a for a in args if "==" in a) or args[-1], flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)


def _download(specs: list[str], dest: str, python: str) -> None:
    tags = ["--python-version", python, "--implementation", "cp", "--abi",
            "cp" + python.replace(".", "")]
    for platform in PLATFORMS:
        tags += ["--platform", platform]
    _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", *tags, "-d", dest, *specs)


def _build_sdists(specs: list[str], dest: str) -> None:
    """Pure-Python sdists into py3-none-any wheels (the build runs on this Python)."""
    _pip("wheel", "--quiet", "--no-deps", "--no-binary=:all:", "-w", dest, *specs)


def _build_nemo_aot(dest: str) -> None:
    """nemo_aot as a wheel, from the files git would carry (tracked + untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    with tempfile.TemporaryDirectory(prefix="nemo_aot_src_") as src:
        for rel in files:
            if rel and os.path.isfile(os.path.join(ROOT, rel)) and \
                    (rel.startswith("nemo_aot/") or rel in ("pyproject.toml", "README.md")):
                os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, rel), os.path.join(src, rel))
        _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dest, src)


def _wheel_name(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return normalize(name), version


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _spec(member: dict) -> str:
    return f"{member['name']}=={member['version']}"


def build(out: str, python: str, limit_mib: float) -> dict:
    p = plan()
    wheels = os.path.join(out, "wheels")
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(wheels)
    first = [m for m in p["members"] if m["group"] in ("main", "bench") and m["name"] != NEMO_AOT]
    _download([_spec(m) for m in first if not m["sdist"]], wheels, python)
    _build_sdists([_spec(m) for m in first if m["sdist"]], wheels)
    _build_nemo_aot(wheels)
    requirements = [_spec(m) for m in first] + [f"{NEMO_AOT}=={_nemo_aot_version()}"]
    second = [_spec(m) for m in p["members"] if m["group"] == "mcore019"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _download(second, tmp, python)
        except subprocess.CalledProcessError as err:
            print(f"no {second} wheel for Python {python} ({err.stderr.strip().splitlines()[-1]})"
                  ": the bundle has no second pass")
            second = []
        for name in os.listdir(tmp):
            shutil.move(os.path.join(tmp, name), wheels)

    files = sorted(os.listdir(wheels))
    found = {_wheel_name(f): f for f in files}
    for spec in requirements + second:
        name, version = spec.split("==")
        if (normalize(name), version) not in found:
            raise SystemExit(f"the bundle lacks {spec} (wheels: {files})")
    _write_lines(os.path.join(out, "requirements.txt"), requirements)
    if second:
        replaced = {normalize(s.split("==")[0]) for s in second}
        _write_lines(os.path.join(out, "requirements-mcore019.txt"),
                     [s for s in requirements if normalize(s.split("==")[0]) not in replaced]
                     + second)
    members = []
    for m in p["members"]:
        file = found.get((normalize(m["name"]), m["version"]))
        path = os.path.join(wheels, file) if file else None
        members.append({**m, "file": file, "bytes": os.path.getsize(path) if path else None,
                        "sha256": _sha256(path) if path else None})
    manifest = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": python,
                "builder_python": sys.version.split()[0], "git": _git_state(),
                "members": members,
                "total_bytes": sum(os.path.getsize(os.path.join(wheels, f)) for f in files),
                "limit_bytes": int(limit_mib * 2 ** 20), "second_pass": bool(second)}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _git_state() -> dict:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    return {"head": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def report(manifest: dict, out: str) -> bool:
    print(f"\nbundle {out} for Python {manifest['python']}:")
    for m in manifest["members"]:
        size = f"{m['bytes'] / 2 ** 20:7.2f} MiB" if m["bytes"] else "    (none)"
        print(f"  {size}  {m['file'] or m['name'] + ' ' + m['version']}  [{m['group']}]")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    ok = total <= manifest["limit_bytes"]
    print(f"  total {total / 2 ** 20:.2f} MiB (limit {manifest['limit_bytes'] / 2 ** 20:.0f} MiB)"
          f": {'ok' if ok else 'TOO LARGE'}")
    return ok


# ---------------------------------------------------------------------------- verify
REHEARSAL = {"GPU_CHECK_BENCH_SHAPE": "tiny", "GPU_CHECK_BENCH_SEQ": "64",
             "GPU_CHECK_BENCH_PAIRS": "4 8"}


def verify(out: str, python312: str | None, limit_mib: float) -> bool:
    """1. Install the bundle with Python 3.12 as run.sh does and import its modules there.
    2. Rehearse run.sh on this CPU machine: a twin bundle for this Python, installed and used by
    every step under the target simulation (only the machine's packages and the bundle's are
    importable); the tiny benchmark shape; the GPU tests skip, everything else must pass."""
    from scripts.gpu_check import target_sim

    ok = True
    if python312:
        with tempfile.TemporaryDirectory(prefix="gpu_check_site_") as site:
            ok &= _step(f"install with {python312}",
                        ["bash", os.path.join(HERE, "run.sh"), "--install-only", site],
                        env={"GPU_CHECK_PYTHON": python312, "GPU_CHECK_BUNDLE": out})
            ok &= _step("import on Python 3.12", [python312, "-m", "scripts.gpu_check.probe",
                        "--imports-without-torch"], env={"PYTHONPATH": site})
    else:
        print("no Python 3.12 here: the cp312 install was not tried")
    with tempfile.TemporaryDirectory(prefix="gpu_check_rehearsal_") as tmp:
        twin = os.path.join(tmp, "bundle")
        build(twin, f"{sys.version_info.major}.{sys.version_info.minor}", limit_mib)
        env = target_sim.environment(os.path.join(tmp, "sim"), twin, ROOT)
        env = {**env, **REHEARSAL, "GPU_CHECK_PYTHONPATH_PREFIX": env.pop("PYTHONPATH"),
               "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_BUNDLE": twin}
        results = os.path.join(tmp, "out")
        _step("rehearsal of run.sh (CPU, simulated machine)",
              ["bash", os.path.join(HERE, "run.sh"), "--out", results, "--budget", "1500"], env)
        with open(os.path.join(results, "summary.txt")) as f:
            print(f.read())
        with open(os.path.join(results, "summary.json")) as f:
            steps = {s["name"]: s["status"] for s in json.load(f)["steps"]}
        second = os.path.exists(os.path.join(twin, "requirements-mcore019.txt"))
        expected = {name: "pass" for name in ("install_mcore016", "probe_mcore016",
                                              "pytest_mcore016", "train_check", "bench_p4",
                                              "bench_p8")}
        for name in ("install_mcore019", "probe_mcore019", "pytest_mcore019",
                     "train_check_mcore019"):
            expected[name] = "pass" if second else "skipped"
        wrong = {k: steps.get(k) for k, v in expected.items() if steps.get(k) != v}
        print(f"rehearsal: {'ok' if not wrong else f'unexpected step results {wrong}'}")
        ok &= not wrong
        blocked = os.path.join(tmp, "sim", "blocked.log")
        if os.path.exists(blocked):
            with open(blocked) as f:
                names = sorted({line.split()[1] for line in f if line.strip()})
            print(f"absent on the machine, probed by optional imports only: {names}")
    return ok


def _step(what: str, cmd: list[str], env: dict | None = None) -> bool:
    print(f"\n== {what}: {' '.join(cmd)}", flush=True)
    started = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}).returncode
    print(f"== {what}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in "
          f"{time.time() - started:.0f} s", flush=True)
    return rc == 0


def find_python312() -> str | None:
    """A working Python 3.12 with pip (pyenv's shims exist but fail unless 3.12 is selected)."""
    import glob

    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for candidate in [*candidates, shutil.which("python3.12")]:
        if candidate and subprocess.run([candidate, "-c", "import pip"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="bundle folder (default: .gpu_bundle)")
    p.add_argument("--python-version", default="3.12",
                   help="the target's Python (3.11 builds a bundle for a CPU rehearsal here)")
    p.add_argument("--limit-mib", type=float, default=40.0)
    p.add_argument("--plan", action="store_true", help="print the plan as JSON and stop")
    p.add_argument("--verify", action="store_true", help="after building, check the bundle")
    p.add_argument("--verify-only", action="store_true", help="check an existing bundle")
    p.add_argument("--python312", default=find_python312(),
                   help="a Python 3.12 for the install check (default: pyenv's or on PATH)")
    args = p.parse_args(argv)
    if args.plan:
        print(json.dumps(plan(), indent=1))
        return 0
    if not args.verify_only:
        manifest = build(args.out, args.python_version, args.limit_mib)
        if not report(manifest, args.out):
            return 1
    if args.verify or args.verify_only:
        python312 = args.python312 if args.python_version == "3.12" else None
        return 0 if verify(args.out, python312, args.limit_mib) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
