"""The AOT-vs-DPO study, end to end, in one command (CPU).

    python -m scripts.experiments.run_study --mode quick --out study_quick     # ~9 min, 2 cores
    python -m scripts.experiments.run_study --mode full  --out study_full      # ~30 min, 2 cores
    python -m scripts.experiments.run_study --mode smoke --out /tmp/smoke      # CI, ~2-3 min

(from the repository root; every stage below is a module of this package, run the same way)

Stages (each skipped when its outputs exist, so an interrupted study resumes):

1. reference  ``sft_reference.py``: SFT a tiny Llama on arithmetic until it is right only part of
              the time (``--reference FILE.nemo`` or ``--reference bundled`` skips this).
2. data       ``build_preferences.py``: sample the reference, judge with the verifier, write a
              paired and an unpaired preference set (unequal positives/negatives).
3. train      every run of the plan through ``nemo_aot.algorithms.run.run_training`` (the code
              ``nemo-aot train`` runs), many runs per worker process; data-parallel runs under
              ``torchrun --nproc_per_node 2``.
4. eval       every policy exported to Hugging Face: greedy verifier accuracy on held-out and
              dev questions, win rate vs the reference's greedy answers, rewards
              ``log pi/pi_ref`` on held-out preference pairs and their FSD violation.
5. report     ``results.md`` / ``results.json`` (mean +- std over seeds) and plots.

Two groups of runs share one training budget (steps x sequences per step):

* ``loss``:  aot_unpaired (unpaired data), aot_paired, dpo, ipo (paired data) x beta sweep x
             seeds; each step is one micro-batch, so AOT sorts the whole batch.
* ``scope``: aot_unpaired at one beta with sort scope micro / data_parallel / global at several
             effective sort-batch sizes (samples entering one sort) x seeds.

A seed sets the data order (``data.seed``) and ``trainer.seed``; every run starts from the same
reference, which is also the frozen reference policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

from . import common

BUNDLED_REFERENCE = os.path.join(common.ROOT, "nemo_aot", "data", "bundled", "tiny_sft.nemo")


@dataclasses.dataclass(frozen=True)
class Run:
    loss_type: str
    beta: float
    sort_scope: str
    micro_batch_size: int
    dp: int
    seed: int

    @property
    def name(self) -> str:
        return (f"{self.loss_type}-b{self.beta:g}-{self.sort_scope}-mbs{self.micro_batch_size}"
                f"-dp{self.dp}-s{self.seed}")

    @property
    def paired(self) -> bool:
        return self.loss_type != "aot_unpaired"


@dataclasses.dataclass
class Mode:
    sft: list                   # sft_reference.py arguments
    data: list                  # build_preferences.py arguments
    steps: int                  # optimizer steps per run
    sequences: int              # sequences per step (paired runs: sequences / 2 pairs)
    lr: float
    losses: tuple
    betas: tuple
    seeds: tuple
    scope_betas: tuple
    scopes: tuple               # (sort_scope, micro_batch_size, dp) for aot_unpaired
    heldout: int = 400
    dev: int = 200
    positive_fraction: float = 0.25  # unpaired micro-batches: 1 positive per 3 negatives
    reference: Optional[str] = None  # default of --reference ("bundled": the packaged policy)
    overrides: tuple = ()       # extra KEY=VALUE trainer overrides for every run (e.g.
    #                             alignment.sft_loss_weight=1.0); part of the plan like the rest

    def groups(self) -> dict:
        """{"loss": [Run], "scope": [Run]}; a run in both groups (the same settings) runs once."""
        loss, scope = [], []
        for seed in self.seeds:
            for name in self.losses:
                for beta in self.betas:
                    per_step = self.sequences // 2 if name != "aot_unpaired" else self.sequences
                    loss.append(Run(name, beta, "micro", per_step, 1, seed))
            for beta in self.scope_betas:
                for sort_scope, mbs, dp in self.scopes:
                    scope.append(Run("aot_unpaired", beta, sort_scope, mbs, dp, seed))
        return {"loss": loss, "scope": scope}


# Unpaired micro-batches hold positive_fraction positives at every size >= 4 (1 + 3, 2 + 6,
# 4 + 12, 8 + 24), so the sort scopes differ only in how many samples one sort sees.
SCOPES_FULL = (("micro", 4, 1), ("micro", 8, 1), ("micro", 16, 1), ("micro", 32, 1),
               ("data_parallel", 4, 2), ("data_parallel", 8, 2), ("data_parallel", 16, 2),
               ("global", 4, 1), ("global", 4, 2))
LOSSES = ("aot_unpaired", "aot_paired", "dpo", "ipo")
MODES = {
    # smoke: the packaged reference (stage 1 is the one stage it skips), a few steps per run
    "smoke": Mode(sft=[], reference="bundled",
                  data=["--preference-questions", "96", "--dev-questions", "32",
                        "--heldout-questions", "32"],
                  steps=4, sequences=8, lr=1e-4, losses=("aot_unpaired", "dpo"), betas=(2.0,),
                  seeds=(0,), scope_betas=(2.0,),
                  scopes=(("global", 4, 1), ("data_parallel", 4, 2)), heldout=32, dev=32),
    # quick: a subset of the full grid with the same per-run settings (same reference when
    # given the same --reference), so its rows are rows the full table also has.
    "quick": Mode(sft=[], data=[], steps=150, sequences=32, lr=1e-4, losses=LOSSES,
                  betas=(0.5, 2.0), seeds=(0, 1, 2), scope_betas=(0.5, 2.0),
                  scopes=(("micro", 4, 1), ("micro", 32, 1), ("data_parallel", 8, 2),
                          ("global", 4, 1))),
    "full": Mode(sft=[], data=[], steps=150, sequences=32, lr=1e-4, losses=LOSSES,
                 betas=(0.1, 0.5, 2.0, 8.0), seeds=(0, 1, 2, 3, 4), scope_betas=(0.5, 2.0),
                 scopes=SCOPES_FULL),
}


def mode_with(name: str, settings: list) -> Mode:
    """MODES[name] with KEY=VALUE overrides (values parsed as JSON, e.g. betas=[0.1,0.5])."""
    mode = MODES[name]
    fields = {f.name for f in dataclasses.fields(Mode)}
    changes = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY in {sorted(fields)}")
        parsed = json.loads(value)
        changes[key] = tuple(tuple(v) if isinstance(v, list) else v for v in parsed) \
            if isinstance(parsed, list) else parsed
    return dataclasses.replace(mode, **changes)


# ----------------------------------------------------------------------------- orchestration


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _python(module: str, args: list, nproc: int = 1) -> list:
    """The command running ``module`` of this package (from the repository root, the workers'
    cwd), under torchrun when ``nproc`` > 1."""
    module = f"{__package__}.{module}"
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={port}", "-m", module, *args]


def _run_all(commands: list, log_dir: str, label: str) -> None:
    """Run commands concurrently; each one's output goes to a log file; fail on any error."""
    os.makedirs(log_dir, exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands):
        log = open(os.path.join(log_dir, f"{label}_{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=common.ROOT, env=_env(), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL),
                      log, cmd))
    failed = []
    try:
        for proc, log, _ in procs:
            proc.wait()
            log.close()
            if proc.returncode:
                failed.append((proc.returncode, log.name))
    finally:
        # Interrupted (Ctrl-C, or SIGTERM turned into an exception by main): stop the workers
        # too, so none keeps training unobserved. SIGTERM lets a trainer save; a run it cuts
        # short leaves no policy and is redone by the next invocation.
        running = [proc for proc, _, _ in procs if proc.poll() is None]
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    if failed:
        tails = "\n".join(f"--- {name} (exit {rc}) ---\n" + _tail(name) for rc, name in failed)
        raise RuntimeError(f"{label}: {len(failed)} worker(s) failed\n{tails}")


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _stage(name: str, timings: dict, fn) -> None:
    """Run one stage; its wall time is added to what earlier (interrupted) invocations spent."""
    started = time.monotonic()
    try:
        fn()
    finally:  # an interrupted stage's time counts too
        spent = time.monotonic() - started
        timings[name] = round(timings.get(name, 0.0) + spent, 1)
    print(f"[study] {name}: {spent:.0f} s (all invocations: {timings[name]:.0f} s)", flush=True)


