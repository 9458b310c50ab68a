"""`nemo-aot generate` equals transformers' greedy `generate(do_sample=False)` token for token,
on tiny random Llama, Qwen3 and Gemma 3 models converted to .nemo, at TP1 and TP2; sampling is
reproducible; bad input is refused with one line."""

import json
import os
import sys

import pytest
import torch

from conftest import run_cli

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "unit"))

PROMPTS = [
    {"prompt": "What is 12 + 7?"},
    {"prompt": [{"role": "user", "content": "Compute 77 + 31."}]},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What do you get for 8 * 10?"}]},
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def _generate(model, prompts_file, out, *extra, nproc=1):
    run_cli(["generate", "--model", str(model), "--prompts", str(prompts_file), "--out", str(out),
             "--max-new-tokens", str(NEW_TOKENS), *extra], nproc=nproc)
    return [json.loads(line) for line in out.read_text().splitlines()]


def _hf_greedy(hf_dir, prompt_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    out = []
    for ids in prompt_ids:
        with torch.no_grad():
            full = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                  dtype=torch.long), do_sample=False, max_new_tokens=NEW_TOKENS,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        out.append(full[0, len(ids):].tolist())
    return out


def _check_against_hf(rows, hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    # prompts rendered as the data package renders them: the chat template with the generation
    # prompt for messages, plain text with the tokenizer's BOS
    assert rows[0]["prompt_ids"] == tokenizer("What is 12 + 7?")["input_ids"]
    assert rows[1]["prompt_ids"] == tokenizer.apply_chat_template(
        PROMPTS[1]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"]
    expected = _hf_greedy(hf_dir, [r["prompt_ids"] for r in rows])
    for row, want in zip(rows, expected):
        assert row["completion_ids"] == want, (row, want)
        assert row["finish_reason"] == ("eos" if want[-1] == tokenizer.eos_token_id
                                        else "max_new_tokens")
        assert row["completion"] == tokenizer.decode(want, skip_special_tokens=True)


def test_greedy_matches_transformers_llama(init_nemo, prompts_file, tmp_path):
    rows = _generate(init_nemo, prompts_file, tmp_path / "out.jsonl")
    _check_against_hf(rows, init_nemo.parent / "hf")
    assert all(len(r["completion_ids"]) == NEW_TOKENS for r in rows)  # random model: no EOS


@pytest.mark.slow  # ~80 s each on 2 shared cores (a conversion and two CLI runs)
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_greedy_matches_transformers_for_each_family(family, prompts_file, tmp_path):
    import test_conversion_families as fam

    hf_dir = fam.save_hf(fam.build_hf(family, seed=2), tmp_path / "hf")
    nemo = tmp_path / "model.nemo"
    run_cli(["convert", "hf-to-nemo", "--hf", hf_dir, "--out", str(nemo), "--dtype", "fp32"])
    rows = _generate(nemo, prompts_file, tmp_path / "out.jsonl")
    _check_against_hf(rows, hf_dir)


@pytest.mark.parametrize("layout", [  # ~40 s each on 2 shared cores (two gloo ranks)
    pytest.param(["--tp", "2"], id="tp2"),
    pytest.param(["--pp", "2"], id="pp2", marks=pytest.mark.slow),
    pytest.param([], id="dp2", marks=pytest.mark.slow)])
def test_greedy_on_two_ranks_matches_transformers(layout, init_nemo, prompts_file, tmp_path):
    """TP2, PP2 (the token chosen on the last stage sent to the first) and two data-parallel
    replicas splitting the prompts."""
    rows = _generate(init_nemo, prompts_file, tmp_path / "out.jsonl", *layout, nproc=2)
    _check_against_hf(rows, init_nemo.parent / "hf")


def test_sampling_is_seeded_and_top_p_keeps_the_top_set():
    from nemo_aot.generation import choose

    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 3

    def draws(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return [choose(logits, generator=g, **kw) for _ in range(20)]

    assert draws(1, temperature=1.0, top_p=1.0) == draws(1, temperature=1.0, top_p=1.0)
    assert draws(1, temperature=1.0, top_p=1.0) != draws(2, temperature=1.0, top_p=1.0)
    top = int(torch.argmax(logits))
    assert draws(3, temperature=1.0, top_p=1e-6) == [top] * 20  # only the best token is left
    assert choose(logits, 0.0, 1.0, torch.Generator()) == top  # temperature 0: greedy
    probs = torch.softmax(logits.double(), -1)
    nucleus = set(torch.argsort(probs, descending=True)[:int((torch.cumsum(
        torch.sort(probs, descending=True).values, 0) < 0.5).sum()) + 1].tolist())
    assert set(draws(4, temperature=1.0, top_p=0.5)) <= nucleus


def test_sampled_prompt_option_writes_stdout(init_nemo):
    proc = run_cli(["generate", "--model", str(init_nemo), "--prompt", "Compute 3 + 4.",
                    "--max-new-tokens", "8", "--temperature", "1.5", "--top-p", "0.9",
                    "--seed", "1"])
    row = json.loads(proc.stdout)
    assert row["location"] == "--prompt" and len(row["completion_ids"]) == 8
    assert row["finish_reason"] == "max_new_tokens"


@pytest.mark.parametrize("args, message", [
    (["--prompts", "missing.jsonl"], "--prompts missing.jsonl: file not found"),
    (["--prompts", "{bad}"], "no 'prompt' field"),
    (["--prompts", "{empty}"], "'prompt' is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be a finite number > 0 and <= 1"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_bad_input_is_refused_in_one_line(args, message, tmp_path, capsys, monkeypatch):
    """In process (the prompts are read before the model is built): exit code 2 and the
    message on stderr, as the launched CLI prints them."""
    from nemo_aot import cli

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "where is the prompt?"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "  "}\n')
    args = [a.format(bad=bad, empty=empty) for a in args]
    code = cli.main(["generate", "--model", "unused.nemo", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    if "bad.jsonl" in " ".join(args):
        assert f"{bad}:line 2" in err


def test_a_tokenizer_that_disagrees_with_the_model_is_refused(init_nemo, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init_nemo.parent / "hf")
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    other = tmp_path / "other_tok"
    tokenizer.save_pretrained(other)
    proc = run_cli(["generate", "--model", str(init_nemo), "--prompt", "hi",
                    "--tokenizer", str(other)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--tokenizer {other} has a different vocabulary" in proc.stderr
