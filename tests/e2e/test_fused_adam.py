"""`optim.fused_adam=true`: torch's fused AdamW kernel (the fallback megatron-core uses without
TE/apex; null turns it on on a GPU) trains the curve of the default optimizer, in one process
and with the distributed optimizer at DP2 (micro sort scope: the same objective at any DP)."""

import pytest

from conftest import history, run_cli, train_args

KEYS = ("loss", "rewards/chosen", "rewards/rejected", "grad_norm")


def _close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in KEYS:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)


def test_fused_adam_follows_the_default_optimizer(small_data, init_nemo, tmp_path):
    common = [f"init_from={init_nemo}", "alignment.sort_scope=micro"]
    run_cli(["train", *train_args(small_data, tmp_path / "default", *common)])
    proc = run_cli(["train", *train_args(small_data, tmp_path / "fused", *common,
                                         "optim.fused_adam=true")])
    assert "torch's fused AdamW kernel" in proc.stdout + proc.stderr
    _close(history(tmp_path / "fused"), history(tmp_path / "default"))
    dist = ["optim.fused_adam=true", "optim.use_distributed_optimizer=true"]
    proc = run_cli(["train", *train_args(small_data, tmp_path / "dp2", *common, *dist)],
                   nproc=2)
    assert "torch's fused AdamW kernel" in proc.stdout + proc.stderr
    _close(history(tmp_path / "dp2"), history(tmp_path / "default"))


def test_fused_adam_is_switched_on_only_where_asked():
    import torch

    from nemo_aot.algorithms.trainer import use_fused_adam

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW(params)
    assert use_fused_adam(opt, None) == []        # CPU parameters: null leaves it alone
    assert use_fused_adam(opt, False) == []
    (group,) = use_fused_adam(opt, True)
    assert group["fused"] and not group["foreach"]
    params[0].grad = torch.ones(3)
    opt.step()                                     # torch's fused kernel runs on CPU too
    assert torch.all(params[0] != 0)
