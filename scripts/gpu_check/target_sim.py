"""Make this Python see only the packages a GPU machine will have: its own plus the bundle's.

The lent GPU machines have no network, so every package nemo_aot imports there must either be
pre-installed (``target_packages.txt``) or travel in the bundle. This module lets a CPU machine
that has *more* installed check that claim: once :func:`install` ran, importing a top-level
module that belongs to an installed distribution outside the allowed set raises
``ModuleNotFoundError``, and ``importlib.metadata`` / ``importlib.util.find_spec`` report such a
distribution as absent (optional-dependency probes then take the same branch as on the target).
The standard library and modules that belong to no installed distribution (the repository's
own, tests' helpers) are always allowed.

It is active in every process (spawned ranks included) run with the environment that
:func:`environment` returns: a generated ``sitecustomize`` first on ``PYTHONPATH`` and the
allowed distributions named in files (the machine's list, the bundle's manifest).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as md
import importlib.util
import os
import re
import sys

ENV = "GPU_CHECK_ALLOWED_DISTS"
BUNDLE_ENV = "GPU_CHECK_BUNDLE_DISTS"
# Requirements of *this* machine's newer versions of packages the target also has, which the
# target's versions do not use: huggingface_hub 2.x imports httpx2 (-> httpcore2 -> truststore)
# where the target's 1.33 uses httpx; pandas 3 here wants tzdata. Allowed so that the simulation
# fails only for what the bundle itself lacks.
VERSION_SKEW = {"httpx2", "httpcore2", "truststore", "tzdata"}
BLOCKED_LOG_ENV = "GPU_CHECK_BLOCKED_LOG"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: str) -> set[str]:
    """Distribution names of a list file: one a line, ``name`` or ``name==version``, # comments."""
    names = set()
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(normalize(re.split(r"[=<>!~ ]", line, maxsplit=1)[0]))
    return names


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, blocked: dict[str, str], shared: dict[str, str], log: str | None):
        self.blocked = blocked  # top-level module -> its (blocked) distribution
        self.shared = shared    # module of a namespace shared with allowed ones -> blocked dist
        self.log = log

    def owner(self, fullname: str) -> str | None:
        dist = self.blocked.get(fullname.partition(".")[0])
        if dist is None:
            parts = fullname.split(".")
            for i in range(len(parts), 1, -1):
                dist = self.shared.get(".".join(parts[:i]))
                if dist is not None:
                    break
        return dist

    def find_spec(self, fullname, path=None, target=None):
        dist = self.owner(fullname)
        if dist is None:
            return None
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{fullname} {dist}\n")
        raise ModuleNotFoundError(
            f"No module named {fullname!r} (target simulation: distribution {dist!r} is neither "
            f"on the GPU machine nor in the bundle)", name=fullname)


def _modules_of(dist) -> set[str]:
    """Dotted names of the packages and modules a distribution's files define."""
    names = set()
    for file in dist.files or ():
        parts = file.parts
        if not parts or parts[0] in ("..", "") or not parts[-1].endswith((".py", ".so", ".pyd")):
            continue
        stem = parts[-1].split(".", 1)[0]
        parts = parts[:-1] if stem == "__init__" else (*parts[:-1], stem)
        if parts:
            names.add(".".join(parts))
    return names


def install(allowed: set[str]) -> None:
    """Block every installed distribution whose normalized name is not in ``allowed``."""
    allowed = {normalize(n) for n in allowed}
    owners: dict[str, set[str]] = {}
    for top, dists in md.packages_distributions().items():
        owners.setdefault(top, set()).update(normalize(d) for d in dists)
    stdlib = set(sys.stdlib_module_names)
    blocked, shared = {}, {}
    for top, dists in owners.items():
        if top in stdlib or top.startswith("_distutils"):
            continue
        if not dists & allowed:
            blocked[top] = sorted(dists)[0]
        elif dists - allowed:
            # A namespace shared by allowed and blocked distributions (google.*, nv_one_logger.*):
            # block the blocked ones' own modules inside it.
            for dist in md.distributions():
                name = normalize(dist.metadata["Name"] or "")
                if name in dists - allowed:
                    for module in _modules_of(dist):
                        if module.partition(".")[0] == top and module != top:
                            shared[module] = name
    finder = _Blocker(blocked, shared, os.environ.get(BLOCKED_LOG_ENV))
    sys.meta_path.insert(0, finder)
    for name in list(sys.modules):
        if finder.owner(name):
            del sys.modules[name]

    hidden = {d for ds in owners.values() for d in ds} - allowed
    original_discover = md.Distribution.discover.__func__

    def discover(cls, **kwargs):
        for dist in original_discover(cls, **kwargs):
            name = dist.metadata["Name"] if dist.metadata else None
            if name is None or normalize(name) not in hidden:
                yield dist

    md.Distribution.discover = classmethod(discover)
    original_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        if not name.startswith(".") and finder.owner(name):
            return None
        return original_find_spec(name, package)

    importlib.util.find_spec = find_spec


def install_from_env() -> None:
    """``GPU_CHECK_ALLOWED_DISTS``: the machine's list; ``GPU_CHECK_BUNDLE_DISTS``: the bundle's."""
    path = os.environ.get(ENV)
    if path:
        bundle = os.environ.get(BUNDLE_ENV)
        install(read_names(path) | VERSION_SKEW | (read_names(bundle) if bundle else set()))


def environment(folder: str, bundle: str, root: str) -> dict[str, str]:
    """Environment variables that run a command under the simulation: ``folder`` receives the
    sitecustomize, the bundle's names and ``blocked.log`` (every blocked import attempt, optional
    ones included); ``bundle`` is a built bundle (its manifest.json) or a plan file
    (``build_bundle --plan`` output); ``root`` (the repository) goes on ``PYTHONPATH`` too."""
    import json

    os.makedirs(folder, exist_ok=True)
    manifest = os.path.join(bundle, "manifest.json") if os.path.isdir(bundle) else bundle
    with open(manifest) as f:
        names = sorted({m["name"] for m in json.load(f)["members"]})
    bundle_names = os.path.join(folder, "bundle_names.txt")
    with open(bundle_names, "w") as f:
        f.write("\n".join(names) + "\n")
    site = os.path.join(folder, "site")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write("from scripts.gpu_check import target_sim\ntarget_sim.install_from_env()\n")
    here = os.path.dirname(os.path.abspath(__file__))
    return {"PYTHONPATH": os.pathsep.join([site, root]),
            ENV: os.path.join(here, "target_packages.txt"), BUNDLE_ENV: bundle_names,
            BLOCKED_LOG_ENV: os.path.join(folder, "blocked.log")}
