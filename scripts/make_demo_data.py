"""Generate the bundled demo preference data and its tiny tokenizer (deterministic).

    python scripts/make_demo_data.py [--out nemo_aot/data/bundled]

Writes, under the output folder:
  paired/{train,validation}.jsonl    TRL conversational paired: prompt, chosen, rejected
  unpaired/{train,validation}.jsonl  TRL conversational unpaired: prompt, completion, label
                                     (a thumbs-up/down log: about 1 positive per 3 negatives)
  tokenizer/tokenizer.json, tokenizer/tokenizer_config.json
                                     byte-level BPE (digits split one per token), a chat
                                     template, loadable offline with AutoTokenizer
Rerunning produces byte-identical files. The task and its verifier live in
nemo_aot/data/demo_task.py; validation questions never appear in the training split.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from nemo_aot.data import demo_task

SEED = 20240607
SIZES = {"paired": {"train": 1200, "validation": 128},
         "unpaired": {"train": 1200, "validation": 160}}
POSITIVE_RATE = 0.25  # thumbs-up share of the unpaired log
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 400
# One turn per message, each closed by EOS; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _questions(rng: random.Random, count: int, exclude: set) -> list[tuple]:
    """Distinct expressions not in ``exclude`` (validation never repeats a training question)."""
    seen, out = set(exclude), []
    while len(out) < count:
        question, a, op, b = demo_task.sample_question(rng)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        out.append((question, a, op, b))
    return out


def make_paired(rng: random.Random, count: int, exclude: set) -> list[dict]:
    records = []
    for question, a, op, b in _questions(rng, count, exclude):
        right = demo_task.OPERATIONS[op](a, b)
        wrong = demo_task.wrong_result(rng, a, op, b)
        records.append({
            "prompt": _user(question),
            "chosen": _assistant(demo_task.format_answer(a, op, b, right)),
            "rejected": _assistant(demo_task.format_answer(a, op, b, wrong)),
        })
    return records


def make_unpaired(rng: random.Random, count: int, exclude: set) -> list[dict]:
    records = []
    for question, a, op, b in _questions(rng, count, exclude):
        label = rng.random() < POSITIVE_RATE
        result = demo_task.OPERATIONS[op](a, b) if label else demo_task.wrong_result(rng, a, op, b)
        records.append({
            "prompt": _user(question),
            "completion": _assistant(demo_task.format_answer(a, op, b, result)),
            "label": label,
        })
    return records


def _expressions(records: list[dict]) -> set:
    return {demo_task.parse_question(r["prompt"][0]["content"]) for r in records}


def write_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _corpus(datasets: dict) -> list[str]:
    texts = []
    for splits in datasets.values():
        for records in splits.values():
            for r in records:
                for key in ("prompt", "chosen", "rejected", "completion"):
                    if key in r:
                        texts.extend(m["content"] for m in r[key])
    return texts


def make_tokenizer(out_dir: str, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # Digits one per token (arithmetic is learnable that way); byte-level so any text encodes.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Like Llama: plain `tokenizer(text)` prepends BOS (templates must not add a second one).
    bos_id = SPECIAL_TOKENS.index("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>",
        "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8",
              newline="\n") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nemo_aot",
                               "data", "bundled")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=default_out,
                        help="output folder (default: the bundled folder)")
    args = parser.parse_args(argv)

    datasets = {"paired": {}, "unpaired": {}}
    makers = {"paired": make_paired, "unpaired": make_unpaired}
    for offset, (form, maker) in enumerate(makers.items()):
        rng = random.Random(SEED + offset)
        train = maker(rng, SIZES[form]["train"], exclude=set())
        validation = maker(rng, SIZES[form]["validation"], exclude=_expressions(train))
        datasets[form] = {"train": train, "validation": validation}
        for split, records in datasets[form].items():
            write_jsonl(os.path.join(args.out, form, f"{split}.jsonl"), records)
    make_tokenizer(os.path.join(args.out, "tokenizer"), _corpus(datasets))
    print(f"wrote demo data and tokenizer under {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
