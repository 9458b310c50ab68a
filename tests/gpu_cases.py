"""What the GPU tests run on each rank, written once for any device.

``tests/gpu`` runs these functions through ``run_multirank(..., device="cuda")`` (NCCL, model
and batches on the rank's GPU) and compares them with the same functions run on the CPU over
gloo in fp32, the reference. ``tests/distributed/test_gpu_cases_on_cpu.py`` runs them on the CPU
in CI, so an API change in nemo_aot breaks them there, not first on a lent GPU machine.

Every function runs inside a multi-rank worker and returns CPU tensors and plain numbers. Heavy
imports stay inside functions (spawned ranks import this module).
"""

from __future__ import annotations

import torch

import mcore_utils as mu
from multirank import rank_device

SCOPES = ("micro", "data_parallel", "global")
VOCAB, PADDED_VOCAB = 250, 256
N_POS, N_NEG = 2, 3  # unpaired micro-batches with n != m
BETA = 1.0           # rewards of O(1): the surrogate's curvature separates the sort scopes
SFT_WEIGHT = 0.1     # the SFT term on the device too (its token count is exchanged per step)


def build(precision: str, model_cfg=mu.TINY, seed: int = 1234, distributed_optimizer=False):
    """A TP=1, PP=1 GPTModel on this rank's device wrapped in megatron DDP, as the model class
    does it: built on the CPU (layout-independent init), moved, then wrapped."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks

    parallel = ParallelConfig()
    initialize_model_parallel(parallel, model_cfg, seed=seed)
    config = to_transformer_config(model_cfg, parallel, precision, calculate_per_token_loss=False)
    (chunk,) = build_model_chunks(model_cfg, config)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                              average_in_collective=False,
                                              use_distributed_optimizer=distributed_optimizer),
        chunk.to(rank_device()))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp, config


def bf16_rounded_state(model_cfg=mu.TINY) -> dict:
    """Initial weights that bf16 holds exactly (fp32 tensors), so fp32 and bf16 runs start from
    the same values and differ only in how they compute."""
    ddp, _ = build("fp32", model_cfg)
    return {k: v.detach().to(torch.bfloat16).float().cpu()
            for k, v in ddp.module.state_dict().items() if not k.endswith("_extra_state")}


def load(ddp, state: dict) -> None:
    missing, unexpected = ddp.module.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing,
                                                                                 unexpected)


def micro_batches(count: int = 2):
    """This data-parallel rank's micro-batches (different data on every rank)."""
    import torch.distributed as dist

    offset = 10 * dist.get_rank()
    return [mu.preference_rows(N_POS, N_NEG, seed=offset + i, vocab=VOCAB) for i in range(count)]


def step_runner(ddp, config, scope: str):
    from mcore_utils import PreferenceStep
    from nemo_aot.losses.config import AlignmentConfig

    return PreferenceStep([ddp], config, vocab_size=VOCAB, padded_vocab_size=PADDED_VOCAB,
                          alignment=AlignmentConfig(loss_type="aot_unpaired", sort_scope=scope,
                                                    beta=BETA, logprob_chunk_size=7,
                                                    sft_loss_weight=SFT_WEIGHT))


def grads(ddp) -> dict:
    return {name: p.main_grad.detach().float().cpu().clone()
            for name, p in ddp.module.named_parameters()}


# ---------------------------------------------------------------------------- sort scopes
def scope_runs(precisions=("fp32", "bf16")) -> dict:
    """Per (precision, scope): the step's metrics and this rank's reduced gradients."""
    state = bf16_rounded_state()
    batches = micro_batches()
    out = {}
    for precision in precisions:
        ddp, config = build(precision)
        load(ddp, state)
        for scope in SCOPES:
            metrics = step_runner(ddp, config, scope).step(batches).metrics
            out[precision, scope] = {"metrics": metrics, "grads": grads(ddp)}
    return out


def relative_error(got: dict, ref: dict) -> float:
    """||got - ref|| / ||ref|| over all tensors of two name -> tensor dicts."""
    assert got.keys() == ref.keys()
    num = sum(((got[k].double() - ref[k].double()) ** 2).sum() for k in ref)
    den = sum((ref[k].double() ** 2).sum() for k in ref)
    return float((num / den).sqrt())


