"""A mixture-of-experts policy trained by the CLI under expert parallelism (EP2 on two ranks,
the distributed optimizer): the router losses are logged beside the AOT loss, a run killed
(kill -9 of the launcher and both ranks) after its step-3 checkpoint and resumed matches the
uninterrupted run bit for bit, and the final .nemo
(saved under EP2) exports to Hugging Face Qwen3-MoE tensors whose transformers logits equal the
megatron model's."""

import json

import pytest
import torch

from conftest import curve, history, kill_job, run_cli, start_cli, train_args, wait_for

MOE = ["init_from=null", "model.num_layers=2", "model.qk_layernorm=true",
       "model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001",
       "parallel.expert_model_parallel_size=2", "optim.use_distributed_optimizer=true",
       "alignment.sort_scope=micro", "trainer.max_steps=6", "checkpoint.save_interval=3",
       "data.validation_path=null"]


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """The uninterrupted run, and the same run killed (kill -9 of the launcher and both ranks,
    as a preemption ends a job) after its step-3 checkpoint while step 5 or 6 is being
    computed, then resumed by the same command."""
    root = tmp_path_factory.mktemp("moe_e2e")
    ref_dir, run_dir = root / "ref", root / "run"
    run_cli(["train", *train_args(small_data, ref_dir, *MOE)], nproc=2, timeout=900)
    args = ["train", *train_args(small_data, run_dir, *MOE)]
    proc = start_cli(args, nproc=2)
    marker = run_dir / "checkpoints" / "step_00000003" / "COMPLETE.json"
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: marker.exists() and metrics.exists() and len(history(run_dir)) >= 4, proc,
             timeout=900)
    groups = kill_job(proc)
    assert len(groups) == 3, groups  # the launcher's and each rank's: all killed
    killed_at = [r["step"] for r in history(run_dir)]
    assert not (run_dir / "checkpoints" / "step_00000006").exists(), "finished before the kill"
    assert not (run_dir / "aot_policy.nemo").exists() and killed_at[-1] < 6, killed_at
    resumed = run_cli(args, nproc=2, timeout=900)
    return ref_dir, run_dir, resumed, killed_at


@pytest.mark.slow
@pytest.mark.xdist_group("moe_e2e")
def test_router_losses_are_logged_and_resume_is_exact(runs):
    ref_dir, run_dir, resumed, killed_at = runs
    print(f"killed with steps {killed_at} logged")
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref, got = history(ref_dir), history(run_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    keys = ("loss", "grad_norm", "moe/load_balancing_loss", "moe/z_loss")
    assert curve(got, keys) == curve(ref, keys)  # bit for bit
    for record in ref:
        # unscaled (no coefficient): balanced routing gives a load-balancing loss near 1
        assert 0.5 < record["moe/load_balancing_loss"] < 4.0
        assert record["moe/z_loss"] > 0


def _export_and_compare(nemo_path, out_dir):
    from safetensors.torch import save_file
    from transformers import Qwen3MoeForCausalLM

    from nemo_aot.conversion import moe
    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.conversion.engine import expand, export
    from nemo_aot.models import nemo_format

    cfg, _ = nemo_format.read_nemo_config(str(nemo_path))
    extracted = nemo_format.extract_nemo(str(nemo_path), str(out_dir / "extracted"))
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        nemo_format.load_nemo_weights([model], extracted)  # saved at EP2: resharded to EP1
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        tensors = dict(export(expand(moe.mappings(cfg, moe.QWEN3_MOE), cfg.num_layers), state,
                              cfg))
        tokens = torch.randint(0, cfg.vocab_size, (2, 16),
                               generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ours = model(tokens, torch.arange(16).expand(2, 16), None)[..., :cfg.vocab_size]
    config = moe.hf_config_from_model(cfg, moe.QWEN3_MOE, "float32")
    hf_dir = out_dir / "hf"
    hf_dir.mkdir()
    save_file(tensors, str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(config))
    hf = Qwen3MoeForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    return (ours - theirs).abs().max().item()


@pytest.mark.slow
@pytest.mark.xdist_group("moe_e2e")
def test_ep_checkpoint_exports_to_hugging_face(runs, tmp_path):
    ref_dir = runs[0]
    diff = _export_and_compare(ref_dir / "aot_policy.nemo", tmp_path)
    print(f"EP2 .nemo -> Qwen3-MoE: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
