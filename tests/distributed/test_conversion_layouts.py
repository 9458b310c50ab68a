"""Converted .nemo files load at TP=2 and PP=2 (2-rank gloo) with the Hugging Face logits.

One .nemo per family is written by ``hf_to_nemo`` at TP=1 (embedding padded to 384 rows for a
300-token vocabulary); TP=2 pads to 512, so the vocabulary re-padding path runs too. The TP=2 run
also saves one model back to .nemo from both ranks, which must then load at TP=1 with the same
logits. Forward passes go through megatron's pipeline schedule (forward only).
"""

import os
import sys

import pytest
import torch

from multirank import run_multirank

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "unit"))
import test_conversion_families as fam  # noqa: E402

TOLERANCE = 1e-4
RESAVED = "qwen2"


def _logits(chunks, tokens):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq = tokens.shape[1]

    def step(data_iterator, model):
        batch = next(data_iterator)
        positions = torch.arange(seq).unsqueeze(0).expand_as(batch)
        output = model(batch, positions, None)

        def collect(logits, non_loss_data=False):
            group = ps.get_tensor_model_parallel_group()
            width = ps.get_tensor_model_parallel_world_size()
            parts = [torch.empty_like(logits) for _ in range(width)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=group)
            return torch.cat(parts, dim=-1)

        return output, collect

    with torch.no_grad():
        data = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=chunks[0],
            num_microbatches=1, seq_length=seq, micro_batch_size=tokens.shape[0],
            forward_only=True, collect_non_loss_data=True)
    return data[0][..., :fam.VOCAB].float() if ps.is_pipeline_last_stage() else None


def _load_all(tp, pp, nemo_files, tokens, resave_path):
    import tempfile

    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.nemo_format import (
        TOKENIZER_DIR,
        extract_nemo,
        load_nemo_weights,
        read_nemo_config,
        save_nemo,
    )

    results = {}
    for family, path in nemo_files.items():
        cfg, _ = read_nemo_config(path)
        parallel = ParallelConfig(tp, pp)
        initialize_model_parallel(parallel, cfg)
        chunks = build_model_chunks(cfg, to_transformer_config(cfg, parallel, "fp32"))
        with tempfile.TemporaryDirectory() as extracted:  # each rank extracts its own copy
            extract_nemo(path, extracted)
            load_nemo_weights(chunks, extracted)
            results[family] = _logits(chunks, tokens)
            if resave_path and family == RESAVED:
                save_nemo(resave_path, cfg, chunks, os.path.join(extracted, TOKENIZER_DIR))
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from nemo_aot.conversion import hf_to_nemo

    assert not torch.distributed.is_initialized()
    root = tmp_path_factory.mktemp("layouts")
    tokens = fam.random_tokens(seed=7)
    files, refs = {}, {}
    for family in fam.FAMILIES:
        model = fam.build_hf(family, seed=11)
        files[family] = str(root / f"{family}.nemo")
        hf_to_nemo(fam.save_hf(model, root / family), files[family], dtype="fp32")
        refs[family] = fam.hf_logits(model, tokens)
    return root, files, refs, tokens


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_layout_logits_equal_hf(converted, tp, pp):
    root, files, refs, tokens = converted
    resave = str(root / "resaved_tp2.nemo") if tp == 2 else None
    per_rank = run_multirank(_load_all, tp * pp, args=(tp, pp, files, tokens, resave),
                             timeout=300)
    last = per_rank[-1]  # the last rank is on the last pipeline stage in both layouts
    for family, ref in refs.items():
        diff = (last[family] - ref).abs().max().item()
        print(f"{family}: TP={tp} PP={pp} max abs logit diff {diff:.3e}")
        assert diff <= TOLERANCE, f"{family} at TP={tp} PP={pp}: max abs logit diff {diff:.3e}"
    if tp == 2:  # every TP rank holds the same gathered logits
        for family in refs:
            assert torch.equal(per_rank[0][family], last[family])


def test_tp2_saved_file_loads_at_tp1(converted, tmp_path):
    """Written by both ranks of the TP=2 run; read here, in one process, at TP=1."""
    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config

    root, files, refs, tokens = converted
    resaved = str(root / "resaved_tp2.nemo")
    if not os.path.exists(resaved):  # the TP=2 case was deselected
        run_multirank(_load_all, 2, args=(2, 1, {RESAVED: files[RESAVED]}, tokens, resaved),
                      timeout=300)
    cfg, _ = read_nemo_config(resaved)
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        load_nemo_weights([model], extract_nemo(resaved, str(tmp_path / "x")))
        logits = fam.megatron_logits(model, tokens)
    diff = (logits - refs[RESAVED]).abs().max().item()
    print(f"{RESAVED}: saved at TP=2, loaded at TP=1: max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE
