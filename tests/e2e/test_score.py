"""`nemo-aot score` equals sequence log-probs computed directly with the Hugging Face model."""

import json

import pytest
import torch

from conftest import run_cli


def _hf_logps(hf_dir, data_path):
    from transformers import AutoModelForCausalLM

    from nemo_aot.data import DataConfig, load_preference_data, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(hf_dir))
    data = load_preference_data(DataConfig(train_path=str(data_path), validation_path=None,
                                           tokenizer_path=str(hf_dir), max_seq_length=256),
                                "train", tokenizer)
    out = []
    for ex in data.streams[0]:
        pair = []
        for response in ex.response_ids:
            ids = torch.tensor(list(ex.prompt_ids) + list(response)).unsqueeze(0)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            start = len(ex.prompt_ids) - 1  # first response token is predicted here
            pair.append(float(logp[start:].gather(-1, targets[start:, None]).sum()))
        out.append(pair)
    return out


def test_score_matches_hugging_face(small_data, init_nemo, tmp_path):
    out = tmp_path / "scores.jsonl"
    run_cli(["score", "--model", str(init_nemo), "--data", str(small_data / "train.jsonl"),
             "--out", str(out), "--micro-batch-size", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = _hf_logps(init_nemo.parent / "hf", small_data / "train.jsonl")
    assert len(rows) == len(expected) == 16
    for row, (chosen, rejected) in zip(rows, expected):
        assert abs(row["chosen_logp"] - chosen) < 1e-3, (row, chosen)
        assert abs(row["rejected_logp"] - rejected) < 1e-3, (row, rejected)
        assert row["chosen_tokens"] > 0 and row["rejected_tokens"] > 0


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_score_matches_hugging_face_for_each_family(family, small_data, tmp_path):
    """The same for a tiny random Qwen3 and Gemma 3 (conversion test models), converted by
    the CLI."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "unit"))
    import test_conversion_families as fam

    hf_dir = fam.save_hf(fam.build_hf(family, seed=2), tmp_path / "hf")
    nemo = tmp_path / "model.nemo"
    run_cli(["convert", "hf-to-nemo", "--hf", hf_dir, "--out", str(nemo), "--dtype", "fp32"])
    out = tmp_path / "scores.jsonl"
    run_cli(["score", "--model", str(nemo), "--data", str(small_data / "train.jsonl"),
             "--out", str(out), "--micro-batch-size", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = _hf_logps(hf_dir, small_data / "train.jsonl")
    assert len(rows) == len(expected) == 16
    worst = max(abs(row[f"{side}_logp"] - value) for row, pair in zip(rows, expected)
                for side, value in zip(("chosen", "rejected"), pair))
    print(f"{family}: score vs transformers, max abs sequence log-prob diff {worst:.3e}")
    assert worst < 1e-3
