"""Prompt/response tokenization with an exact boundary.

The prompt and each response are tokenized *separately* (``add_special_tokens=False``) and
concatenated, so no token straddles the boundary and the label mask covers exactly the response
tokens; the prompt ids are the ones the model is given at generation time.

Conversational records go through the tokenizer's own chat template (``data.tokenizer_path``,
else the tokenizer stored in ``init_from``), with ``data.chat_template_kwargs`` (e.g. Qwen3's
``enable_thinking``) and the record's ``tools``, as TRL renders them: the prompt is rendered with
``add_generation_prompt=True`` and the response text is what the template adds when the
response follows (``render(prompt + response)`` minus the rendered prompt; a template for which
the rendered prompt is not such a prefix is refused). Whitespace the template writes after the
response's final EOS is trimmed (generation stops at EOS, so it is never sampled).

Special tokens: the prompt starts with exactly one BOS when the template writes one, or, for
plain text, when the tokenizer adds one by default or the text already starts with one;
repeated leading BOS are collapsed. With ``add_eos`` each response ends with exactly one EOS.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from nemo_aot.data.config import resolve_path
from nemo_aot.data.formats import Text
from nemo_aot.data.readers import RecordError

# transformers imported lazily: it takes ~0.6 s and `nemo-aot --help` must not pay for it.


def load_tokenizer(path: str):
    """Load a Hugging Face tokenizer from a local folder (``bundled:`` paths allowed), offline."""
    resolved = resolve_path(path)
    if not os.path.isdir(resolved):
        raise ValueError(f"data.tokenizer_path {path!r} is not a folder. Fix: point it at a folder "
                         f"holding tokenizer.json and tokenizer_config.json")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ValueError(f"data.tokenizer_path {path!r} could not be loaded "
                         f"({type(e).__name__}: {e}). Fix: save the tokenizer there with "
                         f"tokenizer.save_pretrained()") from e


class PromptResponseTokenizer:
    """Turns a prompt and its responses into token id arrays (int32) with an exact boundary."""

    def __init__(self, tokenizer, apply_chat_template: str = "auto", add_eos: bool = True,
                 chat_template_kwargs: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.mode = apply_chat_template
        self.add_eos = add_eos
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token if self.eos_id is not None else None
        pad = tokenizer.pad_token_id
        # Padding positions are always masked, so any valid id will do when there is no pad token.
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.plain_adds_bos = self.bos_id is not None and probe[:1] == [self.bos_id]

    def render(self, prompt: Text, responses: Sequence[Text], location: str,
               tools: Optional[Sequence[dict]] = None) -> tuple[str, list[str], bool]:
        """Return ``(prompt_text, response_texts, templated)`` for one record (``tools``: the
        record's tool schemas for the template)."""
        conversational = not isinstance(prompt, str)
        if not conversational and self.mode != "always":
            return prompt, list(responses), False
        if conversational and self.mode == "never":
            raise RecordError(location, "record is conversational but data.apply_chat_template "
                              "is 'never'",
                              "set data.apply_chat_template to auto, or store pre-rendered text")
        if not self.has_template:
            raise RecordError(location,
                              "the tokenizer has no chat template to render this "
                              "conversational record with (the tokenizer of data.tokenizer_path, "
                              "else the one stored in init_from)",
                              "use a tokenizer with a chat_template (tokenizer_config.json or "
                              "chat_template.jinja), or store the data as plain text")
        messages = _as_messages(prompt, "user")
        prompt_text = self._apply(messages, location, True, tools)
        response_texts = []
        for response in responses:
            full = self._apply(messages + _as_messages(response, "assistant"), location, False,
                               tools)
            if not full.startswith(prompt_text):
                raise RecordError(location, "the chat template renders the prompt differently once "
                                  "a response follows (the rendered prompt is not a prefix of "
                                  "prompt + response)",
                                  "use a prefix-consistent template, or pre-render the text and "
                                  "set data.apply_chat_template=never")
            text = full[len(prompt_text):]
            if self.eos_text and text.rstrip().endswith(self.eos_text):
                text = text.rstrip()
            response_texts.append(text)
        return prompt_text, response_texts, True

    def encode(self, rendered: list[tuple[str, list[str], bool]]
               ) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Tokenize many rendered records at once (one batched call per side)."""
        prompts = self._ids([r[0] for r in rendered])
        responses = iter(self._ids([t for r in rendered for t in r[1]]))
        out = []
        for (_, texts, templated), prompt_ids in zip(rendered, prompts):
            prompt = self._finish_prompt(prompt_ids, templated)
            out.append((prompt, [self._finish_response(next(responses)) for _ in texts]))
        return out

    def _apply(self, messages: list[dict], location: str, add_generation_prompt: bool,
               tools: Optional[Sequence[dict]]) -> str:
        kwargs = dict(self.template_kwargs)
        if tools:  # a record's own tools win; an empty list renders as no tools (as in TRL)
            kwargs["tools"] = [dict(t) for t in tools]
        kwargs["tools"] = kwargs.get("tools") or None
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja raises template-defined errors
            raise RecordError(location, f"the chat template failed on this record "
                              f"({type(e).__name__}: {e})",
                              "fix the record's messages (roles/order the template expects)") from e

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _finish_prompt(self, ids: list[int], templated: bool) -> np.ndarray:
        if self.bos_id is not None:
            leading = 0
            while leading < len(ids) and ids[leading] == self.bos_id:
                leading += 1
            want_bos = leading > 0 or (not templated and self.plain_adds_bos)
            ids = ([self.bos_id] if want_bos else []) + list(ids[leading:])
        assert ids, "a non-empty prompt tokenizes to at least one token"
        return np.asarray(ids, dtype=np.int32)

    def _finish_response(self, ids: list[int]) -> np.ndarray:
        ids = list(ids)
        if self.eos_id is not None:
            while len(ids) >= 2 and ids[-1] == self.eos_id and ids[-2] == self.eos_id:
                ids.pop()
            if self.add_eos and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
        assert ids, "a non-empty response tokenizes to at least one token"
        return np.asarray(ids, dtype=np.int32)


# Padding a checkpoint's vocabulary beyond its tokenizer: HF configs round up by up to a few
# percent (e.g. 151936 rows for 151665 tokens); more than this is another model's tokenizer.
VOCAB_SLACK = (1024, 0.05)


def check_tokenizer_fits(given, stored, vocab_size: int, *, option: str, model: str,
                         unset: str) -> None:
    """The one check of a tokenizer given next to a model (``train``'s data.tokenizer_path,
    ``score``'s --tokenizer): it must have the vocabulary of the tokenizer stored with the model
    (``stored``; None when the model stores none), and its size must fit the model's embedding
    rows (``vocab_size``) up to padding. ``option`` names the setting (e.g.
    ``data.tokenizer_path=DIR``), ``model`` the checkpoint and ``unset`` how to use the stored
    one instead, in the messages."""
    if stored is not None:
        ours, theirs = given.get_vocab(), stored.get_vocab()
        if ours != theirs:
            differs = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
            raise ValueError(
                f"{option} has a different vocabulary ({len(ours)} tokens) from the tokenizer "
                f"stored in {model} ({len(theirs)} tokens; e.g. {differs}): its token ids would "
                f"mean other tokens to the model; {unset} to use the stored one")
    size = len(given)
    if size > vocab_size:
        raise ValueError(f"{option} has {size} tokens but the model's vocabulary ({model}) has "
                         f"{vocab_size}; use the model's own tokenizer")
    if vocab_size - size > max(VOCAB_SLACK[0], VOCAB_SLACK[1] * vocab_size):
        raise ValueError(f"{option} has {size} tokens, far fewer than the model's vocabulary of "
                         f"{vocab_size} ({model}): it belongs to another model; use the model's "
                         "own tokenizer")


def _as_messages(text: Text, role: str) -> list[dict]:
    if isinstance(text, str):
        return [{"role": role, "content": text}]
    return [dict(m) for m in text]
