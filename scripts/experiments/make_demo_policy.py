"""Write the bundled tiny SFT policy ``nemo_aot/data/bundled/tiny_sft.nemo`` (~0.7 MB).

    python -m scripts.experiments.make_demo_policy [--out nemo_aot/data/bundled/tiny_sft.nemo]

It is the study's reference policy: ``sft_reference.py`` with its defaults (a random tiny Llama
fine-tuned on addition/subtraction until greedy dev accuracy first reaches 0.4). The demo can
start from it (``init_from=bundled:tiny_sft.nemo`` once the demo recipe resolves bundled paths)
instead of from random weights, and ``run_study.py --reference bundled`` skips stage 1.

The weights are deterministic for a given machine (one thread, fixed seeds); the archive bytes
are not (tar timestamps), so the script prints a digest of the weights to compare instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile

from . import common

DEFAULT_OUT = os.path.join(common.ROOT, "nemo_aot", "data", "bundled", "tiny_sft.nemo")


def weights_digest(nemo_path: str) -> str:
    """sha256 over the exported Hugging Face tensors (name, dtype, shape, bytes), name order."""
    policy = common.HFPolicy.from_nemo(nemo_path)
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import torch

    from . import sft_reference

    torch.set_num_threads(1)  # one thread: the same reductions, the same weights, every run

    with tempfile.TemporaryDirectory(prefix="aot_demo_policy_") as tmp:
        sft_reference.main(["--out", tmp])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        shutil.copyfile(os.path.join(tmp, "reference.nemo"), args.out)
    print(f"{args.out}: {os.path.getsize(args.out)} bytes, weights sha256 "
          f"{weights_digest(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
