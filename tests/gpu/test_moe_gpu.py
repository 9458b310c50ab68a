"""A mixture-of-experts step on one GPU (EP 1): a tiny Qwen3-MoE-shaped model (QK norm,
4 experts, top-2, load-balancing and z losses) trains one step in fp32 on the GPU with the
sequential experts of the local spec (the path CPU tests prove); the loss equals the CPU fp32
step's and the gradients are close. (The grouped GEMM of the TE spec is not in this check.)
Run: ``pytest -m gpu tests/gpu`` (part of ``scripts/gpu_check``)."""

import dataclasses

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MOE = dataclasses.replace(
    mu.TINY, num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
    qk_layernorm=True, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


def _step(ckpt_dir, save):
    from multirank import rank_device

    chunks, config = mu.setup(model_cfg=MOE, per_token_loss=False)
    if save:
        mu.save(chunks, ckpt_dir)
    else:
        mu.load(chunks, ckpt_dir)
    device = rank_device()
    batch = {k: v.to(device) for k, v in mu.global_batch().items()}
    total = mu.train_step(chunks, config, batch, num_microbatches=2)
    grads = {n: p.main_grad.detach().float().cpu().clone()
             for n, p in chunks[0].module.named_parameters()}
    return total.cpu(), grads


def test_moe_step_on_the_gpu_equals_the_cpu_step(tmp_path):
    ckpt = str(tmp_path / "init")
    (cpu_total, cpu_grads), = run_multirank(_step, 1, args=(ckpt, True), timeout=300,
                                            device="cpu")
    (gpu_total, gpu_grads), = run_multirank(_step, 1, args=(ckpt, False), timeout=300,
                                            device="cuda")
    torch.testing.assert_close(gpu_total, cpu_total, rtol=1e-4, atol=1e-4)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, rtol=1e-3, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
