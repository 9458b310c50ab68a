"""The study's training, done twice: by nemo_aot and by Hugging Face TRL's ``DPOTrainer``.

    python -m scripts.experiments.trl_crosscheck --mode quick --out /tmp/trl_quick   # ~15 min
    python -m scripts.experiments.trl_crosscheck --mode full  --out /tmp/trl_full
    python -m scripts.experiments.trl_crosscheck --mode smoke --out /tmp/trl_smoke --jobs 1

Both sides start from the study's reference policy (the SFT stage of ``run_study``, or
``--reference``), train on the study's *paired* preference set and are scored by the study's own
``run_study.Evaluator``. TRL gets the reference as nemo_aot's own Hugging Face export
(``nemo_to_hf``, as ``build_preferences`` does), and everything a run's numbers depend on is set
equal: beta, label smoothing (0), Adam (beta2 0.98, eps 1e-8, no weight decay), gradient
clipping at 1, lr 1e-4 with linear warmup over the first tenth of the steps then cosine to 0,
150 steps of 16 pairs, fp32, max length 64.

Two things are made identical rather than merely configured alike, so that any difference left
is the trainers':

* **tokens**: TRL's dataset is tokenized by nemo_aot's ``PromptResponseTokenizer`` (the chat
  template, BOS and EOS exactly as nemo_aot trains on them), and
* **batches**: TRL reads the pairs in the order nemo_aot's sampler draws them for the same
  seed (``TrainBatchSampler``: per epoch a ``PCG64([seed, epoch, 0])`` permutation, a remainder
  left out), sequentially, so step t of both sees the same pairs in the same micro-batches.

Cells: ``dpo`` (TRL ``sigmoid``; one micro-batch per step) and ``aot_unpaired`` (TRL
``aot_unpaired``: the chosen and the rejected log-ratios sorted apart) at a sort batch of 4 and
32 sequences. TRL sorts within its per-device batch, so a sort batch of s sequences is
``per_device_train_batch_size`` s/2 pairs with gradient accumulation up to 16 pairs per step;
nemo_aot runs ``alignment.sort_scope=micro`` with ``trainer.micro_batch_size`` s/2. Per step
both log loss, gradient norm (before clipping), learning rate and rewards; ``steps.json`` of
each run pair and ``results.md`` compare them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

from . import common, run_study

PAIRS_PER_STEP = 16


@dataclasses.dataclass(frozen=True)
class Cell:
    trainer: str        # "nemo_aot" or "trl"
    loss_type: str      # nemo_aot's name: dpo or aot_unpaired
    beta: float
    sort_batch: int     # sequences per sort (dpo: the whole step)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.trainer}-{self.loss_type}-b{self.beta:g}-sort{self.sort_batch}-s{self.seed}"

    @property
    def pairs_per_micro(self) -> int:
        return self.sort_batch // 2


TRL_LOSS = {"dpo": "sigmoid", "aot_unpaired": "aot_unpaired"}  # tests/unit/test_losses_trl.py


@dataclasses.dataclass
class Mode:
    data: list                  # build_preferences.py arguments
    steps: int
    betas: tuple
    seeds: tuple
    cells: tuple                # (loss_type, sort batch)
    lr: float = 1e-4
    heldout: int = 400
    dev: int = 200
    reference: str = None       # default of --reference ("bundled": the packaged policy)

    def runs(self) -> list:
        return [Cell(trainer, loss, beta, sort, seed) for seed in self.seeds
                for beta in self.betas for loss, sort in self.cells
                for trainer in ("nemo_aot", "trl")]

    def study_mode(self) -> run_study.Mode:
        """The run_study settings ``train_overrides`` reads (steps, batch, lr)."""
        return run_study.Mode(sft=[], data=self.data, steps=self.steps,
                              sequences=2 * PAIRS_PER_STEP, lr=self.lr, losses=(), betas=(),
                              seeds=(), scope_betas=(), scopes=())


CELLS = (("dpo", 32), ("aot_unpaired", 4), ("aot_unpaired", 32))
MODES = {
    "smoke": Mode(data=["--preference-questions", "96", "--dev-questions", "32",
                        "--heldout-questions", "32"], steps=4, betas=(0.5,), seeds=(0,),
                  cells=(("dpo", 32), ("aot_unpaired", 4)), heldout=32, dev=32,
                  reference="bundled"),
    # quick: beta 0.5 only (where the study's sort-batch trend is large), 3 seeds
    "quick": Mode(data=[], steps=150, betas=(0.5,), seeds=(0, 1, 2), cells=CELLS),
    "full": Mode(data=[], steps=150, betas=(0.5, 2.0), seeds=(0, 1, 2), cells=CELLS),
}


# ----------------------------------------------------------------------------- orchestration


def orchestrate(args) -> int:
    from .trl_report import write_report

    mode = MODES[args.mode]
    out = os.path.abspath(args.out)
    reference = run_study.reference_path(args.reference or mode.reference, out)
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "plan.json"),
                      {"mode": args.mode, "reference": reference,
                       "mode_config": dataclasses.asdict(mode)})
    run_study.comparison_stages("trl_crosscheck", args, out, reference, mode, mode.runs(),
                                "steps.json", write_report)
    return 0


def _done(out: str, name: str) -> str:
    return os.path.join(out, "runs", name, "steps.json")


# ----------------------------------------------------------------------------- workers


def _load(out: str):
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    mode = Mode(**plan["mode_config"])
    return plan, mode, {r.name: r for r in mode.runs()}


def nemo_order(pairs: int, seed: int, steps: int) -> list:
    """The pair indices nemo_aot's ``TrainBatchSampler`` hands out over ``steps`` steps of
    ``PAIRS_PER_STEP`` pairs (one stream, shuffled), in order."""
    import numpy as np

    per_epoch = pairs // PAIRS_PER_STEP
    order = []
    for t in range(steps):
        epoch, step = divmod(t, per_epoch)
        perm = np.random.Generator(np.random.PCG64([seed, epoch, 0])).permutation(pairs)
        order.extend(perm[step * PAIRS_PER_STEP:(step + 1) * PAIRS_PER_STEP].tolist())
    return order


def train_nemo(cell: Cell, mode: Mode, out: str, reference: str, run_dir: str) -> None:
    run = run_study.Run(cell.loss_type, cell.beta, "micro", cell.pairs_per_micro, 1, cell.seed)
    overrides = run_study.train_overrides(run, mode.study_mode(), out, reference, run_dir,
                                          paired=True)
    run_study.train_run(run_dir, overrides, mode.steps, {"cell": dataclasses.asdict(cell)})
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [s for s in steps if s.get("split") == "train" and "grad_norm" in s]
    # nemo_aot logs the lr after the scheduler's step (the next step's); TRL the lr a step used.
    # Step 1 uses the warmup's initial lr, 0, on both.
    used = [0.0] + [s["lr"] for s in steps[:-1]]
    steps = [{"step": s["step"], "loss": s["loss"], "grad_norm": s["grad_norm"], "lr": lr,
              "rewards/chosen": s.get("rewards/chosen"),
              "rewards/rejected": s.get("rewards/rejected")} for s, lr in zip(steps, used)]
    common.write_json(_done(out, cell.name), steps)


def _trl_trainer_class():
    """TRL's DPOTrainer reading nemo_aot's tokens in nemo_aot's order (nothing else changed)."""
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    from nemo_aot.data.tokenization import PromptResponseTokenizer

    class OrderedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            encoder = PromptResponseTokenizer(self._tokenizer)

            def tokenize(example):
                rendered = encoder.render(example["prompt"], [example["chosen"],
                                                              example["rejected"]], dataset_name)
                [(prompt, (chosen, rejected))] = encoder.encode([rendered])
                return {"prompt_ids": prompt.tolist(), "chosen_ids": chosen.tolist(),
                        "rejected_ids": rejected.tolist()}

            return dataset.map(tokenize, remove_columns=dataset.column_names)

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return OrderedDPOTrainer


