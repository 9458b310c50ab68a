"""Preference data for AOT: formats, validation, tokenization, collation and DP batch samplers.

    from nemo_aot.data import DataConfig, load_preference_data, make_batches
    cfg = DataConfig()                                   # the bundled arithmetic demo
    train = load_preference_data(cfg, "train")           # PreferenceData (+ .summary)
    batches = make_batches(train, cfg, global_batch_size=8, micro_batch_size=2, dp_rank=0,
                           dp_size=1)
    for step in batches:                                 # one list of micro-batch dicts per step
        ...
    state = batches.state_dict()                         # resume: batches.load_state_dict(state)

The batch dict keys and the shift/mask convention are documented in ``collate``; the order and
resume rules in ``sampler``. This package imports neither megatron nor nemo.
"""

from nemo_aot.data.collate import PreferenceBatches, collate_micro_batch, collate_step, make_batches
from nemo_aot.data.config import BUNDLED_DIR, DataConfig, resolve_path
from nemo_aot.data.dataset import (
    LoadSummary,
    PreferenceData,
    TokenizedExample,
    load_preference_data,
)
from nemo_aot.data.demo_task import score_answer
from nemo_aot.data.formats import LabeledCompletion, PreferencePair, detect_format, parse_record
from nemo_aot.data.readers import RecordError, iter_rows
from nemo_aot.data.sampler import (
    FILLER,
    TrainBatchSampler,
    ValidationBatchSampler,
    make_batch_sampler,
    micro_batch_counts,
)
from nemo_aot.data.synthetic import synthetic_preference_data
from nemo_aot.data.tokenization import PromptResponseTokenizer, load_tokenizer

__all__ = [
    "BUNDLED_DIR", "FILLER", "DataConfig", "LabeledCompletion", "LoadSummary",
    "PreferenceBatches", "PreferenceData", "PreferencePair", "PromptResponseTokenizer",
    "RecordError", "TokenizedExample", "TrainBatchSampler", "ValidationBatchSampler",
    "collate_micro_batch", "collate_step", "detect_format", "iter_rows", "load_preference_data",
    "load_tokenizer", "make_batch_sampler", "make_batches", "micro_batch_counts", "parse_record",
    "resolve_path", "score_answer", "synthetic_preference_data",
]
