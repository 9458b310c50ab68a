"""The preference objective's options: ``AlignmentConfig``, the ``alignment`` section of a run.

Each field's docstring is its user-facing help. The loss types are those of the registry
(``registry.LOSS_SPECS``), read when ``validate`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .api import check_options
from .registry import LOSS_SPECS
from .sft import check_sft_loss_weight

SORT_SCOPES = ("micro", "data_parallel", "global")
REFERENCE_POLICIES = ("cached", "cpu_swap", "adapters_off")
LOGPROBS_FROM = ("hidden_states", "logits")


@dataclass
class AlignmentConfig:
    """The preference objective (arXiv 2406.05882) and where its sort happens."""

    loss_type: str = "aot_unpaired"
    """A registered loss type (nemo_aot/losses/registry.py): aot_unpaired (chosen vs rejected
    rewards, any counts), aot_paired (policy vs reference margins), dpo or ipo."""
    beta: float = 0.1
    """Logistic scale (DPO/AOT), margin for the hinge-type surrogates, IPO's tau. The paper
    used 0.01 with the logistic surrogate."""
    surrogate: str = "logistic"
    """Convex surrogate h of the AOT/DPO losses: logistic, squared_hinge, least_squares, hinge."""
    label_smoothing: float = 0.0
    """cDPO flip probability in [0, 0.5); logistic surrogate only."""
    sort_scope: str = "data_parallel"
    """Which samples one sort sees: micro (this rank's micro-batch, TRL's behaviour),
    data_parallel (the micro-batch gathered over all DP ranks), global (the whole global batch,
    one extra no-grad forward per step)."""
    length_normalize: bool = False
    """Average response log-probs over tokens instead of summing them."""
    sft_loss_weight: float = 0.0
    """Weight w >= 0 of the SFT term: loss = preference loss + w * NLL of the chosen (positive)
    responses, a per-token mean over every chosen response token of the global batch (TRL's
    rpo_alpha / loss_type "sft"; nemo_aot/losses/sft.py). Added outside the sort, so the same
    for every loss type and sort scope; logged as nll_loss. Counters chosen log-probs falling
    with the rejected ones."""
    reference_policy: str = "cached"
    """cached: one scoring pass writes reference log-probs, reused across steps, epochs, runs;
    cpu_swap: reference weights kept in CPU memory and swapped in once per global batch;
    adapters_off (LoRA only): the frozen base, i.e. the policy with its adapters switched off,
    scored once per global batch (no copy, no cache)."""
    reference_cache_dir: Optional[str] = None
    """Where cached reference log-probs live (default: <output_dir>/reference_cache)."""
    logprob_chunk_size: int = 1024
    """Sequence positions per chunk of the vocab-parallel log-softmax (bounds fp32 memory)."""
    logprobs_from: str = "hidden_states"
    """hidden_states: log-probs from the final hidden states and the output weight, one chunk
    of logits at a time, so no [b, s, V] logits tensor exists (nemo_aot/models/logprobs.py);
    logits: from the model's own logits (megatron's output layer), as a reference."""
    reproduce_atol: float = 1e-3
    """global scope: the grad pass must reproduce the no-grad pass's rewards within this."""

    def validate(self, prefix: str = "alignment") -> None:
        for key, allowed in (("loss_type", tuple(LOSS_SPECS)), ("sort_scope", SORT_SCOPES),
                             ("reference_policy", REFERENCE_POLICIES),
                             ("logprobs_from", LOGPROBS_FROM)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{prefix}.{key} must be one of {list(allowed)}, got "
                                 f"{getattr(self, key)!r}")
        try:
            check_options(self.loss_type, self.beta, self.label_smoothing, self.surrogate)
        except ValueError as err:
            raise ValueError(f"{prefix}: {err}") from None
        try:
            check_sft_loss_weight(self.sft_loss_weight)
        except ValueError as err:
            raise ValueError(f"{prefix}.{err} (0 turns the SFT term off)") from None
        if self.logprob_chunk_size < 1:
            raise ValueError(f"{prefix}.logprob_chunk_size must be >= 1")