def _split(items: list, parts: int) -> list:
    return [p for p in (items[i::parts] for i in range(parts)) if p]


def orchestrate(args) -> int:
    mode = mode_with(args.mode, args.set)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    logs = os.path.join(out, "logs")
    timings_path = os.path.join(out, "timings.json")
    timings: dict = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    reference = reference_path(args.reference or MODES[args.mode].reference, out)

    def make_reference():
        if not os.path.exists(reference):
            _run_all([_python("sft_reference", ["--out", os.path.dirname(reference),
                                                *mode.sft])], logs, "reference")

    def make_data():
        if not os.path.exists(os.path.join(out, "data", "summary.json")):
            _run_all([_python("build_preferences", ["--reference", reference, "--out",
                                                    os.path.join(out, "data"), *mode.data])],
                     logs, "data")

    groups = mode.groups()
    runs = list(dict.fromkeys(groups["loss"] + groups["scope"]))
    _write_plan(out, args.mode, mode, reference, runs, groups)

    def train():
        todo = [r for r in runs if not os.path.exists(_policy(out, r))]
        single = [r.name for r in todo if r.dp == 1]
        multi = [r.name for r in todo if r.dp > 1]
        if single:
            _run_all([_python("run_study", ["--worker", "train", "--out", out, *names])
                      for names in _split(single, args.jobs)], logs, "train")
        if multi:
            _run_all([_python("run_study", ["--worker", "train", "--out", out, *multi],
                              nproc=2)], logs, "train_dp")

    def evaluate():
        todo = ["reference"] + [r.name for r in runs]
        todo = [n for n in todo if not os.path.exists(os.path.join(out, "runs", n, "eval.json"))]
        if todo:
            _run_all([_python("run_study", ["--worker", "eval", "--out", out, *names])
                      for names in _split(todo, args.jobs)], logs, "eval")

    for name, fn in (("reference", make_reference), ("data", make_data), ("train", train),
                     ("eval", evaluate)):
        try:
            _stage(name, timings, fn)
        finally:
            common.write_json(timings_path, timings)

    from .report import write_report

    _stage("report", timings, lambda: write_report(out, timings))
    print(f"[study] results: {os.path.join(out, 'results.md')}")
    return 0