# ---------------------------------------------------------------------------- all-gather
def gather_case() -> dict:
    """all_gather_with_grad on this device: uneven rows (rank 1 of 2 holds none), an empty input
    on every rank, several tensors in one call, bf16."""
    import torch.distributed as dist

    from nemo_aot.distributed.collectives import all_gather_list_with_grad, all_gather_with_grad

    dev, rank, world = rank_device(), dist.get_rank(), dist.get_world_size()
    rows = [(r * 2 + 1) % 3 for r in range(world)]  # 1, 0, 2, ...
    full = torch.arange(sum(rows) * 3, dtype=torch.float32, device=dev).reshape(-1, 3)
    start = sum(rows[:rank])
    x = full[start:start + rows[rank]].clone().requires_grad_()
    weights = torch.linspace(-1, 1, full.numel(), device=dev).reshape(full.shape)
    y = all_gather_with_grad(x)
    (y * weights).sum().backward()
    empty = torch.zeros(0, 3, device=dev, requires_grad=True)
    gathered_empty = all_gather_with_grad(empty)
    gathered_empty.sum().backward()
    a = torch.full((rank + 1,), float(rank), device=dev, requires_grad=True)
    b = torch.zeros(0, device=dev, requires_grad=True)
    ga, gb = all_gather_list_with_grad([a, b])
    (ga * 2).sum().backward()
    h = torch.full((2, 4), rank + 0.5, dtype=torch.bfloat16, device=dev, requires_grad=True)
    gh = all_gather_with_grad(h)
    gh.float().sum().backward()
    return {"device": str(y.device), "y": y.detach().cpu(), "full": full.cpu(),
            "x_grad": x.grad.cpu(),
            "expected_x_grad": (world * weights[start:start + rows[rank]]).cpu(),
            "empty": tuple(gathered_empty.shape), "empty_grad": tuple(empty.grad.shape),
            "ga": ga.detach().cpu(), "a_grad": a.grad.cpu(), "gb": tuple(gb.shape),
            "gh": gh.detach().float().cpu(), "gh_dtype": str(gh.dtype),
            "h_grad": h.grad.float().cpu()}


