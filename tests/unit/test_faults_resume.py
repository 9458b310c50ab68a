"""Resuming a different run: the stored config against the resuming one, key by key
(``nemo_aot.algorithms.resume_check``), as a table of changes; the launched resume is in
tests/e2e/test_faults_e2e.py."""

import json

import pytest
import yaml

from nemo_aot.algorithms import resume_check
from nemo_aot.algorithms.config import to_yaml
from nemo_aot.algorithms.resolve import World, resolve_run


@pytest.fixture(scope="module")
def stored():
    """The demo run's resolved config as a checkpoint stores it."""
    return resolve_run(["recipe=demo"], world=World(1)).config


def _resumed(*overrides):
    return resolve_run(["recipe=demo", *overrides], world=World(1)).config


# (override on resume, keys that differ, refused without the override)
TABLE = [
    ((), set(), False),
    (("optim.lr=3e-4",), {"optim.lr"}, True),
    (("alignment.loss_type=dpo", "alignment.sort_scope=micro"),
     {"alignment.loss_type", "alignment.sort_scope"}, True),
    (("alignment.beta=0.5",), {"alignment.beta"}, True),
    (("data.train_path=other.jsonl", "data.validation_path=null"),
     {"data.train_path", "data.validation_path"}, True),
    (("trainer.max_steps=500",), {"trainer.max_steps"}, False),  # extending the run
    (("trainer.max_time_minutes=30", "checkpoint.save_interval=7", "logging.progress_bar=false"),
     {"trainer.max_time_minutes", "checkpoint.save_interval", "logging.progress_bar"}, False),
    (("performance.recompute_granularity=full", "performance.recompute_method=uniform",
      "performance.recompute_num_layers=1"),
     {"performance.recompute_granularity", "performance.recompute_method",
      "performance.recompute_num_layers"}, False),
    (("checkpoint.allow_config_change=true",), {"checkpoint.allow_config_change"}, False),
]


@pytest.mark.parametrize("overrides,keys,refused", TABLE, ids=[" ".join(o) or "same" for o, *_ in
                                                               TABLE])
def test_changes_are_named_and_refused_unless_resume_free(stored, overrides, keys, refused):
    changes = resume_check.config_changes(to_yaml(stored), _resumed(*overrides))
    assert set(changes) == keys
    if refused:
        with pytest.raises(ValueError) as err:
            resume_check.check_resume(changes, "ckpt/step_00000004", allow=False)
        for key in keys:  # the keys that block are named; resume-free ones are not
            assert (key in str(err.value)) != resume_check.is_free(key)
        assert resume_check.OVERRIDE_KEY in str(err.value)
        resume_check.check_resume(changes, "ckpt/step_00000004", allow=True)  # the override
    else:
        resume_check.check_resume(changes, "ckpt/step_00000004", allow=False)


def test_a_key_an_older_checkpoint_lacks_is_no_change_while_at_its_default(stored):
    old = yaml.safe_load(to_yaml(stored))
    del old["alignment"]["sft_loss_weight"]  # a key added after the checkpoint was written
    del old["checkpoint"]["allow_config_change"]
    del old["performance"]  # a whole section added later
    text = yaml.safe_dump(old)
    assert resume_check.config_changes(text, stored) == {}
    # ...but it is a change when the resuming run sets it to something else
    changes = resume_check.config_changes(text, _resumed("alignment.sft_loss_weight=0.5"))
    assert set(changes) == {"alignment.sft_loss_weight"}
    with pytest.raises(ValueError, match="alignment.sft_loss_weight: absent .*-> 0.5"):
        resume_check.check_resume(changes, "ckpt", allow=False)


def test_a_key_the_current_schema_dropped_counts_as_a_change(stored):
    old = yaml.safe_load(to_yaml(stored))
    old["alignment"]["retired_option"] = 3
    changes = resume_check.config_changes(yaml.safe_dump(old), stored)
    assert changes == {"alignment.retired_option": (3, "<absent>")}


def test_changes_are_recorded_in_the_run_folder(tmp_path, stored):
    changes = resume_check.config_changes(to_yaml(stored), _resumed("optim.lr=3e-4",
                                                                    "trainer.max_steps=99"))
    resume_check.record(str(tmp_path), 4, "ckpt/step_00000004", changes, allowed=True)
    resume_check.record(str(tmp_path), 8, "ckpt/step_00000008", {}, allowed=False)
    lines = (tmp_path / resume_check.CHANGES_FILE).read_text().splitlines()
    first = json.loads(lines[0])
    assert first["resumed_at_step"] == 4 and first["allowed_by"] == resume_check.OVERRIDE_KEY
    assert first["changes"]["optim.lr"] == [stored.optim.lr, 3e-4]
    assert first["changes"]["trainer.max_steps"][1] == 99
    assert len(lines) == 2
