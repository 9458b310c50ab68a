"""Numbers that are not numbers: every numeric config key and command-line option has one rule
(``nemo_aot.algorithms.rules``), checked at resolution, and every command that takes numbers
refuses NaN, infinities, wrong signs and out-of-range values with one line naming the key.

Tiers: the schema walk (a numeric key without a rule fails here), every rule against a table of
bad values on the typed config (no Hydra, no model), the same values through each command's
parser in process (train, demo, --plan, --print-config, export, score, the launcher; ``convert``
has no numeric options and there is no ``generate`` command), and one launched CLI.
"""

import argparse
import math
import os
import subprocess
import sys

import pytest

from nemo_aot import cli, launcher
from nemo_aot.algorithms.config import AOTConfig, to_yaml
from nemo_aot.algorithms.export import checkpoint_config
from nemo_aot.algorithms.resolve import World, resolve_run
from nemo_aot.algorithms.rules import (
    NUMBER_RULES,
    OPTION_RULES,
    check_numbers,
    check_option,
    numeric_keys,
)
from nemo_aot.models.config import RopeScaling

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_numeric_key_of_the_schema_has_exactly_one_rule():
    keys = list(numeric_keys())
    assert len(keys) > 40  # the walk reaches nested and optional sections
    assert "model.rope_scaling.factor" in keys and "optim.lr" in keys
    missing = sorted(set(keys) - set(NUMBER_RULES))
    assert not missing, f"numeric config keys without a range rule in rules.NUMBER_RULES: {missing}"
    stale = sorted(set(NUMBER_RULES) - set(keys))
    assert not stale, f"rules for keys the schema no longer has: {stale}"


