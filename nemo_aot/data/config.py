"""Typed configuration of the data section (embedded later into the trainer's config).

Paths may start with ``bundled:`` to name a file shipped in ``nemo_aot/data/bundled`` (the
defaults point at the bundled arithmetic demo), so configs never carry machine paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")
BUNDLED_PREFIX = "bundled:"

# The one vocabulary of data kinds: paired data (a chosen and a rejected response per prompt)
# or unpaired data (responses labelled desirable or not, any counts). Each format is one kind;
# ``auto`` on one file is decided by the first record, when the data are read.
DATA_KINDS = ("paired", "unpaired")
FORMAT_KINDS = {"nemo_dpo": "paired", "trl_paired": "paired", "trl_unpaired": "unpaired",
                "unpaired_files": "unpaired"}
FORMATS = ("auto", *FORMAT_KINDS)
LENGTH_POLICIES = ("error", "drop", "truncate_prompt_left")
CHAT_TEMPLATE_MODES = ("auto", "always", "never")
# apply_chat_template arguments the tokenization sets itself (data.chat_template_kwargs may not).
RESERVED_TEMPLATE_KWARGS = ("conversation", "tokenize", "add_generation_prompt",
                            "continue_final_message", "return_dict", "return_tensors")
# Canonical field names a user can remap with `columns`.
CANONICAL_FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "chosen_reward",
                    "rejected_reward")


def resolve_path(path: str) -> str:
    """Expand a ``bundled:`` path to the package's bundled folder; other paths are returned as
    is."""
    if path.startswith(BUNDLED_PREFIX):
        return os.path.join(BUNDLED_DIR, path[len(BUNDLED_PREFIX):])
    return path


@dataclass
class DataConfig:
    """The ``data`` section: where preference data lives and how it becomes token batches."""

    format: str = "auto"
    """One of auto | nemo_dpo | trl_paired | trl_unpaired | unpaired_files. ``auto`` detects the
    format from the first record's keys (and picks unpaired_files when negatives paths are set).
    nemo_dpo: prompt, chosen_response, rejected_response[, chosen_reward, rejected_reward].
    trl_paired: prompt, chosen, rejected (plain text or lists of {role, content} messages).
    trl_unpaired: prompt, completion, label (a JSON boolean: true = desirable).
    unpaired_files: a positives file and a negatives file, each with prompt, completion."""

    train_path: str = "bundled:paired/train.jsonl"
    """Training source: a .jsonl/.json/.parquet file, a folder saved by ``Dataset.save_to_disk``,
    a local folder of data files, or a dataset name for ``datasets.load_dataset``. For
    unpaired_files this is the positives file."""

    validation_path: Optional[str] = "bundled:paired/validation.jsonl"
    """Validation source, same kinds as train_path; null disables validation."""

    train_negatives_path: Optional[str] = None
    """unpaired_files only: the training negatives (undesirable completions)."""

    validation_negatives_path: Optional[str] = None
    """unpaired_files only: the validation negatives."""

    train_split: str = "train"
    """Split name passed to ``datasets.load_dataset`` for a named/folder train source."""

    validation_split: str = "validation"
    """Split name passed to ``datasets.load_dataset`` for a named/folder validation source."""

    columns: dict[str, str] = field(default_factory=dict)
    """Column renames from canonical field names (prompt, chosen, rejected, completion, label,
    chosen_reward, rejected_reward) to the dataset's columns, e.g. {chosen: good_answer}."""

    tokenizer_path: Optional[str] = None
    """Local folder of a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) or a
    hub id ``org/name[@revision]`` (its tokenizer files only are fetched); null = the tokenizer
    stored in init_from's .nemo. A tokenizer given here must have the same
    vocabulary as the stored one (it may differ in chat template and settings)."""

    apply_chat_template: str = "auto"
    """auto: conversational records go through the tokenizer's chat template, plain text is
    used as is; always: plain text is wrapped as one user turn + one assistant turn first;
    never: text is used as is and conversational records are refused."""

    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of ``tokenizer.apply_chat_template`` for every record, as TRL's
    ``chat_template_kwargs``: e.g. {enable_thinking: false} for Qwen3's template, or
    {tools: [...]} (JSON schemas) for templates that list tools. A record's own ``tools`` column
    (TRL's conversational format) takes precedence over ``tools`` here."""

    message_roles: list[str] = field(
        default_factory=lambda: ["system", "user", "assistant", "tool"])
    """Roles accepted in conversational prompts (responses must be assistant messages; an
    assistant message may carry ``tool_calls``, a tool message the tool's output)."""

    max_seq_length: int = 256
    """Longest prompt + response, in tokens (EOS included)."""

    length_policy: str = "error"
    """What to do with a sequence longer than max_seq_length: error (stop and name the record),
    drop (skip it; counted in the load summary), or truncate_prompt_left (cut prompt tokens
    after BOS from the left; records whose response alone does not fit are dropped, counted)."""

    add_eos: bool = True
    """Append the tokenizer's EOS to each response unless the response already ends with it."""

    unpaired_positive_fraction: Optional[float] = None
    """Unpaired data: share of positives in each micro-batch, in (0, 1). null = the share of
    positives in the training data. Rounded to whole samples per micro-batch, at least one of
    each kind."""

    pad_to_multiple_of: int = 1
    """Pad each micro-batch's sequence length up to a multiple of this (16 under FP8; a multiple
    of the tensor-parallel size under sequence parallelism)."""

    uniform_step_length: bool = False
    """Pad all micro-batches of one step (on one rank) to the same length; needed by pipeline
    parallelism unless the model accepts variable sequence lengths."""

    pack_sequences: bool = False
    """Pack each micro-batch's sequences into rows of up to max_seq_length tokens (first-fit
    decreasing), attention causal within each sequence, instead of padding every sequence to the
    micro-batch's longest: the same log-probs, sort groups and loss with fewer padded positions.
    Local layer spec with SDPA attention only (nemo_aot/data/collate.py)."""

    seed: int = 1234
    """Seed of the per-epoch shuffles (the same seed and epoch give the same order)."""

    shuffle: bool = True
    """Shuffle training samples each epoch (validation is never shuffled)."""

    def validate(self) -> "DataConfig":
        """Check values and cross-field rules; raise ValueError naming the offending key."""
        _choice("format", self.format, FORMATS)
        _choice("length_policy", self.length_policy, LENGTH_POLICIES)
        _choice("apply_chat_template", self.apply_chat_template, CHAT_TEMPLATE_MODES)
        if not self.train_path:
            raise ValueError("data.train_path is empty; set it to a data file, folder or dataset "
                             "name")
        if self.tokenizer_path is not None and not str(self.tokenizer_path).strip():
            raise ValueError("data.tokenizer_path is empty; set it to a local tokenizer folder, "
                             "or to null to use the tokenizer stored in init_from's .nemo")
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            raise ValueError("data.max_seq_length must be an integer >= 2, got "
                             f"{self.max_seq_length!r}")
        if not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1:
            raise ValueError("data.pad_to_multiple_of must be an integer >= 1, got "
                             f"{self.pad_to_multiple_of!r}")
        frac = self.unpaired_positive_fraction
        if frac is not None and not 0.0 < frac < 1.0:
            raise ValueError("data.unpaired_positive_fraction must be in (0, 1) or null, got "
                             f"{frac!r}")
        unknown = sorted(set(self.columns) - set(CANONICAL_FIELDS))
        if unknown:
            raise ValueError(f"data.columns has unknown fields {unknown}; allowed: "
                             f"{list(CANONICAL_FIELDS)}")
        if not isinstance(self.chat_template_kwargs, dict):
            raise ValueError("data.chat_template_kwargs must be a mapping, e.g. "
                             "{enable_thinking: false}")
        reserved = sorted(set(self.chat_template_kwargs) & set(RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise ValueError(f"data.chat_template_kwargs sets {reserved}, which the tokenization "
                             "sets itself (the prompt with a generation prompt, prompt + response "
                             "without); remove them")
        if not self.message_roles or "assistant" not in self.message_roles:
            raise ValueError("data.message_roles must include 'assistant'")
        self._validate_negatives()
        if (not self.train_path.startswith(BUNDLED_PREFIX) and self.validation_path is not None
                and self.validation_path.startswith(BUNDLED_PREFIX)):
            raise ValueError(f"data.validation_path is still the bundled demo "
                             f"({self.validation_path}) while data.train_path is "
                             f"{self.train_path!r}; set data.validation_path to your "
                             f"validation data, or to null to skip validation")
        return self

    def _validate_negatives(self) -> None:
        has_negatives = self.train_negatives_path is not None
        if self.format == "unpaired_files" or (self.format == "auto" and has_negatives):
            if not has_negatives:
                raise ValueError("data.format is unpaired_files but data.train_negatives_path is "
                                 "not set; set it to the negatives file (train_path holds the "
                                 "positives)")
            if self.validation_path is not None and self.validation_negatives_path is None:
                raise ValueError("data.validation_negatives_path is not set but "
                                 "data.validation_path is; set both (positives and negatives) or "
                                 "set validation_path to null")
        elif has_negatives or self.validation_negatives_path is not None:
            raise ValueError("data.train_negatives_path/validation_negatives_path are only read "
                             f"with format unpaired_files, but data.format is {self.format!r}")

    @property
    def is_two_file_unpaired(self) -> bool:
        return self.format == "unpaired_files" or (
            self.format == "auto" and self.train_negatives_path is not None)

    @property
    def kind(self) -> Optional[str]:
        """The data kind the config declares (``DATA_KINDS``), or None when ``format=auto``
        leaves it to the first record of one file."""
        return "unpaired" if self.is_two_file_unpaired else FORMAT_KINDS.get(self.format)

    def kind_source(self) -> str:
        """The keys that make the declared kind, for messages."""
        if self.format == "auto" and self.train_negatives_path is not None:
            return ("data.train_negatives_path (a positives file and a negatives file: "
                    "data.format=auto reads them as unpaired_files)")
        return f"data.format={self.format}"


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{key} must be one of {list(allowed)}, got {value!r}")