# ---------------------------------------------------------------------------- checkpoint
def checkpoint_case(root: str, phase: str, precision: str = "bf16") -> dict:
    """A resume across processes, as a requeued job does it. ``save``: train a step, checkpoint
    model, optimizer and RNG bundle the way a run does, then train one more step. ``resume`` (a
    fresh process): load the checkpoint and train that step again. Both report the weights at
    the checkpoint, the next draws of every RNG stream, and the step after it."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_aot.algorithms.checkpointing import (
        CheckpointManager,
        restore_rng_state,
        sharded_rng_state,
    )

    ddp, config = build(precision)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=precision == "bf16",
        params_dtype=config.params_dtype), [ddp])
    runner = step_runner(ddp, config, "micro")
    batches = micro_batches()

    def train_step():
        loss = runner.step(batches).metrics["loss"]
        optimizer.step()
        return loss

    def template(is_loading):
        model = ddp.module.sharded_state_dict()
        return {"model": model, "rng": sharded_rng_state(),
                "optimizer": optimizer.sharded_state_dict(model, is_loading=is_loading)}

    def weights():
        return {k: v.detach().cpu().clone() for k, v in ddp.module.state_dict().items()
                if not k.endswith("_extra_state")}

    manager = CheckpointManager(root, keep_last=1)
    if phase == "save":
        train_step()
        manager.save(1, lambda tmp: dist_checkpointing.save(template(False), tmp))
    else:
        torch.manual_seed(999)  # every stream away from the saved state
        tensor_parallel.model_parallel_cuda_manual_seed(999)
        state = dist_checkpointing.load(template(True), manager.latest_valid().path)
        ddp.module.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
    at_checkpoint = weights()
    dev = rank_device()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(4, device=dev).cpu()
    draws = (torch.rand(4), torch.rand(4, device=dev).cpu(), tracked)
    loss = train_step()
    return {"at_checkpoint": at_checkpoint, "draws": draws, "loss": loss, "after": weights()}


# ---------------------------------------------------------------------------- cpu_swap
def cpu_swap_case(precision: str = "bf16") -> dict:
    """The cpu_swap reference: weights held on the CPU, swapped in to score, swapped back."""
    from nemo_aot.models.reference import CpuSwapReference

    ddp, config = build(precision)
    runner = step_runner(ddp, config, "micro")
    batches = micro_batches()
    initial = [logps.cpu() for _, _, logps, _ in runner.score(batches)]
    swap = CpuSwapReference(runner.policy, length_normalize=False)
    with torch.no_grad():  # the policy moves away from the reference, as after an update
        for p in ddp.module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy = [p.detach().clone() for p in ddp.module.parameters()]
    reference = [mb["reference_logps"] for mb in swap.attach(batches)]
    current = [logps.cpu() for _, _, logps, _ in runner.score(batches)]
    return {"snapshot_devices": sorted({t.device.type for t in swap.reference}),
            "param_devices": sorted({str(p.device) for p in ddp.module.parameters()}),
            "policy_restored": all(torch.equal(p, q) for p, q in
                                   zip(ddp.module.parameters(), policy)),
            "initial": initial, "reference": reference, "current": current}


# ---------------------------------------------------------------------------- checks
# The assertions on what the functions above return, shared by the GPU tests and their CPU runs.
def check_scope(got: dict, ref: dict, loss_tol: float, metric_tol: float, grad_tol: float):
    import pytest

    assert got["metrics"].keys() == ref["metrics"].keys()
    assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], abs=loss_tol)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], abs=metric_tol), key
    for key in ("logps/chosen", "logps/rejected", "nll_loss"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=metric_tol), key
    error = relative_error(got["grads"], ref["grads"])
    assert error < grad_tol, f"relative gradient error {error:.2e}"


def check_scopes_differ(runs: dict, world: int):
    """Guard: the scopes give clearly different losses on this data, so a run that sorted in
    the wrong scope fails ``check_scope``."""
    losses = {scope: runs["fp32", scope]["metrics"]["loss"] for scope in SCOPES}
    assert abs(losses["global"] - losses["micro"]) > 0.1, losses
    if world > 1:
        assert abs(losses["data_parallel"] - losses["micro"]) > 0.1, losses


def check_gather(results: list, device_type: str):
    world = len(results)
    expected_a = torch.cat([torch.full((k + 1,), float(k)) for k in range(world)])
    expected_h = torch.cat([torch.full((2, 4), k + 0.5) for k in range(world)])
    for rank, res in enumerate(results):
        assert res["device"] == (f"cuda:{rank}" if device_type == "cuda" else "cpu")
        torch.testing.assert_close(res["y"], res["full"])
        torch.testing.assert_close(res["x_grad"], res["expected_x_grad"])
        assert res["empty"] == (0, 3) and res["empty_grad"] == (0, 3)
        torch.testing.assert_close(res["ga"], expected_a)
        torch.testing.assert_close(res["a_grad"], torch.full((rank + 1,), 2.0 * world))
        assert res["gb"] == (0,)
        assert res["gh_dtype"] == "torch.bfloat16"
        torch.testing.assert_close(res["gh"], expected_h)
        torch.testing.assert_close(res["h_grad"], torch.full((2, 4), float(world)))


def check_checkpoint(saved: dict, resumed: dict):
    import pytest

    for key, value in saved["at_checkpoint"].items():
        assert torch.equal(resumed["at_checkpoint"][key], value), key
    for a, b in zip(saved["draws"], resumed["draws"]):  # CPU, device, megatron tracker streams
        assert torch.equal(a, b)
    assert resumed["loss"] == pytest.approx(saved["loss"], rel=1e-6)
    # bf16 weights after one more Adam step (lr 1e-3): equal up to kernel nondeterminism
    for key, value in saved["after"].items():
        torch.testing.assert_close(resumed["after"][key], value, rtol=0, atol=3e-3,
                                   msg=lambda m, k=key: f"{k}: {m}")


def check_cpu_swap(res: dict, device: str):
    assert res["snapshot_devices"] == ["cpu"]
    assert res["param_devices"] == [device]
    assert res["policy_restored"]
    for initial, reference, current in zip(res["initial"], res["reference"], res["current"]):
        # the same forward code on the same weights: bitwise the initial scores
        assert torch.equal(reference.float(), initial.float())
        assert (current - initial).abs().max() > 1e-3  # the policy did move