def _numeric_options(parser: argparse.ArgumentParser, where: str = "nemo-aot"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_options(sub, f"{where} {name}")
        elif action.type in (int, float) and action.option_strings:
            yield where, action.option_strings[0]


def test_every_numeric_command_line_option_has_a_rule():
    found = list(_numeric_options(cli._build_parser()))
    assert ("nemo-aot train", "--gpu-memory-gib") in found
    missing = [f"{where} {opt}" for where, opt in found if opt not in OPTION_RULES]
    assert not missing, f"numeric options without a rule in rules.OPTION_RULES: {missing}"
    # convert takes no numbers: nothing to check there (asserted so a new option gets a rule)
    assert not [w for w, _ in found if w.startswith("nemo-aot convert")]


def _valid() -> AOTConfig:
    cfg = AOTConfig()
    cfg.model.rope_scaling = RopeScaling()  # reach the optional section's keys too
    return cfg


def test_the_schema_defaults_pass_their_own_rules():
    check_numbers(_valid())
    check_numbers(AOTConfig())  # rope_scaling null: its keys are not checked


def _bad_values(rule):
    bad = [math.nan, math.inf, -math.inf]
    if rule.low is not None:
        bad.append(rule.low if rule.low_open else rule.low - 1)
    if rule.high is not None:
        bad.append(rule.high if rule.high_open else rule.high + 1)
    if rule.integer:
        bad.append((rule.low or 0) + 2.5)
    if not rule.nullable:
        bad.append(None)
    bad.append(True)  # a bool is not a number here
    return bad


BAD = [(key, value) for key, rule in NUMBER_RULES.items() for value in _bad_values(rule)]


def _set(cfg, key, value):
    *sections, name = key.split(".")
    node = cfg
    for part in sections:
        node = getattr(node, part)
    setattr(node, name, value)


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_every_rule_refuses_its_bad_values_naming_the_key(key, value):
    cfg = _valid()
    _set(cfg, key, value)
    with pytest.raises(ValueError) as err:
        check_numbers(cfg)
    assert str(err.value).startswith(f"{key} must be "), str(err.value)
    assert repr(value) in str(err.value)


def test_an_optional_section_switched_off_is_not_checked():
    cfg = AOTConfig()
    assert cfg.model.rope_scaling is None
    check_numbers(cfg)


# --------------------------------------------------------------------------- through the commands

# (override, key named) through Hydra's parser: what a user types
OVERRIDES = [("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
             ("trainer.grad_clip=nan", "trainer.grad_clip"),
             ("trainer.grad_clip=-1", "trainer.grad_clip"),
             ("alignment.beta=-inf", "alignment.beta"), ("optim.adam_beta2=1", "optim.adam_beta2"),
             ("trainer.max_time_minutes=0", "trainer.max_time_minutes"),
             ("data.seed=-3", "data.seed"), ("checkpoint.keep_last=0", "checkpoint.keep_last")]


def _cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _commands(tmp_path):
    """Each command that takes config overrides, as argv with a slot for the override."""
    return {
        "train": ["train", "recipe=demo"],
        "demo": ["demo", "--output-dir", str(tmp_path / "demo")],
        "train --plan": ["train", "--plan", "recipe=demo", "trainer.devices=1"],
        "train --print-config": ["train", "--print-config", "recipe=demo"],
        "launch --dry-run": ["launch", "--dry-run", "--", "train", "recipe=demo"],
    }


@pytest.mark.parametrize("override,key", OVERRIDES[:5], ids=[o for o, _ in OVERRIDES[:5]])
def test_every_command_refuses_bad_numbers_before_doing_anything(override, key, tmp_path,
                                                                capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, argv in _commands(tmp_path).items():
        code, out, err = _cli(capsys, [*argv, override])
        assert code == 2, (name, out, err)
        assert f"error: {key} must be" in err, (name, err)
        assert "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # refused before any output was written


@pytest.fixture
def stored_run(tmp_path):
    """A checkpoint-like folder with a stored config (what `nemo-aot export` resolves)."""
    folder = tmp_path / "step_00000004"
    folder.mkdir()
    run = resolve_run(["recipe=demo"], world=World(1))
    (folder / "config.yaml").write_text(to_yaml(run.config))
    return folder


@pytest.mark.parametrize("override,key", OVERRIDES[:4], ids=[o for o, _ in OVERRIDES[:4]])
def test_export_refuses_bad_numbers_in_its_overrides(override, key, stored_run):
    checkpoint_config(str(stored_run))  # the stored run itself is fine
    with pytest.raises(ValueError, match=f"^{key} must be"):
        checkpoint_config(str(stored_run), overrides=[override])


OPTIONS = [
    (["train", "--plan", "--gpu-memory-gib", v, "recipe=demo", "trainer.devices=1"],
     "--gpu-memory-gib") for v in ("-80", "0", "nan", "inf")] + [
    (["score", "--model", "m.nemo", "--data", "d.jsonl", "--out", "o.jsonl", opt, v], opt)
    for opt, v in (("--micro-batch-size", "0"), ("--tp", "-1"), ("--pp", "0"),
                   ("--max-seq-length", "1"))] + [
    (["export", "--checkpoint", "run", "--out", "p.nemo", "--step", "-2"], "--step")]


@pytest.mark.parametrize("argv,option", OPTIONS,
                         ids=[f"{a[0]} {o} {i}" for i, (a, o) in enumerate(OPTIONS)])
def test_numeric_options_are_checked_by_their_rule(argv, option, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, _, err = _cli(capsys, argv)
    assert code == 2 and f"error: {option} must be" in err, err


def test_the_plan_takes_a_sane_memory_size(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, err = _cli(capsys, ["train", "--plan", "--gpu-memory-gib", "0.5", "recipe=demo",
                                   "trainer.devices=1"])
    assert code == 0, err
    assert "0.5 GiB" in out
    with pytest.raises(ValueError, match="--gpu-memory-gib"):
        check_option("--gpu-memory-gib", float("nan"))


def test_the_launcher_module_refuses_bad_numbers(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = launcher.main(["--dry-run", "--", "train", "recipe=demo", "optim.lr=inf"])
    err = capsys.readouterr().err
    assert code == 2 and "optim.lr must be a finite number > 0, got inf" in err


def test_launched_cli_says_one_line_and_exits_2():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "nemo_aot.cli", "train", "recipe=demo",
                           "optim.lr=inf"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "nemo-aot train: error: optim.lr must be a finite number > 0, got inf" in proc.stderr
    assert "Traceback" not in proc.stderr

