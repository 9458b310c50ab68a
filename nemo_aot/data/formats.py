"""Preference record formats: parse a raw row into a validated, format-independent record.

Formats (canonical field -> default column):
  nemo_dpo       NeMo-Aligner DPO JSONL: prompt, chosen_response, rejected_response,
                 optional chosen_reward, rejected_reward (numbers)
  trl_paired     TRL: prompt, chosen, rejected; without a prompt column the prompt is implicit
                 (TRL's rule): the longest common prefix of chosen and rejected, characters for
                 text, whole messages for conversations (e.g. Anthropic-HH-style records)
  trl_unpaired   TRL unpaired (KTO-style): prompt, completion, label (boolean, true = desirable)
  unpaired_files one positives file + one negatives file, each with prompt, completion
                 (an optional label column must agree with the file it is in)
Texts are plain strings or conversational: lists of ``{"role", "content"}`` messages. When any
part of a record is conversational, plain-string parts are wrapped (prompt as a user turn,
responses as an assistant turn), so ``prompt: [...], chosen: "42"`` is accepted.
Conversations follow TRL's conversational format: system, user, assistant and tool messages; an
assistant message may carry ``tool_calls`` (its content may then be empty) and
``reasoning_content``, a tool message ``name`` / ``tool_call_id``; a record's ``tools`` column
(a list of JSON schemas, or a JSON string of one) goes to the chat template with the messages.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Union

from nemo_aot.data.readers import RecordError

Messages = tuple  # tuple of {"role": str, "content": str, ...} dicts
MESSAGE_KEYS = ("tool_calls", "name", "tool_call_id", "reasoning_content")
"""Message keys kept besides role and content (TRL's conversational format)."""
Text = Union[str, Messages]

DEFAULT_COLUMNS = {
    "nemo_dpo": {"prompt": "prompt", "chosen": "chosen_response", "rejected": "rejected_response",
                 "chosen_reward": "chosen_reward", "rejected_reward": "rejected_reward"},
    "trl_paired": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
    "trl_unpaired": {"prompt": "prompt", "completion": "completion", "label": "label"},
    "unpaired_files": {"prompt": "prompt", "completion": "completion", "label": "label"},
}
REQUIRED = {
    "nemo_dpo": ("prompt", "chosen", "rejected"),
    "trl_paired": ("prompt", "chosen", "rejected"),
    "trl_unpaired": ("prompt", "completion", "label"),
    "unpaired_files": ("prompt", "completion"),
}
DETECTION_ORDER = ("nemo_dpo", "trl_paired", "trl_unpaired")
TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) response."""

    prompt: Text
    chosen: Text
    rejected: Text
    location: str
    chosen_reward: Optional[float] = None
    rejected_reward: Optional[float] = None
    tools: Optional[tuple] = None
    """The record's ``tools`` column (JSON schemas for the chat template), if any."""


@dataclass(frozen=True)
class LabeledCompletion:
    """A prompt with one response judged desirable (label True) or undesirable (False)."""

    prompt: Text
    completion: Text
    label: bool
    location: str
    tools: Optional[tuple] = None


Record = Union[PreferencePair, LabeledCompletion]


def column_map(fmt: str, overrides: dict[str, str]) -> dict[str, str]:
    """Canonical field -> column name for ``fmt`` after the user's ``data.columns`` renames."""
    mapping = dict(DEFAULT_COLUMNS[fmt])
    mapping.update({k: v for k, v in overrides.items() if k in mapping})
    return mapping


def detect_format(row: dict, overrides: dict[str, str], location: str) -> str:
    """Pick the first format whose required columns are all present in ``row`` (a TRL pair
    without a prompt column counts as ``trl_paired``: its prompt is implicit)."""
    for fmt in DETECTION_ORDER:
        mapping = column_map(fmt, overrides)
        if all(mapping[f] in row for f in REQUIRED[fmt]):
            return fmt
    if _implicit_prompt_row(row, column_map("trl_paired", overrides)):
        return "trl_paired"
    expected = "; ".join(f"{fmt}: {[column_map(fmt, overrides)[f] for f in REQUIRED[fmt]]}"
                         for fmt in DETECTION_ORDER)
    raise RecordError(location, f"cannot detect the format from keys {sorted(row)} (expected "
                      f"{expected})",
                      "set data.format explicitly and map your column names with data.columns")


def parse_record(fmt: str, row: dict, overrides: dict[str, str], roles: list[str], location: str,
                 file_label: Optional[bool] = None) -> Record:
    """Validate ``row`` as format ``fmt``; raise RecordError naming the location and the fix.

    ``file_label`` is the label implied by the file for ``unpaired_files`` (True = positives).
    """
    mapping = column_map(fmt, overrides)
    if fmt == "trl_paired" and _implicit_prompt_row(row, mapping):
        row = _split_implicit_prompt(row, mapping, location)
    for name in REQUIRED[fmt]:
        if mapping[name] not in row:
            keys = [mapping[f] for f in REQUIRED[fmt]]
            raise RecordError(location, f"missing key {mapping[name]!r} (format {fmt} needs "
                              f"{keys}; found {sorted(row)})",
                              f"add the key, or map your column with data.columns.{name}=<column>")
    fields = {name: row.get(mapping[name]) for name in mapping}
    conversational = any(isinstance(v, (list, tuple))
                         for n, v in fields.items() if n in TEXT_FIELDS)
    prompt = _text(fields["prompt"], mapping["prompt"], location, roles, conversational, "user")
    tools = _tools(row.get("tools"), location)
    if fmt in ("nemo_dpo", "trl_paired"):
        return PreferencePair(
            prompt=prompt,
            chosen=_text(fields["chosen"], mapping["chosen"], location, ["assistant"],
                         conversational, "assistant"),
            rejected=_text(fields["rejected"], mapping["rejected"], location, ["assistant"],
                           conversational, "assistant"),
            location=location,
            chosen_reward=_reward(fields.get("chosen_reward"), mapping.get("chosen_reward"),
                                  location),
            rejected_reward=_reward(fields.get("rejected_reward"), mapping.get("rejected_reward"),
                                    location),
            tools=tools,
        )
    completion = _text(fields["completion"], mapping["completion"], location, ["assistant"],
                       conversational, "assistant")
    label = fields.get("label")
    if fmt == "trl_unpaired" or label is not None:
        label = _boolean(label, mapping["label"], location)
    if file_label is not None:
        if label is not None and label != file_label:
            which = "positives" if file_label else "negatives"
            raise RecordError(location, f"{mapping['label']!r} is {label} in the {which} file",
                              "move the record to the other file, or drop the label column")
        label = file_label
    return LabeledCompletion(prompt=prompt, completion=completion, label=label, location=location,
                             tools=tools)


