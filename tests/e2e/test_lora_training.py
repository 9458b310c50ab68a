"""`nemo-aot train peft=lora` end to end: the adapters-off reference follows the cached one, the
checkpoints hold the adapters (and their Adam moments) only, a kill -9 resumes bit for bit, the
merged Hugging Face export equals `peft`'s merge of the exported adapter, and a run continues
from an exported adapter or a LoRA checkpoint (also at another TP size)."""

import os
import signal

import pytest
import torch

from conftest import curve, history, run_cli, start_cli, train_args, wait_for

LORA = ["peft=lora", "peft.rank=4", "peft.alpha=8"]


@pytest.fixture(scope="module")
def lora_run(small_data, init_nemo, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run_cli(["train", *train_args(small_data, out, f"init_from={init_nemo}", *LORA)])
    return out


def test_adapters_off_reference_equals_cached(lora_run, small_data, init_nemo, tmp_path):
    """Both score the frozen base with the policy's own forward: identical rewards at every
    step, exactly zero before the first update (fresh adapters have B = 0)."""
    train = history(lora_run)
    assert train[0]["rewards/chosen"] == 0.0 and train[0]["rewards/rejected"] == 0.0
    assert train[-1]["loss"] < train[0]["loss"] - 0.01  # the adapters learn
    run_cli(["train", *train_args(small_data, tmp_path, f"init_from={init_nemo}", *LORA,
                                  "alignment.reference_policy=cached")])
    assert curve(history(tmp_path)) == curve(train)
    assert curve(history(tmp_path, "validation")) == curve(history(lora_run, "validation"))


def _tensor_bytes(folder, prefix=""):
    from nemo_aot.models.dist_weights import read_checkpoint_metadata

    total = 0
    for key, entry in read_checkpoint_metadata(str(folder)).state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(entry, "size"):
            total += torch.Size(entry.size).numel() * torch.empty(
                (), dtype=entry.properties.dtype).element_size()
    return total


def test_checkpoints_hold_the_adapters_only(lora_run, init_nemo):
    """fp32 on CPU: each adapter element is 4 bytes of weight and 8 of Adam moments; the frozen
    base (in init_from) is not stored."""
    from safetensors import safe_open

    with safe_open(str(lora_run / "aot_adapter" / "adapter_model.safetensors"), "pt") as f:
        # PEFT repeats the fused layers' shared A for q/k/v and gate/up: count each A once.
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    unique = {k: s for k, s in shapes.items()
              if "lora_B" in k or not any(p in k for p in ("k_proj", "v_proj", "up_proj"))}
    adapter_elements = sum(torch.Size(s).numel() for s in unique.values())
    assert adapter_elements == 2 * (4 * (64 + 128) + 4 * (64 + 64) + 4 * (64 + 352)
                                    + 4 * (176 + 64))  # 2 layers: qkv, proj, fc1, fc2
    step = lora_run / "checkpoints" / "step_00000008"
    assert _tensor_bytes(step) == 12 * adapter_elements
    assert _tensor_bytes(step, "optimizer.") == 8 * adapter_elements
    model_keys = [k for k in _keys(step) if not k.startswith(("optimizer.", "rng_state"))]
    assert model_keys and all(".adapter." in k for k in model_keys)
    full_model_bytes = _tensor_bytes(_extracted(init_nemo, step.parent.parent / "x"))
    assert 12 * adapter_elements < full_model_bytes / 4  # vs weights alone of a full run


def _keys(folder):
    from nemo_aot.models.dist_weights import read_checkpoint_metadata

    return list(read_checkpoint_metadata(str(folder)).state_dict_metadata)


def _extracted(nemo, dest):
    from nemo_aot.models.nemo_format import extract_nemo, weights_dir

    if not os.path.isdir(dest):
        extract_nemo(str(nemo), str(dest))
    return weights_dir(str(dest))


def test_kill_9_then_resume_matches_uninterrupted_run(lora_run, small_data, init_nemo, tmp_path):
    args = ["train", *train_args(small_data, tmp_path, f"init_from={init_nemo}", *LORA)]
    proc = start_cli(args)
    wait_for((tmp_path / "checkpoints" / "step_00000004" / "COMPLETE.json").exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "checkpoints" / "step_00000008").exists(), "finished before the kill"
    resumed = run_cli(args)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert curve(history(tmp_path)) == curve(history(lora_run))  # bit for bit on CPU
    assert curve(history(tmp_path, "validation")) == curve(history(lora_run, "validation"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_merged_hf_export_equals_peft_merge_of_the_adapter(lora_run, init_nemo, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    merged_dir = tmp_path / "merged"
    run_cli(["convert", "nemo-to-hf", "--nemo", str(lora_run / "aot_policy.nemo"), "--out",
             str(merged_dir)])
    base_dir = init_nemo.parent / "hf"  # the Hugging Face model init_nemo was converted from
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    base_logits = _logits(base, ids)
    peft_merged = PeftModel.from_pretrained(base, str(lora_run / "aot_adapter")).merge_and_unload()
    ours = LlamaForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    expected = _logits(peft_merged, ids)
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapters changed the policy


@pytest.mark.parametrize("source, layout", [
    ("checkpoints/step_00000008", []),
    ("aot_adapter", ["parallel.tensor_model_parallel_size=2"]),
])
def test_continue_from_an_adapter(source, layout, lora_run, small_data, init_nemo, tmp_path,
                                  monkeypatch):
    """init_from (the base) + peft.adapter_from: the new run starts at the trained policy (its
    step-0 validation is the first run's last), from a checkpoint or a PEFT adapter named by
    its hub id (an offline hub cache holding the exported folder), at TP1 or TP2."""
    from hub_cache import add_snapshot

    adapter = str(lora_run / source)
    if source == "aot_adapter":
        add_snapshot(tmp_path / "hf_home", "tinyorg/tiny-adapter", files_from=adapter)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        adapter = "tinyorg/tiny-adapter"
    run = tmp_path / "run"
    proc = run_cli(["train", *train_args(small_data, run, f"init_from={init_nemo}", *LORA,
                                         f"peft.adapter_from={adapter}", *layout,
                                         "trainer.max_steps=1", "optim.warmup_steps=0")],
                   nproc=2 if layout else 1)
    if source == "aot_adapter":
        assert "tinyorg/tiny-adapter@main (Hugging Face hub)" in proc.stdout + proc.stderr
    start, end = history(run, "validation")[0], history(lora_run, "validation")[-1]
    assert start["step"] == 0 and end["step"] == 8
    for key in ("logps/chosen", "logps/rejected"):
        assert start[key] == pytest.approx(end[key], rel=1e-5), key
