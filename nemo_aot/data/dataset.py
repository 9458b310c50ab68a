"""Load a preference split: read -> validate -> tokenize -> length policy -> PreferenceData.

Paired data has one stream of examples (pairs: a prompt and two responses, chosen first);
unpaired data has two streams, positives then negatives (a prompt and one response each).
Problems with records are collected and reported together (the first few, with file and line);
over-length records follow ``data.length_policy`` and every skip is counted in the summary, which
is logged at INFO (shown by default) with how many records were read, kept and dropped and why.
Tokenizing a large split reports progress on rank 0 (``nemo_aot.progress``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from nemo_aot.data.config import FORMAT_KINDS, DataConfig, resolve_path
from nemo_aot.data.formats import PreferencePair, Record, detect_format, parse_record
from nemo_aot.data.readers import RecordError, iter_rows
from nemo_aot.data.tokenization import PromptResponseTokenizer, load_tokenizer
from nemo_aot.progress import Progress

logger = logging.getLogger(__name__)
MAX_REPORTED = 10
TOKENIZE_CHUNK = 1024  # records per batched tokenizer call; progress is counted per chunk
DROP_REASONS = {  # LoadSummary.dropped key -> why, as the summary line says it
    "too_long": "longer than data.max_seq_length={limit} under data.length_policy=drop",
    "response_too_long": "whose response alone does not fit data.max_seq_length={limit}",
    # A pair whose chosen and rejected responses tokenize identically has a margin of exactly 0
    # under every policy: no preference to learn, only a constant in the loss. Dropped (not
    # refused: a mined preference set has a few such pairs), each one named in a warning.
    "identical": "whose chosen and rejected responses are identical",
}


@dataclass(frozen=True)
class TokenizedExample:
    """A tokenized prompt with its responses ((chosen, rejected) for a pair, (completion,) else)."""

    prompt_ids: np.ndarray
    response_ids: tuple
    rewards: tuple  # one float per response; NaN when the data gives none
    location: str


@dataclass
class LoadSummary:
    """What loading a split did: counts and token-length percentiles (after the length policy)."""

    source: str
    format: str
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count: too_long, response_too_long
    positives: Optional[int] = None
    negatives: Optional[int] = None
    lengths: dict = field(default_factory=dict)  # sequence|prompt|response -> {p50, p90, p99, max}
    max_seq_length: Optional[int] = None  # the limit the length policy applied
    dropped_at: dict = field(default_factory=dict)  # reason -> file:line of the first dropped

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        limit = "?" if self.max_seq_length is None else self.max_seq_length
        kept = f"{self.kept} kept"
        if self.truncated:
            kept += (f" ({self.truncated} with the prompt cut from the left to fit "
                     f"data.max_seq_length={limit})")
        dropped = f"{self.num_dropped} dropped"
        if self.dropped:
            dropped += " (" + ", ".join(
                f"{count} {DROP_REASONS.get(reason, reason).format(limit=limit)}"
                for reason, count in self.dropped.items()) + ")"
        parts = [f"{self.source} ({self.format}): {self.records} records read, {kept}, {dropped}"]
        if self.positives is not None:
            parts.append(f"positives {self.positives}, negatives {self.negatives}")
        for name, stats in self.lengths.items():
            parts.append(f"{name} tokens " + " ".join(f"{k}={v}" for k, v in stats.items()))
        return "; ".join(parts)


@dataclass
class PreferenceData:
    """A loaded split: ``kind`` is paired (streams = (pairs,)) or unpaired ((positives,
    negatives))."""

    kind: str
    streams: tuple
    pad_id: int
    source: str
    summary: LoadSummary

    @property
    def stream_names(self) -> tuple:
        return ("pairs",) if self.kind == "paired" else ("positives", "negatives")


def load_preference_data(config: DataConfig, split: str = "train",
                         tokenizer=None, drop_identical: bool = True) -> PreferenceData:
    """Load the ``train`` or ``validation`` split described by ``config``.

    ``tokenizer`` is a loaded Hugging Face tokenizer; when None, ``config.tokenizer_path`` is
    loaded. ``drop_identical``: drop pairs whose chosen and rejected responses are identical
    (training; named in a warning); scoring keeps every record.
    """
    config.validate()
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    path = config.train_path if split == "train" else config.validation_path
    if path is None:
        raise ValueError("data.validation_path is null, so there is no validation split. Fix: "
                         "set it")
    negatives = (config.train_negatives_path if split == "train"
                 else config.validation_negatives_path)
    hf_split = config.train_split if split == "train" else config.validation_split
    source = path if negatives is None else f"{path} + {negatives}"
    encoder = PromptResponseTokenizer(
        tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer_path),
        config.apply_chat_template, config.add_eos, config.chat_template_kwargs)
    problems = _Problems()
    fmt, records = _read_records(config, path, negatives, hf_split, problems)
    problems.raise_if_any(source)
    summary = LoadSummary(source=source, format=fmt, records=len(records),
                          max_seq_length=config.max_seq_length)
    examples = _tokenize(records, encoder, config, summary, problems, f"tokenizing {split} split",
                         drop_identical)
    problems.raise_if_any(source)
    paired = FORMAT_KINDS[fmt] == "paired"
    _warn_identical(summary, split)
    if paired and summary.dropped.get("identical", 0) == len(records):
        raise ValueError(f"{source}: every one of its {len(records)} pairs has identical chosen "
                         f"and rejected responses (e.g. {summary.dropped_at['identical'][0]}); "
                         "there is no preference to learn. Fix: check the chosen/rejected "
                         "columns (data.columns)")
    streams = _streams(records, examples, paired, source, config.length_policy)
    if not paired:
        summary.positives, summary.negatives = len(streams[0]), len(streams[1])
    summary.lengths = _percentiles(streams)
    logger.info("loaded %s split: %s", split, summary)
    return PreferenceData("paired" if paired else "unpaired", streams, encoder.pad_id, source,
                          summary)


class _Problems:
    def __init__(self):
        self.messages, self.count = [], 0

    def add(self, error: RecordError) -> None:
        self.count += 1
        if len(self.messages) < MAX_REPORTED:
            self.messages.append(str(error))

    def raise_if_any(self, source: str) -> None:
        if self.count == 1:
            raise ValueError(self.messages[0])
        if self.count:
            more = (f"\n... and {self.count - len(self.messages)} more"
                    if self.count > len(self.messages) else "")
            raise ValueError(f"{self.count} invalid records in {source}:\n"
                             + "\n".join(self.messages) + more)


def _read_records(config: DataConfig, path: str, negatives: Optional[str], hf_split: str,
                  problems: _Problems) -> tuple[str, list[Record]]:
    if config.is_two_file_unpaired:
        records = []
        for file, label in ((path, True), (negatives, False)):
            records += _parse_file(config, "unpaired_files", file, hf_split, problems,
                                   file_label=label)
        return "unpaired_files", records
    fmt = config.format
    rows = list(iter_rows(resolve_path(path), hf_split))
    _require_rows(rows, path)
    if fmt == "auto":
        first = next(((loc, row) for loc, row in rows if isinstance(row, dict)), None)
        if first is None:  # every row unreadable: report those
            fmt = "trl_paired"
        else:
            fmt = detect_format(first[1], config.columns, first[0])
    return fmt, _parse_rows(config, fmt, rows, problems)


def _parse_file(config, fmt, path, hf_split, problems, file_label) -> list[Record]:
    rows = list(iter_rows(resolve_path(path), hf_split))
    _require_rows(rows, path)
    return _parse_rows(config, fmt, rows, problems, file_label)


def _parse_rows(config, fmt, rows, problems, file_label=None) -> list[Record]:
    records = []
    for location, row in rows:
        try:
            if isinstance(row, RecordError):
                raise row
            records.append(parse_record(fmt, row, config.columns, config.message_roles, location,
                                        file_label))
        except RecordError as e:
            problems.add(e)
    return records


def _require_rows(rows: list, path: str) -> None:
    if not rows:
        raise ValueError(f"{path}: no records (the file or split is empty). Fix: point the data "
                         f"path at a source with at least one record")


def _tokenize(records: list[Record], encoder: PromptResponseTokenizer, config: DataConfig,
              summary: LoadSummary, problems: _Problems, what: str,
              drop_identical: bool = True) -> list[Optional[TokenizedExample]]:
    """Render, tokenize (one batched call per chunk) and apply the length policy; once a record
    is invalid, the rest are only rendered, to report every problem at once."""
    examples: list[Optional[TokenizedExample]] = [None] * len(records)
    with Progress(len(records), what, "records") as progress:
        for start in range(0, len(records), TOKENIZE_CHUNK):
            chunk = range(start, min(start + TOKENIZE_CHUNK, len(records)))
            rendered, rendered_at = _render(records, chunk, encoder, problems)
            if not problems.count:
                for i, (prompt, responses) in zip(rendered_at, encoder.encode(rendered)):
                    examples[i] = _example(records[i], prompt, responses, encoder, config, summary,
                                           problems, drop_identical)
            progress.update(len(chunk))
    return examples


def _render(records: list[Record], chunk: range, encoder: PromptResponseTokenizer,
            problems: _Problems) -> tuple[list, list[int]]:
    rendered, rendered_at = [], []
    for i in chunk:
        record = records[i]
        responses = ((record.chosen, record.rejected) if isinstance(record, PreferencePair)
                     else (record.completion,))
        try:
            rendered.append(encoder.render(record.prompt, responses, record.location,
                                           record.tools))
            rendered_at.append(i)
        except RecordError as e:
            problems.add(e)
    return rendered, rendered_at


def _example(record: Record, prompt: np.ndarray, responses: list, encoder: PromptResponseTokenizer,
             config: DataConfig, summary: LoadSummary, problems: _Problems,
             drop_identical: bool = True) -> Optional[TokenizedExample]:
    if drop_identical and isinstance(record, PreferencePair) and \
            np.array_equal(responses[0], responses[1]):
        _drop(summary, "identical", record.location)
        return None
    try:
        prompt = _apply_length_policy(prompt, responses, config, encoder.bos_id, record.location,
                                      summary)
    except RecordError as e:
        problems.add(e)
        return None
    if prompt is None:
        return None
    rewards = ((record.chosen_reward, record.rejected_reward) if isinstance(record, PreferencePair)
               else (None,))
    return TokenizedExample(prompt, tuple(responses),
                            tuple(math.nan if r is None else r for r in rewards), record.location)


def _apply_length_policy(prompt: np.ndarray, responses: list, config: DataConfig,
                         bos_id: Optional[int], location: str,
                         summary: LoadSummary) -> Optional[np.ndarray]:
    """Return the (possibly truncated) prompt, or None when the record is dropped (counted)."""
    limit, longest = config.max_seq_length, max(len(r) for r in responses)
    total = len(prompt) + longest
    if total <= limit:
        summary.kept += 1
        return prompt
    if config.length_policy == "error":
        raise RecordError(location, f"sequence of {total} tokens (prompt {len(prompt)} + "
                          f"response {longest}) exceeds data.max_seq_length={limit}",
                          "raise data.max_seq_length, or set data.length_policy to drop or "
                          "truncate_prompt_left")
    head = 1 if bos_id is not None and prompt[0] == bos_id else 0
    budget = limit - longest - head  # prompt tokens we can keep after BOS
    if config.length_policy == "drop" or budget < 1:
        _drop(summary, "too_long" if config.length_policy == "drop" else "response_too_long",
              location)
        return None
    summary.kept += 1
    summary.truncated += 1
    return np.concatenate([prompt[:head], prompt[len(prompt) - budget:]])


def _drop(summary: LoadSummary, reason: str, location: str) -> None:
    summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
    summary.dropped_at.setdefault(reason, [])
    if len(summary.dropped_at[reason]) < MAX_REPORTED:
        summary.dropped_at[reason].append(location)


def _warn_identical(summary: LoadSummary, split: str) -> None:
    count = summary.dropped.get("identical", 0)
    if count:
        at = summary.dropped_at["identical"]
        more = f" and {count - len(at)} more" if count > len(at) else ""
        logger.warning("%s split: dropped %d of %d records of %s whose chosen and rejected "
                       "responses are identical (no preference to learn): %s%s", split, count,
                       summary.records, summary.source, ", ".join(at), more)


def _streams(records, examples, paired: bool, source: str, policy: str) -> tuple:
    if paired:
        streams = ([e for e in examples if e is not None],)
    else:
        streams = ([e for r, e in zip(records, examples) if e is not None and r.label],
                   [e for r, e in zip(records, examples) if e is not None and not r.label])
    names = ("pairs",) if paired else ("positives", "negatives")
    for k, (name, stream) in enumerate(zip(names, streams)):
        if stream:
            continue
        had = len(records) if paired else sum(bool(r.label) == (k == 0) for r in records)
        if had:
            raise ValueError(f"{source}: all {had} {name} were dropped by "
                             f"data.length_policy={policy}. Fix: raise data.max_seq_length or "
                             f"shorten the records")
        raise ValueError(f"{source}: has no {name}. Fix: unpaired AOT needs both desirable (label "
                         f"true) and undesirable (label false) examples; check the labels or the "
                         f"files")
    return streams


def _percentiles(streams: tuple) -> dict:
    prompts = [len(e.prompt_ids) for s in streams for e in s]
    responses = [len(r) for s in streams for e in s for r in e.response_ids]
    sequences = [len(e.prompt_ids) + len(r) for s in streams for e in s for r in e.response_ids]
    out = {}
    for name, values in (("sequence", sequences), ("prompt", prompts), ("response", responses)):
        arr = np.asarray(values)
        out[name] = {f"p{q}": int(np.percentile(arr, q, method="higher")) for q in (50, 90, 99)}
        out[name]["max"] = int(arr.max())
    return out
