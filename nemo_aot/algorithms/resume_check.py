"""Resuming a different run: the config a checkpoint was trained with against the one resuming.

Each checkpoint stores the resolved config (``config.yaml``) and its hash (in ``COMPLETE.json``).
When the hashes differ, the two configs are compared key by key:

* a key the stored config lacks (written by an older version of this package, before the key
  existed) is no change while the resuming run has it at the schema's default;
* keys that say how long, how often and where - the run's length (``trainer.max_steps``,
  ``trainer.max_epochs``: extending a run), cadences, the time budget, the launch geometry,
  outputs, ``checkpoint.*``, ``logging.*`` and ``performance.*`` (which leave results unchanged)
  - may differ freely (``RESUME_FREE``); they are logged and recorded;
* any other change (the loss, beta, the learning rate, the data, the model...) refuses the
  resume, naming the keys, unless ``checkpoint.allow_config_change=true``.

Whatever changed is recorded: one JSON line per resume in ``<output_dir>/config_changes.jsonl``
and in the markers of the checkpoints the resumed run writes. After a change the resumed run
follows its own config: the LR schedule is rebuilt from the current ``optim.*`` and run length
at the checkpoint's step (megatron's scheduler would otherwise keep the checkpoint's values).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from nemo_aot.algorithms.config import AOTConfig

CHANGES_FILE = "config_changes.jsonl"
OVERRIDE_KEY = "checkpoint.allow_config_change"

RESUME_FREE_PREFIXES = ("checkpoint.", "logging.", "performance.")
RESUME_FREE = frozenset({
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time_minutes",
    "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.log_every_n_steps",
    "trainer.num_nodes", "trainer.devices", "alignment.reference_cache_dir",
    "data.validation_path", "data.validation_negatives_path", "data.validation_split",
})
_ABSENT = "<absent>"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _plain(cfg: AOTConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def config_changes(stored_yaml: str, current: AOTConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (stored value, current value)} for every key that differs. A key missing from
    the stored config counts only when the current value is not the schema's default."""
    import yaml

    stored = _flatten(yaml.safe_load(stored_yaml) or {})
    now, defaults = _plain(current), _plain(AOTConfig())
    changes = {}
    for key in sorted(set(stored) | set(now)):
        old, new = stored.get(key, _ABSENT), now.get(key, _ABSENT)
        if old == new:
            continue
        if old is _ABSENT and key in defaults and defaults[key] == new:
            continue  # written before the key existed; the run uses its default
        changes[key] = (old, new)
    return changes


def is_free(key: str) -> bool:
    """Whether ``key`` may differ on resume without ``checkpoint.allow_config_change``."""
    return key in RESUME_FREE or key.startswith(RESUME_FREE_PREFIXES)


def check_resume(changes: dict[str, tuple[Any, Any]], checkpoint: str, allow: bool) -> None:
    """Refuse a resume whose changes go beyond ``RESUME_FREE`` unless ``allow``."""
    blocking = {k: v for k, v in changes.items() if not is_free(k)}
    if not blocking or allow:
        return
    listed = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in blocking.items())
    raise ValueError(
        f"resuming {checkpoint} with a different config: {listed}. Put the keys back to resume "
        f"this run, start a new one (another logging.output_dir, or checkpoint.resume=never), "
        f"or pass {OVERRIDE_KEY}=true to continue it with the change (recorded in "
        f"{CHANGES_FILE})")


def _show(value: Any) -> str:
    return "absent (older checkpoint)" if value is _ABSENT else repr(value)


def record(output_dir: str, step: int, checkpoint: str,
           changes: dict[str, tuple[Any, Any]], allowed: bool) -> dict:
    """Append the resume's changes to ``<output_dir>/config_changes.jsonl``; returns the entry."""
    entry = {"time": time.time(), "resumed_at_step": step, "checkpoint": checkpoint,
             "allowed_by": OVERRIDE_KEY if allowed and any(not is_free(k) for k in changes)
             else "resume-free keys",
             "changes": {k: [None if o is _ABSENT else o, n] for k, (o, n) in changes.items()}}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, CHANGES_FILE), "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    return entry


def stored_config(checkpoint_dir: str) -> Optional[str]:
    """The config text a checkpoint was written with, or None (checkpoints before it was kept)."""
    from nemo_aot.algorithms.checkpointing import CONFIG_FILE

    path = os.path.join(checkpoint_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


__all__ = ["config_changes", "check_resume", "record", "is_free", "stored_config",
           "CHANGES_FILE", "OVERRIDE_KEY", "RESUME_FREE"]
