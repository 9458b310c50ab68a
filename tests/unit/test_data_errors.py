"""Malformed inputs: each is a ValueError naming the file and line/row and the fix, or a counted
skip."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from nemo_aot.data import DataConfig, load_preference_data, load_tokenizer, make_batches

GOOD = {"prompt": "What is 1 + 2?", "chosen": "1 + 2 = 3", "rejected": "1 + 2 = 4"}
GOOD_U = {"prompt": "What is 1 + 2?", "completion": "1 + 2 = 3", "label": True}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled:tokenizer")


def _lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _load(tok, tmp_path, content: bytes, name="data.jsonl", **kw):
    path = tmp_path / name
    path.write_bytes(content)
    kw.setdefault("validation_path", None)
    return load_preference_data(DataConfig(train_path=str(path), **kw), "train", tok)


def _with(base, **changes):
    row = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            row.pop(k)
        else:
            row[k] = v
    return row


_DROP = object()
MSG = [{"role": "user", "content": "hi"}]

# name -> (file bytes, config overrides, regex that the message must match after
# "data.jsonl:line N: ")
CASES = {
    "invalid_json_line": (_lines(GOOD, '{"prompt": "a", "chosen": '), {}, (2, r"invalid JSON")),
    "line_not_an_object": (_lines(GOOD, "[1, 2]"), {}, (2, r"expected a JSON object, got list")),
    "missing_key": (_lines(GOOD, _with(GOOD, rejected=_DROP)), {},
                    (2, r"missing key 'rejected'.*data\.columns")),
    "missing_key_nemo_format": (_lines(GOOD), {"format": "nemo_dpo"},
                                (1, r"missing key 'chosen_response'")),
    "prompt_wrong_type": (_lines(_with(GOOD, prompt=5)), {},
                          (1, r"'prompt' must be a string or a list")),
    "response_wrong_type": (_lines(_with(GOOD, chosen={"text": "x"})), {},
                            (1, r"'chosen' must be a string")),
    "empty_prompt": (_lines(GOOD, GOOD, _with(GOOD, prompt="")), {}, (3, r"'prompt' is empty")),
    "blank_response": (_lines(_with(GOOD, rejected="   ")), {}, (1, r"'rejected' is empty")),
    "null_response": (_lines(_with(GOOD, chosen=None)), {}, (1, r"'chosen' is null")),
    "non_utf8_bytes": (_lines(GOOD) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
                       {}, (2, r"not UTF-8.*iconv")),
    "unknown_role": (_lines(_with(GOOD, prompt=[{"role": "human", "content": "hi"}])), {},
                     (1, r"unknown role 'human'.*data\.message_roles")),
    "response_role_not_assistant": (_lines(_with(GOOD, chosen=MSG)), {},
                                    (1, r"chosen\[0\] has unknown role 'user'")),
    "message_without_content": (_lines(_with(GOOD, prompt=[{"role": "user"}])), {},
                                (1, r"'role' and 'content'")),
    "message_content_not_string": (_lines(_with(GOOD, prompt=[{"role": "user", "content": ["a"]}])),
                                   {}, (1, r"content must be a string")),
    "empty_message_list": (_lines(_with(GOOD, prompt=[])), {}, (1, r"empty message list")),
    "label_string": (_lines(GOOD_U, _with(GOOD_U, label="true")), {},
                     (2, r"'label' must be a boolean.*true/false")),
    "label_integer": (_lines(_with(GOOD_U, label=1)), {}, (1, r"'label' must be a boolean")),
    "reward_not_number": (_lines({"prompt": "Q", "chosen_response": "a", "rejected_response": "b",
                                  "chosen_reward": "high"}), {},
                          (1, r"'chosen_reward' must be a finite number")),
    "reward_nan": (b'{"prompt": "Q", "chosen_response": "a", "rejected_response": "b", '
                   b'"rejected_reward": NaN}\n',
                   {}, (1, r"'rejected_reward' must be a finite number")),
    "implicit_prompt_no_common_start": (
        _lines({"chosen": "Yes: 3", "rejected": "No: 4"}), {},
        (1, r"implicit prompt.*share no common start.*'prompt' column")),
    "implicit_prompt_empty_response": (
        _lines({"chosen": "1 + 2 = 3", "rejected": "1 + 2 = 3!"}), {},
        (1, r"implicit prompt.*response would be empty")),
    "implicit_prompt_mixed_types": (_lines({"chosen": "1 + 2 = 3", "rejected": MSG}), {},
                                    (1, r"not both text or both message lists")),
    "undetectable_format": (_lines({"question": "Q", "answer": "A"}), {},
                            (1, r"cannot detect the format.*data\.format")),
    "over_length_error_policy": (_lines(GOOD, _with(GOOD, prompt="What is 1 + 2? " * 20)),
                                 {"max_seq_length": 40},
                                 (2, r"exceeds data\.max_seq_length=40.*length_policy")),
    "conversational_with_never": (_lines(_with(GOOD, prompt=MSG)), {"apply_chat_template": "never"},
                                  (1, r"conversational.*apply_chat_template")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_record_names_file_line_and_fix(tok, tmp_path, name):
    content, overrides, (line, pattern) = CASES[name]
    with pytest.raises(ValueError) as info:
        _load(tok, tmp_path, content, **overrides)
    message = str(info.value)
    assert f"data.jsonl:line {line}: " in message
    assert re.search(pattern, message, re.S), message
    assert "Fix:" in message


def test_several_bad_records_are_reported_together(tok, tmp_path):
    content = _lines(_with(GOOD, prompt=""), GOOD, "not json", _with(GOOD, chosen=3))
    with pytest.raises(ValueError, match=r"3 invalid records") as info:
        _load(tok, tmp_path, content)
    for line in (1, 3, 4):
        assert f"data.jsonl:line {line}:" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty_file", "blank_lines_only"])
def test_empty_file(tok, tmp_path, content):
    with pytest.raises(ValueError, match=r"data\.jsonl: no records.*Fix"):
        _load(tok, tmp_path, content)


def test_json_file_that_is_not_a_list(tok, tmp_path):
    with pytest.raises(ValueError, match=r"data\.json:line 1: expected a JSON array.*Fix"):
        _load(tok, tmp_path, json.dumps({"rows": [GOOD]}).encode(), name="data.json")


def test_json_array_item_reports_its_row(tok, tmp_path):
    with pytest.raises(ValueError, match=r"data\.json:row 1: 'chosen' is empty"):
        _load(tok, tmp_path, json.dumps([GOOD, _with(GOOD, chosen="")]).encode(), name="data.json")


def test_corrupt_parquet(tok, tmp_path):
    with pytest.raises(ValueError, match=r"data\.parquet: cannot be read as parquet.*Fix"):
        _load(tok, tmp_path, b"PAR1 not really parquet", name="data.parquet")


def test_unsupported_extension(tok, tmp_path):
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type '\.csv'"):
        _load(tok, tmp_path, b"prompt,chosen,rejected\n", name="data.csv")


def test_missing_file(tok, tmp_path):
    cfg = DataConfig(train_path=str(tmp_path / "nope.jsonl"), validation_path=None)
    with pytest.raises(ValueError, match=r"nope\.jsonl: file not found"):
        load_preference_data(cfg, "train", tok)


def test_over_length_drop_policy_counts_the_skip(tok, tmp_path):
    long = _with(GOOD, prompt="What is 1 + 2? " * 20)
    data = _load(tok, tmp_path, _lines(GOOD, long, GOOD), max_seq_length=40, length_policy="drop")
    assert len(data.streams[0]) == 2
    assert data.summary.dropped == {"too_long": 1}
    assert data.summary.kept == 2 and data.summary.records == 3


def test_over_length_truncate_prompt_left_keeps_bos_and_response(tok, tmp_path):
    long = _with(GOOD, prompt="Some context. " * 20 + "What is 1 + 2?")
    data = _load(tok, tmp_path, _lines(long, GOOD), max_seq_length=40,
                 length_policy="truncate_prompt_left")
    assert data.summary.truncated == 1 and data.summary.kept == 2 and not data.summary.dropped
    example = data.streams[0][0]
    assert len(example.prompt_ids) + max(len(r) for r in example.response_ids) == 40
    assert example.prompt_ids[0] == tok.bos_token_id
    assert tok.decode(example.prompt_ids[1:]).endswith("What is 1 + 2?")  # cut from the left
    assert tok.decode(example.response_ids[0]) == GOOD["chosen"] + "<|end|>"


def test_truncate_policy_drops_response_that_cannot_fit(tok, tmp_path):
    huge = _with(GOOD, chosen="1 + 2 = 3 " * 20)
    data = _load(tok, tmp_path, _lines(GOOD, huge), max_seq_length=40,
                 length_policy="truncate_prompt_left")
    assert data.summary.dropped == {"response_too_long": 1} and len(data.streams[0]) == 1


def test_every_record_dropped_is_an_error(tok, tmp_path):
    long = _with(GOOD, prompt="What is 1 + 2? " * 20)
    with pytest.raises(ValueError, match=r"all 1 pairs were dropped by data\.length_policy=drop"):
        _load(tok, tmp_path, _lines(long), max_seq_length=40, length_policy="drop")


def test_unpaired_without_negatives(tok, tmp_path):
    with pytest.raises(ValueError, match=r"data\.jsonl: has no negatives.*Fix"):
        _load(tok, tmp_path, _lines(GOOD_U, GOOD_U))


def test_negatives_file_not_configured(tok, tmp_path):
    with pytest.raises(ValueError, match=r"data\.train_negatives_path is not set"):
        _load(tok, tmp_path, _lines(GOOD_U), format="unpaired_files")


def test_negatives_file_missing(tok, tmp_path):
    missing = str(tmp_path / "negatives.jsonl")
    with pytest.raises(ValueError, match=r"negatives\.jsonl: file not found"):
        _load(tok, tmp_path, _lines(GOOD_U), train_negatives_path=missing)


def test_label_disagreeing_with_its_file(tok, tmp_path):
    (tmp_path / "neg.jsonl").write_bytes(_lines(_with(GOOD_U, completion="1 + 2 = 4", label=True)))
    with pytest.raises(ValueError,
                       match=r"neg\.jsonl:line 1: 'label' is True in the negatives file"):
        _load(tok, tmp_path, _lines(GOOD_U), train_negatives_path=str(tmp_path / "neg.jsonl"))


def test_tokenizer_without_chat_template(tmp_path):
    tok = load_tokenizer("bundled:tokenizer")
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"data\.jsonl:line 1: the tokenizer has no chat template"):
        _load(tok, tmp_path, _lines(_with(GOOD, prompt=MSG)))


def test_prefix_inconsistent_chat_template(tmp_path):
    tok = load_tokenizer("bundled:tokenizer")
    tok.chat_template = ("{% if messages[-1]['role'] == 'assistant' %}[answered]{% endif %}"
                         "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
    with pytest.raises(ValueError,
                       match=r"line 1: the chat template renders the prompt differently"):
        _load(tok, tmp_path, _lines(_with(GOOD, prompt=MSG)))


def test_train_split_smaller_than_one_micro_batch(tok, tmp_path):
    data = _load(tok, tmp_path, _lines(GOOD))
    cfg = DataConfig()
    with pytest.raises(ValueError, match=r"data\.jsonl: 1 pairs are fewer than one global batch "
                                         r"needs \(2\).*Fix"):
        make_batches(data, cfg, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1)


def test_validation_split_smaller_than_one_global_batch_is_padded(tok, tmp_path):
    data = _load(tok, tmp_path, _lines(GOOD, GOOD, GOOD))
    ranks = [list(make_batches(data, DataConfig(), 8, 2, rank, 2, train=False))
             for rank in range(2)]
    assert all(len(steps) == 1 for steps in ranks)
    micro = [m for steps in ranks for m in steps[0]]
    # the chosen rows of each micro-batch
    weights = [w for m in micro for w in m["sample_weight"][:2].tolist()]
    assert weights == [1, 1, 1, 0, 0, 0, 0, 0]
    for m in micro:
        filler = m["sample_weight"] == 0
        assert m["loss_mask"][filler].sum() == 0 and (m["sample_index"][filler] == -1).all()


@pytest.mark.parametrize("overrides,key", [
    ({"length_policy": "truncate"}, "data.length_policy"),
    ({"format": "csv"}, "data.format"),
    ({"columns": {"answer": "x"}}, "data.columns"),
    ({"unpaired_positive_fraction": 1.5}, "data.unpaired_positive_fraction"),
    ({"max_seq_length": 1}, "data.max_seq_length"),
    ({"pad_to_multiple_of": 0}, "data.pad_to_multiple_of"),
    ({"apply_chat_template": "yes"}, "data.apply_chat_template"),
    ({"train_negatives_path": "n.jsonl", "format": "trl_paired"}, "data.train_negatives_path"),
    ({"train_path": "mine.jsonl"}, "data.validation_path is still the bundled demo"),
])
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        DataConfig(**overrides).validate()


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer_path .* is not a folder"):
        load_tokenizer(str(tmp_path / "no_tokenizer"))


def test_config_is_a_structured_schema_that_rejects_unknown_keys():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.to_object(OmegaConf.merge(schema, {"columns": {"chosen": "good"},
                                                          "max_seq_length": 64}))
    assert isinstance(merged, DataConfig) and merged.validate().columns == {"chosen": "good"}
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"max_seq_len": 64})


def test_saved_dataset_dict_split_selection(tok, tmp_path):
    import datasets

    rows = [GOOD, _with(GOOD, prompt="What is 2 + 2?")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(train_path=str(tmp_path / "dd"), train_split="test", validation_path=None,
                     apply_chat_template="never")
    assert len(load_preference_data(cfg, "train", tok).streams[0]) == 2
    cfg.train_split = "validation"
    with pytest.raises(ValueError, match=r"dd: saved DatasetDict has no split "
                                         r"'validation'.*data\.train_split"):
        load_preference_data(cfg, "train", tok)
