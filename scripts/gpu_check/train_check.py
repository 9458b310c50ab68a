"""A short ``nemo-aot train`` from a converted tiny Hugging Face Llama, checked end to end.

    python -m scripts.gpu_check.train_check --work DIR --result RESULT.json [--steps 20]

1. a random tiny Llama saved by transformers with the bundled tokenizer, converted with
   ``nemo-aot convert hf-to-nemo`` (the .nemo carries the tokenizer);
2. ``nemo-aot train recipe=demo`` from it for ``--steps`` steps (bf16 by default; on a GPU when
   there is one) on 16 bundled preference pairs, validated on the same pairs: the loss must go
   down (it starts at log 2: policy == reference);
3. the exported policy converted back with ``nemo-aot convert nemo-to-hf``, and the logits of
   that Hugging Face model compared with the trained policy's own (megatron-core, the .nemo's
   weights), both in fp32 on the device.

Every command has a timeout; the result file says what passed, with the loss curve and the
logit differences. Exit status 0 only if everything passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback

import torch

PAIRS = 16
HF_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=False)
LOGIT_TOLERANCE = 2e-3  # fp32 both sides: different kernels and summation orders only


def bundled(*parts: str) -> str:
    import nemo_aot

    return os.path.join(os.path.dirname(nemo_aot.__file__), "data", "bundled", *parts)


def _megatron_core_version():
    """Which megatron-core gave this result (the check runs under 0.16 and 0.19)."""
    try:
        from importlib import metadata

        return metadata.version("megatron-core")
    except Exception:  # noqa: BLE001 - recorded as unknown; the import stage reports the error
        return None


class Check:
    def __init__(self, work: str, timeout: float):
        self.work, self.timeout = work, timeout
        self.result: dict = {"ok": False, "stages": {}, "device": None,
                             "megatron_core": _megatron_core_version()}

    def stage(self, name: str, fn, *args, **kwargs):
        started = time.time()
        record = self.result["stages"][name] = {"ok": False}
        try:
            out = fn(*args, **kwargs) or {}
            record.update(out)
            record["ok"] = bool(out.get("ok", True))
        except Exception as err:  # noqa: BLE001 - recorded, then the remaining stages are skipped
            record["error"] = f"{type(err).__name__}: {err}"[-4000:]
            record["traceback"] = traceback.format_exc()[-6000:]
        record["seconds"] = round(time.time() - started, 1)
        print(f"[train_check] {name}: {'ok' if record['ok'] else 'FAILED'} "
              f"({record['seconds']} s){'' if record['ok'] else ' ' + record.get('error', '')}",
              flush=True)
        return record["ok"]

    def cli(self, *args: str, log: str) -> None:
        cmd = [sys.executable, "-m", "nemo_aot.cli", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1")
        with open(os.path.join(self.work, log), "w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=self.timeout)
        if proc.returncode:
            with open(os.path.join(self.work, log)) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"exit {proc.returncode}: {' '.join(args[:2])}\n{tail}")


def make_hf(work: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(bundled("tokenizer", "tokenizer.json")) as f:
        vocab = len(json.load(f)["model"]["vocab"])
    hf = os.path.join(work, "hf_init")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **HF_SHAPE)).save_pretrained(hf)
    for name in os.listdir(bundled("tokenizer")):
        shutil.copy(os.path.join(bundled("tokenizer"), name), os.path.join(hf, name))
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    with open(bundled("paired", "train.jsonl")) as f:
        lines = [line for _, line in zip(range(PAIRS), f)]
    for split in ("train", "validation"):
        with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
            f.writelines(lines)
    return {"vocab_size": vocab, "shape": HF_SHAPE}


def train(check: Check, steps: int, precision: str) -> dict:
    work = check.work
    run = os.path.join(work, "run")
    check.cli("train", "recipe=demo", f"init_from={work}/init.nemo",
              f"precision.precision={precision}", f"trainer.max_steps={steps}",
              "trainer.max_epochs=null", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=2", f"trainer.val_check_interval={steps // 2}",
              f"checkpoint.save_interval={steps}", f"data.train_path={work}/data/train.jsonl",
              f"data.validation_path={work}/data/validation.jsonl", "optim.lr=5e-3",
              "optim.warmup_steps=1", "logging.progress_bar=false", "logging.tensorboard=false",
              f"logging.output_dir={run}", log="train.log")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train_loss = [r["loss"] for r in records if r["split"] == "train"]
    val_loss = [r["loss"] for r in records if r["split"] == "validation"]
    tail = sum(train_loss[-5:]) / len(train_loss[-5:])
    checks = {
        "steps": len(train_loss) == steps,
        "starts_at_log2": abs(train_loss[0] - math.log(2)) < 1e-3,
        "train_loss_down": tail < train_loss[0] - 0.02,
        "validation_loss_down": len(val_loss) >= 2 and val_loss[-1] < val_loss[0] - 0.01,
        "exported": os.path.exists(os.path.join(run, "aot_policy.nemo")),
    }
    speed = [r.get("tokens_per_s") for r in records if r["split"] == "train"]
    return {"ok": all(checks.values()), "checks": checks, "train_loss": train_loss,
            "validation_loss": val_loss, "tokens_per_s": [s for s in speed if s]}


def logits(work: str, device: torch.device) -> dict:
    """The trained policy (.nemo, megatron-core) and its Hugging Face export, in fp32."""
    from transformers import AutoModelForCausalLM

    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models import nemo_format

    torch.backends.cuda.matmul.allow_tf32 = False
    nemo = os.path.join(work, "run", "aot_policy.nemo")
    model_cfg, _ = nemo_format.read_nemo_config(nemo)
    vocab = model_cfg.vocab_size
    tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(3))
    extracted = nemo_format.extract_nemo(nemo, os.path.join(work, "policy_extracted"))
    with single_process_world():
        model = build_single_model(model_cfg, nemo_format.checkpoint_dtype(extracted))
        nemo_format.load_nemo_weights([model], extracted)
        model = model.float().to(device).eval()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            ours = model(tokens.to(device), positions.to(device), None)[..., :vocab].float()
        del model
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf_trained")).float()
    hf = hf.to(device).eval()
    with torch.no_grad():
        theirs = hf(tokens.to(device)).logits.float()
    diff = (ours - theirs).abs()
    kl = torch.nn.functional.kl_div(theirs.log_softmax(-1), ours.log_softmax(-1),
                                    log_target=True, reduction="batchmean")
    result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
              "kl": kl.item(), "logit_scale": theirs.abs().max().item(),
              "argmax_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
              "tolerance": LOGIT_TOLERANCE}
    result["ok"] = result["max_abs_diff"] <= LOGIT_TOLERANCE and result["logit_scale"] > 0.1
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="scratch folder (emptied first)")
    p.add_argument("--result", required=True, help="JSON file to write")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--timeout", type=float, default=240, help="seconds per nemo-aot command")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check = Check(args.work, args.timeout)
    check.result.update(device=str(device), precision=args.precision, steps=args.steps)
    started = time.time()
    w = args.work
    ok = (check.stage("tiny_hf_llama", make_hf, w)
          and check.stage("hf_to_nemo", check.cli, "convert", "hf-to-nemo", "--hf",
                          f"{w}/hf_init", "--out", f"{w}/init.nemo", "--dtype", args.precision,
                          log="hf_to_nemo.log")
          and check.stage("train", train, check, args.steps, args.precision)
          and check.stage("nemo_to_hf", check.cli, "convert", "nemo-to-hf", "--nemo",
                          f"{w}/run/aot_policy.nemo", "--out", f"{w}/hf_trained",
                          log="nemo_to_hf.log")
          and check.stage("logits", logits, w, device))
    check.result.update(ok=bool(ok), seconds=round(time.time() - started, 1))
    with open(args.result, "w") as f:
        json.dump(check.result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
