"""Data that cannot teach: pairs whose chosen and rejected responses are identical are dropped
(the documented choice: their margin is 0 under every policy) and named in a warning with file,
line and count, in every paired format; ``score`` keeps them (it scores records, it does not
learn from them); a file of nothing but such pairs is refused, and without a prompt column
(TRL's implicit prompt) such a record has no response and is refused by line. ``train``,
``demo`` and the launcher load data through ``load_preference_data`` (as checked here);
export, convert and --plan read no data."""

import json

import pytest

from nemo_aot.data.config import DataConfig
from nemo_aot.data.dataset import load_preference_data

SAME, A, B = "The answer is 4.", "The answer is 4.", "The answer is 5."

# format -> a record maker (prompt, chosen, rejected)
FORMATS = {
    "trl_paired": lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r},
    "trl_paired conversational": lambda p, c, r: {
        "prompt": [{"role": "user", "content": p}],
        "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}]},
    "nemo_dpo": lambda p, c, r: {"prompt": p, "chosen_response": c, "rejected_response": r},
}


def _file(tmp_path, make, identical_lines, n=8):
    path = tmp_path / "prefs.jsonl"
    rows = [make(f"What is {i} + 2?", A, A if i + 1 in identical_lines else B)
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(path):
    return DataConfig(train_path=str(path), validation_path=None,
                      tokenizer_path="bundled:tokenizer", max_seq_length=64)


@pytest.mark.parametrize("name", FORMATS)
def test_identical_pairs_are_dropped_and_named(name, tmp_path, caplog):
    path = _file(tmp_path, FORMATS[name], identical_lines={2, 5})
    with caplog.at_level("WARNING", logger="nemo_aot.data.dataset"):
        data = load_preference_data(_config(path))
    assert len(data.streams[0]) == 6
    assert data.summary.dropped == {"identical": 2}
    assert "2 whose chosen and rejected responses are identical" in str(data.summary)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"dropped 2 of 8 records of {path}" in warning
    assert f"{path}:line 2" in warning and f"{path}:line 5" in warning
    # score keeps every record
    assert len(load_preference_data(_config(path), drop_identical=False).streams[0]) == 8


def test_without_a_prompt_column_identical_pairs_are_refused_by_line(tmp_path):
    # TRL's implicit prompt (the common start of chosen and rejected) leaves no response
    implicit = lambda p, c, r: {"chosen": p + " " + c, "rejected": p + " " + r}  # noqa: E731
    path = _file(tmp_path, implicit, identical_lines={2, 5})
    with pytest.raises(ValueError) as err:
        load_preference_data(_config(path))
    assert f"{path}:line 2: no 'prompt' column" in str(err.value)
    assert f"{path}:line 5" in str(err.value)


def test_only_identical_pairs_are_refused(tmp_path):
    path = _file(tmp_path, FORMATS["trl_paired"], identical_lines=set(range(1, 5)), n=4)
    with pytest.raises(ValueError, match=rf"every one of its 4 pairs has identical .*"
                                         rf"{path}:line 1"):
        load_preference_data(_config(path))


def test_many_identical_pairs_name_the_first_ten_and_count_the_rest(tmp_path, caplog):
    path = _file(tmp_path, FORMATS["trl_paired"], identical_lines=set(range(1, 31)), n=40)
    with caplog.at_level("WARNING", logger="nemo_aot.data.dataset"):
        data = load_preference_data(_config(path))
    assert data.summary.dropped == {"identical": 30}
    assert f"{path}:line 10 and 20 more" in caplog.text