def _write_plan(out: str, mode_name: str, mode, reference: str, runs: list, groups: dict) -> None:
    """<out>/plan.json; a folder that holds a study of another configuration is refused."""
    path = os.path.join(out, "plan.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before["mode_config"] != json.loads(json.dumps(dataclasses.asdict(mode))) or \
                before["reference"] != reference:
            raise SystemExit(f"{out} holds a study with another configuration (plan.json); "
                             "use a new --out folder")
    plan = {"mode": mode_name, "reference": reference,
            "runs": [dataclasses.asdict(r) for r in runs],
            "groups": {g: [r.name for r in members] for g, members in groups.items()},
            "mode_config": dataclasses.asdict(mode)}
    common.write_json(path, plan)


def comparison_stages(module: str, args, out: str, reference: str, mode, runs: list,
                      trained: str, report, more_data=None) -> None:
    """The stages of a comparison built on this study's machinery (trl_crosscheck,
    unpaired_shape), each skipped when its outputs exist: the reference (SFT'd when missing), the
    preference data (build_preferences, then ``more_data(data_dir)``), ``module``'s train and
    eval workers (a run counts as trained once ``runs/<name>/<trained>`` exists), then
    ``report(out, mode, runs, timings)``."""
    logs, data = os.path.join(out, "logs"), os.path.join(out, "data")
    timings: dict = {}

    def make_reference():
        if not os.path.exists(reference):
            _run_all([_python("sft_reference", ["--out", os.path.dirname(reference)])], logs,
                     "reference")

    def make_data():
        if not os.path.exists(os.path.join(data, "summary.json")):
            _run_all([_python("build_preferences", ["--reference", reference, "--out", data,
                                                    *mode.data])], logs, "data")
        if more_data is not None:
            more_data(data)

    def workers(kind: str, names: list):
        if names:
            _run_all([_python(module, ["--worker", kind, "--out", out, *part])
                      for part in _split(names, args.jobs)], logs, kind)

    def train():
        workers("train", [r.name for r in runs
                          if not os.path.exists(os.path.join(out, "runs", r.name, trained))])

    def evaluate():
        workers("eval", [n for n in ["reference"] + [r.name for r in runs]
                         if not os.path.exists(os.path.join(out, "runs", n, "eval.json"))])

    for name, fn in (("reference", make_reference), ("data", make_data), ("train", train),
                     ("eval", evaluate)):
        _stage(name, timings, fn)
    _stage("report", timings, lambda: report(out, mode, runs, timings))
    print(f"[{module}] results: {os.path.join(out, 'results.md')}")


def reference_path(choice, out: str) -> str:
    """The reference .nemo a study starts from: --reference (or the mode's), 'bundled' for the
    packaged tiny SFT policy, else the one stage 1 SFTs into ``out``."""
    if choice == "bundled":
        if not os.path.exists(BUNDLED_REFERENCE):
            raise SystemExit(f"--reference bundled: {BUNDLED_REFERENCE} does not exist; run "
                             "python -m scripts.experiments.make_demo_policy or drop --reference")
        return BUNDLED_REFERENCE
    return os.path.abspath(choice) if choice else os.path.join(out, "reference", "reference.nemo")


def _policy(out: str, run: Run) -> str:
    return os.path.join(out, "runs", run.name, "policy.nemo")


# ----------------------------------------------------------------------------- workers


def _load_plan(out: str):
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    mode = Mode(**plan["mode_config"])
    runs = {r.name: r for r in (Run(**d) for d in plan["runs"])}
    return plan, mode, runs


def train_overrides(run: Run, mode: Mode, out: str, reference: str, run_dir: str,
                    paired: Optional[bool] = None) -> list:
    """The trainer overrides of one run. ``paired`` picks the data set (default: the paired set
    for every loss but aot_unpaired); aot_unpaired on the paired set sorts the chosen and the
    rejected answers of the pairs apart, as TRL's ``aot_unpaired`` does."""
    paired = run.paired if paired is None else paired
    kind = "paired" if paired else "unpaired"
    data = os.path.join(out, "data")
    batch = mode.sequences // 2 if paired else mode.sequences
    return [
        "recipe=demo", f"init_from={reference}", f"data.format=trl_{kind}",
        f"data.train_path={data}/train_{kind}.jsonl",
        f"data.validation_path={data}/dev_{kind}.jsonl",
        f"data.tokenizer_path={common.TOKENIZER}", "data.max_seq_length=64",
        f"data.seed={run.seed}", f"trainer.seed={run.seed}",
        f"data.unpaired_positive_fraction={mode.positive_fraction}",
        f"trainer.max_steps={mode.steps}", "trainer.max_epochs=null",
        f"trainer.global_batch_size={batch}", f"trainer.micro_batch_size={run.micro_batch_size}",
        # validation (first dev batch) at the start and the end only; the study evaluates on
        # its own. One batch also keeps every validation batch holding positives and negatives,
        # which the global sort scope requires.
        f"trainer.val_check_interval={mode.steps}", "trainer.limit_val_batches=1",
        "precision.precision=fp32", f"optim.lr={mode.lr}", "optim.min_lr=0.0",
        f"optim.warmup_steps={max(1, mode.steps // 10)}", "optim.lr_decay_style=cosine",
        f"alignment.loss_type={run.loss_type}", f"alignment.beta={run.beta}",
        f"alignment.sort_scope={run.sort_scope}",
        "checkpoint.save_interval=0", "checkpoint.keep_last=1", "checkpoint.resume=never",
        f"logging.output_dir={run_dir}", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.plot_every_validation=false",
        *mode.overrides,
    ]


def train_worker(out: str, names: list) -> None:
    common.quiet_warnings()
    plan, mode, runs = _load_plan(out)
    for name in names:
        run = runs[name]
        run_dir = os.path.join(out, "runs", name)
        train_run(run_dir, train_overrides(run, mode, out, plan["reference"], run_dir),
                  mode.steps, {"run": dataclasses.asdict(run)})


def train_run(run_dir: str, overrides: list, steps: int, meta: dict) -> None:
    """One training through ``run_training`` into ``run_dir/policy.nemo`` (skipped when that
    exists; an interrupted attempt is started over), with ``train.json`` beside it."""
    import torch

    from nemo_aot.algorithms.resolve import resolve_run
    from nemo_aot.algorithms.run import run_training

    name = os.path.basename(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    if os.path.exists(os.path.join(run_dir, "policy.nemo")):
        return
    if rank == 0 and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # an interrupted attempt: start over
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    run = resolve_run(overrides)
    started = time.monotonic()
    result = run_training(run)
    seconds = time.monotonic() - started
    if result.stop_reason != "max_steps" or result.final_step != steps:
        # e.g. SIGTERM: the trainer saved and returned early. Leave no policy behind, so
        # the next invocation reruns this run from the start.
        raise SystemExit(f"[train] {name}: stopped at step {result.final_step} "
                         f"({result.stop_reason}); rerun the study to redo it")
    if rank == 0:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(run_dir, "reference_cache"), ignore_errors=True)
        common.write_json(os.path.join(run_dir, "train.json"),
                          {"seconds": seconds, "steps": result.final_step,
                           "stop_reason": result.stop_reason, **meta})
        os.replace(result.nemo_path, os.path.join(run_dir, "policy.nemo"))
        print(f"[train] {name}: {result.final_step} steps in {seconds:.1f} s", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def eval_worker(out: str, names: list) -> None:
    common.quiet_warnings()
    plan, mode, _ = _load_plan(out)
    evaluator = Evaluator(os.path.join(out, "data"), plan["reference"], mode.heldout, mode.dev)
    for name in names:
        policy = evaluator.reference if name == "reference" else common.HFPolicy.from_nemo(
            os.path.join(out, "runs", name, "policy.nemo"))
        evaluator.write(os.path.join(out, "runs", name, "eval.json"), name, policy)


class Evaluator:
    """The study's held-out evaluation of a policy (``common.HFPolicy``) against the reference:
    greedy accuracy (held-out, dev), win rate vs the reference's greedy answers, and the rewards
    of the held-out preference pairs (FSD violation, reward accuracy)."""

    def __init__(self, data: str, reference: str, heldout: int, dev: int):
        with open(os.path.join(data, "heldout.json")) as f:
            stored = json.load(f)
        self.questions = stored["questions"][:heldout]
        self.baseline = stored["reference_greedy"][:heldout]
        self.dev = [q for q, *_ in common.task_splits()["dev"][:dev]]
        pairs = common.read_jsonl(os.path.join(data, "heldout_paired.jsonl"))
        self.pair_q = [p["prompt"][0]["content"] for p in pairs]
        self.chosen = [p["chosen"][0]["content"] for p in pairs]
        self.rejected = [p["rejected"][0]["content"] for p in pairs]
        self.reference = common.HFPolicy.from_nemo(reference)
        self.ref_c = self.reference.sequence_logps(self.pair_q, self.chosen)
        self.ref_r = self.reference.sequence_logps(self.pair_q, self.rejected)

    def record(self, name: str, policy) -> dict:
        from nemo_aot.losses.transport import dominance_violation

        started = time.monotonic()
        accuracy, answers = common.greedy_accuracy(policy, self.questions)
        dev_accuracy, _ = common.greedy_accuracy(policy, self.dev)
        wins = [common.win_score(q, a, b) for q, a, b in zip(self.questions, answers,
                                                              self.baseline)]
        rc = policy.sequence_logps(self.pair_q, self.chosen) - self.ref_c
        rr = policy.sequence_logps(self.pair_q, self.rejected) - self.ref_r
        pairs = len(self.pair_q)
        return {
            "name": name, "heldout_accuracy": accuracy, "dev_accuracy": dev_accuracy,
            "win_rate": sum(wins) / len(wins),
            "fsd_violation": float(dominance_violation(rc, rr)) if pairs else None,
            # ties count half: the reference itself (all rewards 0) scores 0.5
            "reward_accuracy": float((rc > rr).double().mean() + 0.5 * (rc == rr).double().mean())
            if pairs else None,
            "reward_margin": float((rc - rr).mean()) if pairs else None,
            "rewards_chosen": rc.tolist(), "rewards_rejected": rr.tolist(),
            "heldout_answers": answers, "seconds": time.monotonic() - started}

    def write(self, path: str, name: str, policy) -> dict:
        record = self.record(name, policy)
        common.write_json(path, record)
        print(f"[eval] {name}: held-out accuracy {record['heldout_accuracy']:.3f}, win rate "
              f"{record['win_rate']:.3f}, fsd violation {record['fsd_violation']}", flush=True)
        return record


# ----------------------------------------------------------------------------- entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--out", required=True, help="study folder (resumable)")
    parser.add_argument("--reference", default=None,
                        help="a reference .nemo to start from, or 'bundled' for the packaged "
                             "tiny SFT policy; default: SFT one (stage 1)")
    parser.add_argument("--jobs", type=int, default=2, help="concurrent worker processes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override fields of the mode, e.g. --set steps=100 'seeds=[0,1]'")
    parser.add_argument("--worker", choices=("train", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "train":
        train_worker(os.path.abspath(args.out), args.names)
        return 0
    if args.worker == "eval":
        eval_worker(os.path.abspath(args.out), args.names)
        return 0
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        return orchestrate(args)
    except KeyboardInterrupt:
        print(f"[study] interrupted; finished runs are kept. Run the same command again to "
              f"continue in {args.out}", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
