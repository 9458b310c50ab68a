"""No host sync per micro-batch in the AOT step (the CPU-visible proxy of a GPU stall).

On a GPU, reading a device value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
``float(t)``, boolean-mask indexing, ``nonzero``, ``.cpu()``) waits for the kernel queue; inside
megatron's schedule it stalls every micro-batch (and, under pipeline parallelism, the pipeline).
On CPU nothing stalls, so this test counts such calls made by nemo_aot's own code while the
schedule runs: there must be none. What the step needs from the host happens outside the
schedule, once per step (row counts before it, metrics and the reproduce check after it).
"""

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy",
           "masked_select"}


def _passes_through(filename: str) -> bool:
    """Frames between the call and its author: torch itself, and the CPU execution support's
    own torch-function mode (active on CPU only)."""
    return "/torch/" in filename or filename.endswith("nemo_aot/distributed/cpu_support.py")


def _count_syncs(scope, loss_type, sft_loss_weight):
    import sys

    from torch.overrides import TorchFunctionMode

    from mcore_utils import PreferenceStep
    from nemo_aot.losses.config import AlignmentConfig

    class Syncs(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            masked = name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1]) \
                and args[1].dtype == torch.bool
            if name in SYNCING or masked:
                caller = sys._getframe(1)
                while caller is not None and _passes_through(caller.f_code.co_filename):
                    caller = caller.f_back
                where = caller.f_code.co_filename if caller is not None else ""
                if "/nemo_aot/" in where:
                    self.seen.append(f"{name} at {where.split('/nemo_aot/')[1]}:{caller.f_lineno}")
            return func(*args, **(kwargs or {}))

    chunks, config = mu.setup(per_token_loss=False)
    step = PreferenceStep(chunks, config, vocab_size=250, padded_vocab_size=256,
                          alignment=AlignmentConfig(loss_type=loss_type, sort_scope=scope, beta=0.1,
                                                    sft_loss_weight=sft_loss_weight))
    paired = loss_type != "aot_unpaired"
    rank = torch.distributed.get_rank()
    mbs = [mu.preference_rows(2, 2 if paired else 3, seed=10 * rank + i, paired=paired)
           for i in range(3)]
    run, modes = step.policy.forward_backward, []

    def counted(*args, **kwargs):
        with Syncs() as mode:
            modes.append(mode)
            return run(*args, **kwargs)

    step.policy.forward_backward = counted
    result = step.step(mbs)
    return [s for m in modes for s in m.seen], result.metrics["loss"]


@pytest.mark.parametrize("scope, loss_type, ranks, sft_loss_weight", [
    ("micro", "aot_unpaired", 1, 0.0), ("data_parallel", "aot_unpaired", 2, 0.0),
    ("data_parallel", "aot_paired", 2, 1.0), ("global", "aot_unpaired", 2, 1.0)])
def test_no_host_sync_inside_the_schedule(scope, loss_type, ranks, sft_loss_weight):
    """With the SFT term too: its token count comes from the host, exchanged before the step."""
    results = run_multirank(_count_syncs, ranks, args=(scope, loss_type, sft_loss_weight),
                            timeout=240)
    for seen, loss in results:
        assert seen == [], seen
        assert loss == loss  # a real step ran (not NaN)
