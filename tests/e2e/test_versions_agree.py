"""Training, resuming and the demo under every supported megatron-core release follow the
baseline release's curves (the compatibility tier; skipped outside it - tests/compat/records.py).

The baseline release (0.16.1, the one CI runs) writes the init ``.nemo`` of a short training
run, the run with its checkpoints, and a short demo. Every other release then trains from that
``.nemo`` (written under 0.16.1) and must follow the baseline's curve within the parallel-layout
tolerances of test_train.py; resumes the baseline's run from its step-3 checkpoint to the same
curve; and runs the demo along the baseline demo's curve. Finally, under the baseline again
(``-k newer``), each newer release's run is resumed: it continues on that run's curve, or it is
refused with the reason (the checkpoint's marker names the megatron-core that wrote it).
"""

import os
import shutil
from pathlib import Path

import pytest

from compat import records
from conftest import history, make_init_nemo, run_cli, train_args

pytestmark = [records.ONLY_IN_THE_TIER, pytest.mark.xdist_group("versions_agree")]
CURVE_TOL = dict(rel=2e-3, abs=2e-4)  # test_train.py, parallel layouts
CURVE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "grad_norm")
RUN = ["trainer.max_steps=6", "checkpoint.save_interval=3", "trainer.val_check_interval=3"]
DEMO = ["trainer.max_steps=12", "trainer.val_check_interval=6", "checkpoint.save_interval=12",
        "logging.progress_bar=false", "logging.tensorboard=false"]


# ------------------------------------------------------------- training, resume, the demo
@pytest.fixture(scope="module")
def small_records(small_data, tmp_path_factory):
    """The baseline's init .nemo (written once, by the baseline) and the data, at one path
    for every release: a resumed run must name the data its checkpoint was trained on (a changed
    data.train_path is a config change the resume refuses)."""
    base = records.baseline()
    init = os.path.join(base, "init", "init.nemo")
    if records.is_baseline() and not os.path.exists(init):
        made = make_init_nemo(Path(base) / "init")
        assert str(made) == init
    data = os.path.join(records.RECORDS, "data")
    if not os.path.isdir(data):
        shutil.copytree(small_data, data)
    return data, init


def _curve_diff(got, ref):
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    worst = 0.0
    for a, b in zip(ref, got):
        for key in CURVE_KEYS:
            assert b[key] == pytest.approx(a[key], **CURVE_TOL), (a["step"], key)
            worst = max(worst, abs(b[key] - a[key]))
    return worst


def test_training_follows_the_baseline_and_resumes_its_checkpoint(small_records):
    data, init = small_records
    run_dir = os.path.join(records.folder(records.version()), "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_cli(["train", *train_args(data, run_dir, f"init_from={init}", *RUN)])
    if records.is_baseline():
        return
    ref_dir = os.path.join(records.baseline(), "run")
    records.record("train_curve_max_abs", _curve_diff(history(run_dir), history(ref_dir)))
    # The baseline's run, as if stopped right after its step-3 checkpoint, resumed here.
    resumed = os.path.join(records.folder(records.version()), "resumed_from_baseline")
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(ref_dir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "step_00000006"))
    os.remove(os.path.join(resumed, "aot_policy.nemo"))
    out = run_cli(["train", *train_args(data, resumed, f"init_from={init}", *RUN)])
    assert "resumed from" in out.stdout + out.stderr
    records.record("resume_baseline_ckpt_max_abs", _curve_diff(history(resumed), history(ref_dir)))


def test_demo_follows_the_baseline():
    out = os.path.join(records.folder(records.version()), "demo")
    shutil.rmtree(out, ignore_errors=True)
    run_cli(["demo", "--output-dir", out, *DEMO], timeout=900)
    if records.is_baseline():
        return
    records.record("demo_curve_max_abs",
            _curve_diff(history(out), history(os.path.join(records.baseline(), "demo"))))


def test_z_baseline_done():
    """Marks the baseline's records complete (last in this file's order)."""
    if records.is_baseline():
        Path(records.folder(records.BASELINE), "done").touch()


# ----------------------------------------------- newer checkpoints under the baseline (last)
def _newer_runs():
    root = records.RECORDS
    if not root or not os.path.isdir(root):
        return []
    only = os.environ.get("NEMO_AOT_COMPAT_NEWER")  # run.sh: the release just run
    return sorted(v for v in os.listdir(root)
                  if v != records.BASELINE and os.path.isdir(os.path.join(root, v, "run"))
                  and v == (only or v))


@pytest.mark.parametrize("version", _newer_runs() or ["none"])
def test_newer_checkpoint_resumes_or_is_refused_with_the_reason(version, small_records):
    if not records.is_baseline() or version == "none":
        pytest.skip("runs under the baseline, once newer releases have written runs")
    data, init = small_records
    src = os.path.join(records.RECORDS, version, "run")
    resumed = os.path.join(records.folder(records.BASELINE), f"resumed_from_{version}")
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(src, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "step_00000006"))
    os.remove(os.path.join(resumed, "aot_policy.nemo"))
    out = run_cli(["train", *train_args(data, resumed, f"init_from={init}", *RUN)], check=False)
    text = out.stdout + out.stderr
    if out.returncode == 0:
        assert "resumed from" in text
        worst = _curve_diff(history(resumed), history(src))
        records.record(f"resume_{version}_ckpt_max_abs", worst)
    else:
        assert f"written by megatron-core {version}" in text, text[-4000:]
        reason = text.split("could not be loaded: ")[-1].splitlines()[0]
        records.record(f"resume_{version}_ckpt", f"refused: {reason[:300]}")
