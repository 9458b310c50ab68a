"""pyproject.toml's version ranges say what was tested (README support matrix).

megatron-core is bounded above by the newest minor release this package was run with, and the
bound agrees with what the CPU support module checks at run time; torch's lower bound covers
SDPA's ``enable_gqa`` (torch 2.5). torch, TransformerEngine and apex get no upper bound: an NGC
container must keep its own builds.
"""

import os
import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI); the rule is the same on 3.10

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _requirements() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return {Requirement(d).name: Requirement(d) for d in deps}


def _upper_bounds(req: Requirement) -> list:
    return [s for s in req.specifier if s.operator in ("<", "<=", "==", "===", "~=")]


def test_megatron_core_is_bounded_above():
    spec = _requirements()["megatron-core"].specifier
    assert _upper_bounds(_requirements()["megatron-core"]), (
        f"megatron-core{spec} has no upper bound: a fresh install would take a release "
        "nobody ran; bound it by the newest tested minor release")


def test_megatron_core_range_matches_the_cpu_support_check():
    from nemo_aot.distributed.cpu_support import SUPPORTED_MEGATRON_CORE

    spec = _requirements()["megatron-core"].specifier
    for major, minor in SUPPORTED_MEGATRON_CORE:
        assert spec.contains(f"{major}.{minor}.0") and spec.contains(f"{major}.{minor}.9")
    major, minor = max(SUPPORTED_MEGATRON_CORE)
    assert not spec.contains(f"{major}.{minor + 1}.0"), (
        f"megatron-core{spec} admits {major}.{minor + 1}, which cpu_support refuses")
    major, minor = min(SUPPORTED_MEGATRON_CORE)
    assert minor == 0 or not spec.contains(f"{major}.{minor - 1}.9")
    # an NGC image that ships a pre-release of the oldest supported minor keeps it
    assert spec.contains(f"{major}.{minor}.0rc0", prereleases=True)


def test_torch_lower_bound_has_sdpa_enable_gqa():
    req = _requirements()["torch"]
    lower = [Version(s.version) for s in req.specifier if s.operator in (">=", ">")]
    assert lower and min(lower) >= Version("2.5"), (
        f"torch{req.specifier}: SDPA's enable_gqa (models/layer_specs.py) needs torch >= 2.5")


@pytest.mark.parametrize("name", ["torch", "transformer-engine", "apex"])
def test_container_packages_have_no_upper_bound(name):
    req = _requirements().get(name)
    if req is not None:
        assert not _upper_bounds(req), \
            f"{name}{req.specifier} could make pip replace an NGC container's build"


def test_readme_support_matrix_states_the_ranges():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    matrix = re.search(r"^## Support matrix\n(.*?)(?=^## )", readme, re.M | re.S).group(1)
    assert ">= 0.16, < 0.20" in matrix and ">= 2.5" in matrix


def test_triton_only_where_megatron_core_needs_it_and_unpinned():
    """megatron-core 0.18+ imports triton without declaring it; 0.17+ needs Python 3.12."""
    req = _requirements()["triton"]
    assert not req.specifier, f"triton{req.specifier} could replace an NGC image's build"
    assert req.marker is not None
    env = {"sys_platform": "linux", "platform_system": "Linux"}
    assert req.marker.evaluate({**env, "python_version": "3.12"})
    assert not req.marker.evaluate({**env, "python_version": "3.11"})
    assert not req.marker.evaluate({"sys_platform": "darwin", "python_version": "3.12"})


def test_python_3_12_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(project["requires-python"]).contains("3.12")
    assert "Programming Language :: Python :: 3.12" in project["classifiers"]
