"""Formats round-trip to the same tokens; exact prompt/response boundary; BOS/EOS; bundled demo."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

from nemo_aot.data import (
    BUNDLED_DIR,
    DataConfig,
    collate_micro_batch,
    load_preference_data,
    load_tokenizer,
    score_answer,
)
from nemo_aot.data.demo_task import correct_result, parse_question

CONTENT = [  # (question, chosen, rejected): merge-prone words, digits, punctuation, non-ASCII
    ("What is 17 + 25?", "17 + 25 = 42", "17 + 25 = 43"),
    ("Compute 9 * 8.", "9 * 8 = 72", "9 * 8 = 27"),
    ("Calculate 70 - 7, café.", "70 - 7 = 63", "70 - 7 = 77"),
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled:tokenizer")


def _user(text):
    return [{"role": "user", "content": text}]


def _asst(text):
    return [{"role": "assistant", "content": text}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _examples(data):
    return [[(e.prompt_ids.tolist(), [r.tolist() for r in e.response_ids]) for e in s]
            for s in data.streams]


def _load(tok, path, **kw):
    kw.setdefault("apply_chat_template", "always")
    return load_preference_data(DataConfig(train_path=path, validation_path=None, **kw), "train",
                                tok)


def test_paired_formats_round_trip_to_same_tokens(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in CONTENT]
    conv = [{"prompt": _user(q), "chosen": _asst(c), "rejected": _asst(r)} for q, c, r in CONTENT]
    nemo = [{"prompt": q, "chosen_response": c, "rejected_response": r} for q, c, r in CONTENT]
    renamed = [{"question": q, "good": c, "bad": r} for q, c, r in CONTENT]
    (tmp_path / "array.json").write_text(json.dumps(conv), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "conv.parquet")
    datasets.Dataset.from_list(conv).save_to_disk(str(tmp_path / "saved"))
    sources = {
        "trl_plain": dict(path=_write_jsonl(tmp_path / "plain.jsonl", plain)),
        "trl_conv": dict(path=_write_jsonl(tmp_path / "conv.jsonl", conv)),
        "nemo_dpo": dict(path=_write_jsonl(tmp_path / "nemo.jsonl", nemo), format="nemo_dpo"),
        "renamed": dict(path=_write_jsonl(tmp_path / "renamed.jsonl", renamed), format="trl_paired",
                        columns={"prompt": "question", "chosen": "good", "rejected": "bad"}),
        "json_array": dict(path=str(tmp_path / "array.json")),
        # TRL's implicit prompt: the conversation's shared turns are the prompt
        "trl_implicit_conv": dict(path=_write_jsonl(tmp_path / "implicit.jsonl", [
            {"chosen": _user(q) + _asst(c), "rejected": _user(q) + _asst(r)}
            for q, c, r in CONTENT])),
        "parquet": dict(path=str(tmp_path / "conv.parquet")),
        "save_to_disk": dict(path=str(tmp_path / "saved")),
    }
    results = {}
    for name, src in sources.items():
        data = _load(tok, src.pop("path"), **src)
        assert data.kind == "paired" and len(data.streams[0]) == len(CONTENT), name
        results[name] = _examples(data)
    reference = results.pop("trl_conv")
    for name, got in results.items():
        assert got == reference, f"{name} tokenized differently from TRL conversational"
    # The first pair decodes back to the templated conversation.
    prompt, (chosen, _) = reference[0][0]
    assert tok.decode(prompt + chosen) == \
        "<|bos|><|user|>What is 17 + 25?<|end|><|assistant|>17 + 25 = 42<|end|>"


def test_implicit_text_prompt_is_the_common_start(tok, tmp_path):
    from nemo_aot.data.formats import parse_record

    rows = [{"chosen": f"Human: {q} Assistant: {c}", "rejected": f"Human: {q} Assistant: {r}"}
            for q, c, r in CONTENT]
    pair = parse_record("trl_paired", rows[0], {}, ["user", "assistant"], "x:1")
    # TRL's rule: the longest common prefix, with a space just before the split left to the
    # responses ("17 + 25 = 4" is common to both answers here).
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        "Human: What is 17 + 25? Assistant: 17 + 25 = 4", "2", "3")
    explicit = []
    for row in rows:
        p = parse_record("trl_paired", row, {}, ["user", "assistant"], "x")
        explicit.append({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
    assert parse_record("trl_paired", {"chosen": "Q? A yes", "rejected": "Q? A no"}, {},
                        ["user"], "x").prompt == "Q? A"
    implicit = _examples(_load(tok, _write_jsonl(tmp_path / "i.jsonl", rows),
                               apply_chat_template="never"))
    assert implicit == _examples(_load(tok, _write_jsonl(tmp_path / "e.jsonl", explicit),
                                       apply_chat_template="never"))


def test_unpaired_formats_match_paired_sequences(tok, tmp_path):
    conv = [{"prompt": _user(q), "chosen": _asst(c), "rejected": _asst(r)} for q, c, r in CONTENT]
    paired = _examples(_load(tok, _write_jsonl(tmp_path / "p.jsonl", conv)))[0]
    rows = []
    for q, c, r in CONTENT:
        rows += [{"prompt": q, "completion": c, "label": True},
                 {"prompt": q, "completion": r, "label": False}]
    trl = _load(tok, _write_jsonl(tmp_path / "u.jsonl", rows))
    pos = _write_jsonl(tmp_path / "pos.jsonl",
                       [{"prompt": _user(q), "completion": _asst(c)} for q, c, _ in CONTENT])
    neg = _write_jsonl(tmp_path / "neg.jsonl",
                       [{"prompt": q, "completion": r} for q, _, r in CONTENT])
    two_file = _load(tok, pos, train_negatives_path=neg)
    for data in (trl, two_file):
        assert data.kind == "unpaired"
        positives, negatives = _examples(data)
        assert positives == [(p, [c]) for p, (c, _) in paired]
        assert negatives == [(p, [r]) for p, (_, r) in paired]


def test_prerendered_text_equals_template_route_with_one_bos(tok, tmp_path):
    """NeMo-Aligner style: prompt already templated (starting with BOS),
    apply_chat_template=never."""
    q, c, r = CONTENT[0]
    rows = [{"prompt": f"<|bos|><|user|>{q}<|end|><|assistant|>", "chosen_response": c,
             "rejected_response": r + "<|end|>"}]
    pre = _examples(_load(tok, _write_jsonl(tmp_path / "n.jsonl", rows),
                          apply_chat_template="never"))
    conv = [{"prompt": _user(q), "chosen": _asst(c), "rejected": _asst(r)}]
    templated = _examples(_load(tok, _write_jsonl(tmp_path / "c.jsonl", conv)))
    assert pre == templated
    prompt, (chosen, rejected) = pre[0][0]
    assert prompt.count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id
    # no doubled EOS
    assert chosen.count(tok.eos_token_id) == 1 and rejected.count(tok.eos_token_id) == 1
    # The trap we avoid: the tokenizer's default call on a rendered template doubles BOS.
    rendered = tok.apply_chat_template(_user(q), tokenize=False, add_generation_prompt=True)
    assert tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2


@pytest.mark.parametrize("prompt,response", [("Compu", "te 3 + 4."), ("What do you g", "et for 5?"),
                                             ("Calcul", "ate it")])
def test_boundary_mask_covers_exactly_response_tokens(tok, tmp_path, prompt, response):
    # The case must really tempt a merge: joint tokenization has a token across the boundary.
    joint = tok(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    assert any(s < len(prompt) < e for s, e in joint["offset_mapping"]), \
        "case does not tempt a merge"
    rows = [{"prompt": prompt, "chosen": response, "rejected": "no"}]
    data = _load(tok, _write_jsonl(tmp_path / "b.jsonl", rows), apply_chat_template="never")
    batch = collate_micro_batch(data, ((0,),))
    expected = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row_mask = batch["loss_mask"][0].bool()
    assert batch["labels"][0][row_mask].tolist() == expected
    n = int(batch["seq_lengths"][0])
    assert batch["input_ids"][0][n - len(expected):n].tolist() == expected
    assert batch["input_ids"][0][:n - len(expected)].tolist() == [tok.bos_token_id] + tok(
        prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(batch["labels"][0][row_mask]) == response + "<|end|>"


def test_chat_template_row_has_one_bos_one_eos_and_exact_mask(tok):
    data = load_preference_data(DataConfig(validation_path=None), "train", tok)
    batch = collate_micro_batch(data, ((0, 1, 2),))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for b in range(batch["input_ids"].shape[0]):
        n, p = int(batch["seq_lengths"][b]), int(batch["prompt_lengths"][b])
        row = batch["input_ids"][b][:n].tolist()
        assert row.count(bos) == 1 and row[0] == bos
        assert row[-1] == eos and row[p - 1] == tok.convert_tokens_to_ids("<|assistant|>")
        mask = batch["loss_mask"][b]
        assert mask[:p - 1].sum() == 0 and mask[p - 1:n - 1].sum() == n - p \
            and mask[n - 1:].sum() == 0
        assert batch["labels"][b][:n - 1].tolist() == row[1:]


def test_multi_turn_prompt_masks_only_the_final_response(tok, tmp_path):
    prompt = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "What is 2 + 2?"},
              {"role": "assistant", "content": "2 + 2 = 4"},
              {"role": "user", "content": "And 3 + 3?"}]
    rows = [{"prompt": prompt, "chosen": _asst("3 + 3 = 6"), "rejected": _asst("3 + 3 = 7")}]
    data = _load(tok, _write_jsonl(tmp_path / "m.jsonl", rows))
    batch = collate_micro_batch(data, ((0,),))
    assert tok.decode(batch["labels"][0][batch["loss_mask"][0].bool()]) == "3 + 3 = 6<|end|>"
    prompt_ids = batch["input_ids"][0][:int(batch["prompt_lengths"][0])].tolist()
    assert prompt_ids.count(tok.bos_token_id) == 1
    assert tok.decode(prompt_ids).endswith("<|user|>And 3 + 3?<|end|><|assistant|>")


def test_add_eos_appends_once_and_can_be_disabled(tok, tmp_path):
    rows = [{"prompt": "Q", "chosen": "yes", "rejected": "no<|end|>"}]
    path = _write_jsonl(tmp_path / "e.jsonl", rows)
    ((_, (chosen, rejected)),) = _examples(_load(tok, path, apply_chat_template="never"))[0]
    assert chosen[-1] == tok.eos_token_id and chosen.count(tok.eos_token_id) == 1
    assert rejected.count(tok.eos_token_id) == 1
    ((_, (chosen, _)),) = _examples(_load(tok, path, apply_chat_template="never", add_eos=False))[0]
    assert tok.eos_token_id not in chosen


def test_whitespace_after_template_eos_is_trimmed(tmp_path):
    tok = load_tokenizer("bundled:tokenizer")  # a private copy: the template is changed below
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}"
                         "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    rows = [{"prompt": _user("What is 1 + 1?"), "chosen": _asst("2"), "rejected": _asst("3")}]
    ((_, (chosen, _)),) = _examples(_load(tok, _write_jsonl(tmp_path / "w.jsonl", rows)))[0]
    assert tok.decode(chosen) == "2<|end|>"


def test_rewards_are_carried_and_nan_when_absent(tok, tmp_path):
    rows = [{"prompt": "Q", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 2.5,
             "rejected_reward": -1},
            {"prompt": "Q", "chosen_response": "a", "rejected_response": "b"}]
    data = _load(tok, _write_jsonl(tmp_path / "r.jsonl", rows), apply_chat_template="never")
    reward = collate_micro_batch(data, ((0, 1),))["reward"].tolist()
    assert reward[0] == 2.5 and reward[2] == -1.0
    assert math.isnan(reward[1]) and math.isnan(reward[3])


def test_summary_counts_and_percentiles(tok):
    data = load_preference_data(DataConfig(validation_path=None), "train", tok)
    s = data.summary
    assert (s.records, s.kept, s.truncated, s.num_dropped) == (1200, 1200, 0, 0)
    lengths = [len(e.prompt_ids) + len(r) for e in data.streams[0] for r in e.response_ids]
    assert s.lengths["sequence"]["max"] == max(lengths)
    assert s.lengths["sequence"]["p50"] == int(np.percentile(lengths, 50, method="higher"))
    assert "1200 kept" in str(s)


def test_bundled_demo_is_verifiable_and_splits_are_disjoint(tok):
    def rows(name):
        with open(os.path.join(BUNDLED_DIR, name), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    for split in ("train", "validation"):
        for r in rows(f"paired/{split}.jsonl"):
            q = r["prompt"][0]["content"]
            assert score_answer(q, r["chosen"][0]["content"]) == 1.0
            assert score_answer(q, r["rejected"][0]["content"]) == 0.0
        unpaired = rows(f"unpaired/{split}.jsonl")
        for r in unpaired:
            assert score_answer(r["prompt"][0]["content"],
                                r["completion"][0]["content"]) == float(r["label"])
        positives = sum(r["label"] for r in unpaired)
        # a thumbs-up/down log: unequal, fewer positives
        assert 0 < positives < len(unpaired) - positives
    train_q = {parse_question(r["prompt"][0]["content"]) for r in rows("paired/train.jsonl")}
    val_q = {parse_question(r["prompt"][0]["content"]) for r in rows("paired/validation.jsonl")}
    assert not train_q & val_q
    assert correct_result("What is 12 - 5?") == 7
    assert score_answer("What is 3 * 4?", "3 * 4 = 12") == 1.0
    assert len(tok) <= 512


def test_generator_reproduces_bundled_files_byte_for_byte(tmp_path):
    import importlib.util

    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "make_demo_data.py")
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    generated = [os.path.join(root, name) for root, _, files in os.walk(tmp_path) for name in files]
    assert len(generated) >= 5
    for fresh in generated:  # files the generator writes (others, e.g. tiny_sft.nemo, are not its)
        name = os.path.basename(fresh)
        bundled = os.path.join(BUNDLED_DIR, os.path.relpath(fresh, tmp_path))
        with open(bundled, "rb") as a, open(fresh, "rb") as b:
            old, new = a.read(), b.read()
        # the serializer's layout may change across tokenizers releases
        if name == "tokenizer.json":
            old, new = json.loads(old), json.loads(new)
            old, new = [(t["model"]["vocab"], t["model"]["merges"], t["added_tokens"])
                        for t in (old, new)]
        assert old == new, f"{name} differs from the generator's output"
