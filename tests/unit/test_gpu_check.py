"""The prepared GPU check (scripts/gpu_check/), as far as a CPU machine can run it.

* The bundle plan: everything the machine lacks, nothing that would replace its torch stack.
* The plan suffices: the check's workloads import (and the GPU tests collect) in a Python that
  sees only the machine's packages and the plan's (``target_sim``), and fail without one of them.
* A built bundle (``.gpu_bundle``, git-ignored; only when present, it needs the network to build)
  installs with Python 3.12 exactly as run.sh installs it on the machine: no torch, its modules
  import (save for what needs the machine's torch), sizes and checksums as its manifest says.
* The summary: failures and the megatron-core 0.19 breaks are reported.

The whole command runs on a CPU in ``python -m scripts.gpu_check.build_bundle --verify``
(a rehearsal of run.sh under the simulation, minutes).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLE = os.path.join(ROOT, ".gpu_bundle")
RUN_SH = os.path.join(ROOT, "scripts", "gpu_check", "run.sh")
# On the machine, but the bundle carries its own version (nemo-toolkit's lightning<=2.4.0 pin;
# pydantic's typing-extensions>=4.16 floor).
OVERRIDDEN = {"lightning", "typing-extensions"}
WORKLOAD_IMPORTS = ("nemo_aot.cli", "nemo_aot.models.aot_model", "nemo_aot.algorithms.run",
                    "nemo_aot.conversion.cli", "nemo_aot.algorithms.objective",
                    "megatron.core.optimizer", "megatron.core.dist_checkpointing")


def _python(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def plan():
    out = _python("-m", "scripts.gpu_check.build_bundle", "--plan")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_plan_carries_what_the_machine_lacks_and_never_its_torch(plan):
    groups = {}
    for m in plan["members"]:
        groups.setdefault(m["group"], {})[m["name"]] = m
    main = groups["main"]
    assert {"megatron-core", "nemo-toolkit", "hydra-core", "omegaconf", "antlr4-python3-runtime",
            "nemo-aot", "pydantic", "nv-one-logger-core"} <= set(main)
    assert main["megatron-core"]["version"].startswith("0.16.")
    assert groups["mcore019"]["megatron-core"]["version"].startswith("0.19.")
    assert main["antlr4-python3-runtime"]["sdist"]  # built into a wheel by the builder
    machine = set(plan["target_packages"])
    assert {"torch", "transformers", "numpy", "pyarrow", "einops", "sentencepiece"} <= machine
    names = {m["name"] for m in plan["members"]}
    assert names & machine == OVERRIDDEN
    assert not names & {"torch", "transformer-engine", "apex", "triton", "datasets"}
    assert all(m["why"] for m in plan["members"])


def _module(name):
    """A module of scripts/gpu_check, loaded from its file (they import nothing of the repo)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"gpu_check_{name}", os.path.join(ROOT, "scripts", "gpu_check", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def target_sim_module():
    return _module("target_sim")


def _run_simulated(target_sim, tmp_path, members, *args):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"members": members}))
    env = target_sim.environment(str(tmp_path / "sim"), str(plan_file), ROOT)
    return _python(*args, env=env)


def test_the_plan_suffices_for_the_workloads_on_the_machine(plan, target_sim_module, tmp_path):
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\nprint('imported')" \
        % (WORKLOAD_IMPORTS,)
    out = _run_simulated(target_sim_module, tmp_path, plan["members"], "-c", code)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-4000:]
    collected = _run_simulated(target_sim_module, tmp_path, plan["members"], "-m", "pytest",
                               "--collect-only", "-q", "-p", "no:cacheprovider", "tests/gpu")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "tests collected" in collected.stdout or "collected" in collected.stdout


def test_the_simulation_fails_without_a_planned_package(plan, target_sim_module, tmp_path):
    """Guard: the check above can fail (nemo-toolkit is not on the machine)."""
    members = [m for m in plan["members"] if m["name"] != "nemo-toolkit"]
    out = _run_simulated(target_sim_module, tmp_path, members, "-c",
                         "import nemo_aot.models.aot_model")
    assert out.returncode != 0
    assert "target simulation" in out.stderr or "nemo-toolkit" in out.stderr


def _python312():
    """A working Python 3.12 (pyenv's shims exist but fail unless 3.12 is selected)."""
    import glob

    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for candidate in [*candidates, shutil.which("python3.12")]:
        if candidate and subprocess.run([candidate, "-c", "import pip"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(not os.path.exists(os.path.join(BUNDLE, "manifest.json")),
                    reason="no bundle built here (python -m scripts.gpu_check.build_bundle)")
@pytest.mark.skipif(_python312() is None, reason="no Python 3.12 here")
def test_built_bundle_installs_like_on_the_machine(tmp_path):
    with open(os.path.join(BUNDLE, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["python"] == "3.12"
    total = 0
    for m in manifest["members"]:
        if m["file"] is None:
            continue
        path = os.path.join(BUNDLE, "wheels", m["file"])
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == m["sha256"], m["file"]
        total += os.path.getsize(path)
    assert total <= manifest["limit_bytes"] <= 40 * 2 ** 20
    site = tmp_path / "site"
    env = {"GPU_CHECK_PYTHON": _python312(), "GPU_CHECK_BUNDLE": BUNDLE}
    out = subprocess.run(["bash", RUN_SH, "--install-only", str(site)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    installed = {name.lower() for name in os.listdir(site)}
    assert {"megatron", "nemo", "nemo_aot", "hydra", "omegaconf", "pydantic_core"} <= installed
    assert not {"torch", "transformers", "numpy", "triton"} & installed
    probe = subprocess.run([_python312(), "-m", "scripts.gpu_check.probe",
                            "--imports-without-torch"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": str(site)})
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    modules = json.loads(probe.stdout)["modules"]
    assert modules["pydantic_core"] == "ok" and modules["megatron"] == "ok"


def test_summary_reports_failures_and_what_megatron_core_019_breaks(tmp_path):
    summarize = _module("summarize")
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "steps").mkdir(parents=True)
    out.mkdir()
    for name, status in (("install_mcore016", "pass"), ("pytest_mcore016", "pass"),
                         ("pytest_mcore019", "fail"), ("train_check", "timeout")):
        (work / "steps" / f"{name}.json").write_text(json.dumps(
            {"name": name, "status": status, "rc": 0, "seconds": 1, "timeout": 9, "note": ""}))
    case = '<testcase classname="tests.gpu.test_x" name="test_{0}" time="1">{1}</testcase>'
    fail = '<failure message="TypeError: bad kwarg">E   TypeError: bad kwarg</failure>'
    for p, body in (("mcore016", case.format("a", "") + case.format("b", "")),
                    ("mcore019", case.format("a", "") + case.format("b", fail))):
        (work / f"pytest_{p}.xml").write_text(f"<testsuites><testsuite>{body}</testsuite>"
                                              "</testsuites>")
    s = summarize.summarize(str(work), str(out), 12.0, "h100")
    assert not s["ok"] and "train_check" in s["not_passed"] and "bench_p4" in s["not_passed"]
    assert s["pytest"]["mcore016"]["passed"] == 2
    assert [b["test"] for b in s["mcore019_breaks"]] == ["tests.gpu.test_x::test_b"]
    assert "TypeError: bad kwarg" in (out / "summary.txt").read_text()
    assert json.loads((out / "summary.json").read_text())["gpu"]["tag"] == "h100"


def test_run_sh_parses():
    assert subprocess.run(["bash", "-n", RUN_SH]).returncode == 0