def train_trl(cell: Cell, mode: Mode, out: str, reference: str, run_dir: str) -> None:
    import shutil
    import tempfile

    import torch
    from datasets import Dataset
    from trl import DPOConfig

    from nemo_aot.conversion.convert import nemo_to_hf
    from nemo_aot.data import load_tokenizer

    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    pairs = common.read_jsonl(os.path.join(out, "data", "train_paired.jsonl"))
    ordered = [pairs[i] for i in nemo_order(len(pairs), cell.seed, mode.steps)]
    hf_dir = tempfile.mkdtemp(prefix="trl_crosscheck_ref_")
    started = time.monotonic()
    try:
        with common._quiet():
            nemo_to_hf(reference, os.path.join(hf_dir, "hf"))
        config = DPOConfig(
            output_dir=run_dir, loss_type=[TRL_LOSS[cell.loss_type]], beta=cell.beta,
            label_smoothing=0.0, learning_rate=mode.lr, lr_scheduler_type="cosine",
            warmup_steps=max(1, mode.steps // 10), max_steps=mode.steps,
            per_device_train_batch_size=cell.pairs_per_micro,
            gradient_accumulation_steps=PAIRS_PER_STEP // cell.pairs_per_micro,
            adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-8, weight_decay=0.0,
            max_grad_norm=1.0, seed=cell.seed, bf16=False, fp16=False,
            gradient_checkpointing=False, max_length=64, use_cpu=True, report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_drop_last=True,
            model_init_kwargs={"dtype": torch.float32})
        trainer = _trl_trainer_class()(
            model=os.path.join(hf_dir, "hf"), args=config, train_dataset=Dataset.from_list(ordered),
            processing_class=load_tokenizer(common.TOKENIZER))
        trainer.train()
        trainer.save_model(os.path.join(run_dir, "policy_hf"))
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    log = [e for e in trainer.state.log_history if "loss" in e]
    steps = [{"step": e["step"], "loss": e["loss"], "grad_norm": e.get("grad_norm"),
              "lr": e.get("learning_rate"), "rewards/chosen": e.get("rewards/chosen"),
              "rewards/rejected": e.get("rewards/rejected")} for e in log]
    common.write_json(os.path.join(run_dir, "train.json"),
                      {"seconds": time.monotonic() - started, "cell": dataclasses.asdict(cell)})
    common.write_json(_done(out, cell.name), steps)
    print(f"[train] {cell.name}: {len(steps)} steps", flush=True)


def train_worker(out: str, names: list) -> None:
    common.quiet_warnings()
    plan, mode, cells = _load(out)
    for name in names:
        cell, run_dir = cells[name], os.path.join(out, "runs", name)
        if os.path.exists(_done(out, name)):
            continue
        train = train_nemo if cell.trainer == "nemo_aot" else train_trl
        train(cell, mode, out, plan["reference"], run_dir)


def eval_worker(out: str, names: list) -> None:
    from transformers import AutoModelForCausalLM

    common.quiet_warnings()
    plan, mode, cells = _load(out)
    evaluator = run_study.Evaluator(os.path.join(out, "data"), plan["reference"], mode.heldout,
                                    mode.dev)
    for name in names:
        run_dir = os.path.join(out, "runs", name)
        if name == "reference":
            policy = evaluator.reference
        elif cells[name].trainer == "nemo_aot":
            policy = common.HFPolicy.from_nemo(os.path.join(run_dir, "policy.nemo"))
        else:
            policy = common.HFPolicy(AutoModelForCausalLM.from_pretrained(
                os.path.join(run_dir, "policy_hf")))
        evaluator.write(os.path.join(run_dir, "eval.json"), name, policy)


def mean_std(values: list) -> tuple:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------- entry


def main(argv=None) -> int:
    return common.comparison_main(__doc__, MODES, train_worker, eval_worker, orchestrate, argv)


if __name__ == "__main__":
    sys.exit(main())