def _implicit_prompt_row(row: dict, mapping: dict[str, str]) -> bool:
    return mapping["prompt"] not in row and mapping["chosen"] in row and mapping["rejected"] in row


def _split_implicit_prompt(row: dict, mapping: dict[str, str], location: str) -> dict:
    """TRL's implicit prompt: the longest common prefix of chosen and rejected (characters of
    text, or whole messages; for text a space just before the split stays with the responses)."""
    chosen, rejected = row[mapping["chosen"]], row[mapping["rejected"]]
    text = isinstance(chosen, str) and isinstance(rejected, str)
    if not text and not (isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple))):
        raise RecordError(location, f"no {mapping['prompt']!r} column, and {mapping['chosen']!r} / "
                          f"{mapping['rejected']!r} are not both text or both message lists, so "
                          "the prompt cannot be taken from their common start",
                          f"add a {mapping['prompt']!r} column (or map one with "
                          "data.columns.prompt)")
    end = 0
    while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
        end += 1
    if text and end > 0 and end < min(len(chosen), len(rejected)) and chosen[end - 1] == " ":
        end -= 1
    if end == 0 or end in (len(chosen), len(rejected)):
        problem = ("they share no common start" if end == 0 else
                   "one of them is the other's start, so its response would be empty")
        raise RecordError(location, f"no {mapping['prompt']!r} column, and the implicit prompt "
                          f"(the common start of {mapping['chosen']!r} and "
                          f"{mapping['rejected']!r}) cannot be taken: {problem}",
                          f"add a {mapping['prompt']!r} column with the prompt")
    return {**row, mapping["prompt"]: chosen[:end], mapping["chosen"]: chosen[end:],
            mapping["rejected"]: rejected[end:]}


def _text(value, key: str, location: str, roles: list[str], conversational: bool,
          wrap_role: str) -> Text:
    if value is None:
        raise RecordError(location, f"{key!r} is null",
                          f"give {key!r} a value or remove the record")
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(location, f"{key!r} is empty",
                              f"give {key!r} text or remove the record")
        return ({"role": wrap_role, "content": value},) if conversational else value
    if isinstance(value, (list, tuple)):
        return _messages(value, key, location, roles)
    raise RecordError(location, f"{key!r} must be a string or a list of {{role, content}} "
                      f"messages, got {type(value).__name__}",
                      f"store {key!r} as text or as a message list")


def _messages(value, key: str, location: str, roles: list[str]) -> Messages:
    if not value:
        raise RecordError(location, f"{key!r} is an empty message list",
                          f"give {key!r} at least one message")
    out = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecordError(location, f"{where} must be an object with 'role' and 'content', "
                              f"got {message!r:.80}",
                              "write each message as {\"role\": ..., \"content\": ...}")
        role, content = message["role"], message["content"]
        if content is None and message.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        if role not in roles:
            fix = ("responses hold only assistant messages; move other turns into the prompt"
                   if roles == ["assistant"]
                   else "use an allowed role, or extend data.message_roles")
            raise RecordError(location, f"{where} has unknown role {role!r} (allowed here: "
                              f"{roles})", fix)
        if not isinstance(content, str):
            raise RecordError(location, f"{where}.content must be a string, got "
                              f"{type(content).__name__}",
                              "flatten multi-part content into one string")
        extra = {k: message[k] for k in MESSAGE_KEYS if message.get(k) is not None}
        if "tool_calls" in extra and role != "assistant":
            raise RecordError(location, f"{where} has tool_calls but role {role!r}",
                              "only assistant messages call tools")
        out.append({"role": role, "content": content, **extra})
    if not any(m["content"].strip() or m.get("tool_calls") for m in out):
        raise RecordError(location, f"{key!r} has only empty messages",
                          f"give {key!r} text or remove the record")
    return tuple(out)


def _tools(value, location: str) -> Optional[tuple]:
    """TRL's ``tools`` column: a list of JSON schemas (or a JSON string of one); None if absent."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecordError(location, f"'tools' is a string but not JSON ({err})",
                              "store tools as a list of JSON schemas") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise RecordError(location, f"'tools' must be a list of JSON schemas (objects), got "
                          f"{type(value).__name__}", "store tools as a list of objects")
    return tuple(value) or None


def _reward(value, key: Optional[str], location: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(location, f"{key!r} must be a finite number, got {value!r:.40}",
                          f"store {key!r} as a number, or leave it out")
    return float(value)


def _boolean(value, key: str, location: str) -> bool:
    # numpy.bool_ from parquet/pandas
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise RecordError(location, f"{key!r} must be a boolean (true = desirable, false = "
                      f"undesirable), got {type(value).__name__} {value!r:.40}",
                      f"write {key!r} as JSON true/false")
