"""Random token-level preference data without a tokenizer, for tests and benchmarks.

Every example is reproducible from ``(seed, stream, index)``; prompt and response lengths vary
so padding and masks are exercised. Token ids lie in ``[3, vocab_size)`` (0 = pad, 1 = BOS,
2 = EOS), every prompt starts with BOS and every response ends with EOS.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from nemo_aot.data.dataset import LoadSummary, PreferenceData, TokenizedExample

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _tokens(rng: np.random.Generator, low: int, high: int, vocab_size: int) -> np.ndarray:
    return rng.integers(3, vocab_size, size=int(rng.integers(low, high + 1)), dtype=np.int32)


def _example(seed: int, stream: int, index: int, responses: int, vocab_size: int,
             prompt_len: tuple, response_len: tuple) -> TokenizedExample:
    rng = np.random.Generator(np.random.PCG64([seed, stream, index]))
    prompt = np.concatenate([[BOS_ID], _tokens(rng, *prompt_len, vocab_size)]).astype(np.int32)
    outs = tuple(
        np.concatenate([_tokens(rng, *response_len, vocab_size), [EOS_ID]]).astype(np.int32)
        for _ in range(responses))
    return TokenizedExample(prompt, outs, (math.nan,) * responses, f"synthetic:{stream}:{index}")


def synthetic_preference_data(kind: str, sizes: Sequence[int], vocab_size: int = 64,
                              seed: int = 0, prompt_len: tuple = (2, 9),
                              response_len: tuple = (1, 6)) -> PreferenceData:
    """``kind`` paired with ``sizes=(n_pairs,)`` or unpaired with ``sizes=(n_pos, n_neg)``."""
    if kind not in ("paired", "unpaired") or len(sizes) != (1 if kind == "paired" else 2):
        raise ValueError(f"kind must be paired with one size or unpaired with two, got {kind!r} "
                         f"{list(sizes)}")
    responses = 2 if kind == "paired" else 1
    streams = tuple([_example(seed, s, i, responses, vocab_size, prompt_len, response_len)
                     for i in range(n)]
                    for s, n in enumerate(sizes))
    total = sum(sizes)
    summary = LoadSummary(source=f"synthetic {kind}", format="synthetic", records=total, kept=total)
    if kind == "unpaired":
        summary.positives, summary.negatives = sizes
    return PreferenceData(kind, streams, PAD_ID, summary.source, summary)
