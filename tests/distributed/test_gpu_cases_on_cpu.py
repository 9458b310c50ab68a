"""The GPU tests' cases (tests/gpu_cases.py) run on the CPU over gloo, so that they keep working
between the rare runs on a GPU machine: an API change in nemo_aot breaks them here first.

Same functions and checks as tests/gpu, on the CPU: bf16 here is CPU bf16 (compared with fp32 at
the GPU tests' bf16 tolerance), the checkpoint's streams are the CPU generator and the CPU RNG
tracker of nemo_aot's CPU execution support.
"""

import gpu_cases as cases
from multirank import run_multirank

TIMEOUT = 240


def test_scope_cases_bf16_against_fp32():
    results = run_multirank(cases.scope_runs, 2, args=(("fp32", "bf16"),), timeout=TIMEOUT)
    for runs in results:
        cases.check_scopes_differ(runs, world=2)
        for scope in cases.SCOPES:
            cases.check_scope(runs["bf16", scope], runs["fp32", scope], loss_tol=2e-2,
                              metric_tol=5e-2, grad_tol=5e-2)
    for scope in cases.SCOPES:  # every rank saw the same step
        cases.check_scope(results[1]["fp32", scope], results[0]["fp32", scope], loss_tol=0,
                          metric_tol=0, grad_tol=1e-12)


def test_gather_case():
    cases.check_gather(run_multirank(cases.gather_case, 2, timeout=TIMEOUT), "cpu")


def test_checkpoint_case(tmp_path):
    root = str(tmp_path / "ckpt")
    (saved,) = run_multirank(cases.checkpoint_case, 1, args=(root, "save"), timeout=TIMEOUT)
    (resumed,) = run_multirank(cases.checkpoint_case, 1, args=(root, "resume"), timeout=TIMEOUT)
    cases.check_checkpoint(saved, resumed)


def test_cpu_swap_case():
    (res,) = run_multirank(cases.cpu_swap_case, 1, timeout=TIMEOUT)
    cases.check_cpu_swap(res, "cpu")
