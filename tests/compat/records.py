"""The compatibility tier's record folder (tests/compat/run.sh sets ``NEMO_AOT_COMPAT_DIR``).

``<dir>/<megatron-core version>/`` holds what a release computed; the baseline release's folder
(0.16.1, the release CI runs) also holds the inputs every other release starts from, and a
``done`` file once complete. ``diffs.json`` in a release's folder collects the largest
differences from the baseline, for the README's table.
"""

import json
import os

import pytest

RECORDS = os.environ.get("NEMO_AOT_COMPAT_DIR")
BASELINE = "0.16.1"
ONLY_IN_THE_TIER = pytest.mark.skipif(
    not RECORDS, reason="compatibility tier only (NEMO_AOT_COMPAT_DIR; make test-compat)")


def version() -> str:
    from nemo_aot.algorithms.checkpointing import megatron_core_version

    return megatron_core_version()


def is_baseline() -> bool:
    return version() == BASELINE


def folder(release: str) -> str:
    path = os.path.join(RECORDS, release)
    os.makedirs(path, exist_ok=True)
    return path


def baseline() -> str:
    """The baseline's folder; fails unless its records are complete (or this is the baseline)."""
    path = os.path.join(RECORDS, BASELINE)
    if not is_baseline() and not os.path.exists(os.path.join(path, "done")):
        pytest.fail(f"no complete baseline records under {path}: run the tier with "
                    f"megatron-core {BASELINE} first (tests/compat/run.sh does)")
    return path


def record(name: str, value) -> None:
    """Store one measured difference in this release's diffs.json."""
    path = os.path.join(folder(version()), "diffs.json")
    diffs = {}
    if os.path.exists(path):
        with open(path) as f:
            diffs = json.load(f)
    diffs[name] = value
    with open(path, "w") as f:
        json.dump(diffs, f, indent=1, sort_keys=True)
