"""Thin Hydra entry point, for users who launch NeMo-style scripts:

    python scripts/train_gpt_aot.py recipe=llama3_8b init_from=... data.train_path=...
    torchrun --nproc_per_node=8 scripts/train_gpt_aot.py recipe=llama3_8b ...

Same config tree and validation as `nemo-aot train` (conf/gpt_aot.yaml over the typed schema in
nemo_aot/algorithms/config.py).
"""

import os
import sys

import hydra

from nemo_aot.algorithms.config import register_schema
from nemo_aot.algorithms.resolve import resolve_composed

register_schema()
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf")


@hydra.main(config_path=CONF, config_name="gpt_aot", version_base=None)
def main(raw) -> None:
    from nemo_aot.algorithms.run import run_training
    from nemo_aot.progress import configure_logging

    configure_logging()  # as `nemo-aot`: nemo_aot at INFO (NEMO_AOT_LOG_LEVEL), INFO on rank 0

    try:  # resolved for this process's world (torchrun's ranks, else one process)
        run = resolve_composed(raw)
    except ValueError as err:
        print(f"train_gpt_aot: error: {err}", file=sys.stderr)
        sys.exit(2)
    run_training(run)


if __name__ == "__main__":
    main()
