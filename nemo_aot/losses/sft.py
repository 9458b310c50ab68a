"""The SFT term: the negative log-likelihood of the chosen responses, added to the preference loss.

    total = preference loss + sft_loss_weight * NLL,

    NLL = -(1 / N) sum_{i chosen} sum_{t in response i} log pi(y_it | x_i, y_i<t),

where N is the number of response tokens of all chosen responses of the batch (the positives,
for unpaired data): one per-token mean over the batch's chosen tokens, not a mean of per-sequence
means, so a long response weighs more than a short one. This is Hugging Face TRL's
``DPOTrainer`` with ``loss_type=[<preference loss>, "sft"]`` and ``loss_weights=[1, w]``
(``-per_token_logps[chosen_mask].mean()``), and its earlier ``rpo_alpha`` (RPO, arXiv
2404.19733: the cross-entropy of the chosen half over its unmasked tokens, times ``rpo_alpha``);
NeMo-Aligner and NeMo-RL call the weight ``sft_loss_weight``. The term does not sort, so it is
the same under every loss type and sort scope.

Split over micro-batches and data-parallel ranks, the NLL is a sum of shares: a share is some
chosen responses' summed log-probs over the *whole batch's* N, so the shares of every micro-batch
on every rank add up to the NLL exactly, in value and gradient. N is known on the host before the
step (the chosen rows' loss masks); the caller passes it in.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_sft_loss_weight(weight) -> None:
    """Raise ``ValueError`` unless ``weight`` is a finite number >= 0."""
    if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight) or weight < 0):
        raise ValueError(f"sft_loss_weight must be a finite number >= 0, got {weight!r}")


def chosen_nll(chosen_logps: torch.Tensor, num_tokens) -> torch.Tensor:
    """A share of the chosen responses' per-token NLL: ``-sum(chosen_logps) / num_tokens``.

    Args:
        chosen_logps: 1-D, each chosen response's log-prob *summed* over its tokens (the share's
            responses; all of the batch's for the whole NLL).
        num_tokens: the whole batch's count of chosen response tokens, a host number >= 0 (a
            batch without chosen tokens has no NLL: 0 counts as 1, and the share is 0).

    Returns:
        A 0-d tensor (fp32, or the input's dtype if wider), differentiable in ``chosen_logps``.
    """
    if not isinstance(chosen_logps, torch.Tensor) or chosen_logps.dim() != 1 \
            or not chosen_logps.is_floating_point():
        got = (f"{chosen_logps.dtype} of shape {tuple(chosen_logps.shape)}"
               if isinstance(chosen_logps, torch.Tensor) else type(chosen_logps).__name__)
        raise ValueError("chosen_logps must be a 1-D floating-point tensor (one summed log-prob "
                         f"per chosen response), got {got}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Real) \
            or not num_tokens >= 0:
        raise ValueError(f"num_tokens must be a host number >= 0, got {num_tokens!r}")
    logps = chosen_logps.to(torch.promote_types(chosen_logps.dtype, torch.float32))
    return -logps.sum() / max(float(num_tokens), 1.0)
