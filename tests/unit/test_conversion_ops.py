"""Pure merge/split functions and the engine's bookkeeping, on small CPU tensors."""

import pytest
import torch

from nemo_aot.conversion import tensor_ops as ops
from nemo_aot.conversion.engine import Mapping, check_source, expand, load_into
from nemo_aot.models.config import GPTModelConfig


def _labelled(rows, offset, width=5, dtype=torch.float32):
    """Row r holds offset + r in every column, so a layout can be read off column 0."""
    return (offset + torch.arange(rows, dtype=dtype)).unsqueeze(1).repeat(1, width)


def test_qkv_interleave_layout_per_query_group():
    heads, groups, d = 4, 2, 3
    q, k, v = _labelled(heads * d, 0), _labelled(groups * d, 100), _labelled(groups * d, 200)
    qkv = ops.merge_qkv(q, k, v, groups)
    expected = []
    for g in range(groups):  # [q heads of group g, k_g, v_g]
        expected += list(range(g * 2 * d, (g + 1) * 2 * d))
        expected += [100 + g * d + i for i in range(d)] + [200 + g * d + i for i in range(d)]
    assert qkv[:, 0].tolist() == expected
    assert ops.merge_qkv(q[:, 0], k[:, 0], v[:, 0], groups).tolist() == expected  # bias


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_round_trip_is_bitwise(heads, groups, dtype):
    d, hidden = 8, 16
    g = torch.Generator().manual_seed(heads * 10 + groups)
    q = torch.randn(heads * d, hidden, generator=g).to(dtype)
    k = torch.randn(groups * d, hidden, generator=g).to(dtype)
    v = torch.randn(groups * d, hidden, generator=g).to(dtype)
    for parts in ((q, k, v), (q[:, 0], k[:, 0], v[:, 0])):
        merged = ops.merge_qkv(*parts, groups)
        assert merged.shape[0] == (heads + 2 * groups) * d and merged.dtype == dtype
        for got, want in zip(ops.split_qkv(merged, heads, groups, d), parts):
            assert torch.equal(got, want)


def test_gate_up_and_vocab_round_trips():
    gate, up = _labelled(6, 0), _labelled(6, 50)
    fc1 = ops.merge_gate_up(gate, up)
    assert fc1[:6].equal(gate) and fc1[6:].equal(up)
    assert all(a.equal(b) for a, b in zip(ops.split_gate_up(fc1), (gate, up)))
    emb = _labelled(10, 1)
    padded = ops.pad_vocab(emb, 16)
    assert padded.shape == (16, 5) and padded[10:].abs().sum() == 0
    assert ops.unpad_vocab(padded, 10).equal(emb)
    assert ops.pad_vocab(emb, 10) is emb


@pytest.mark.parametrize("call, match", [
    (lambda: ops.merge_qkv(_labelled(8, 0), _labelled(4, 0), _labelled(2, 0), 2), "do not fit"),
    (lambda: ops.merge_qkv(_labelled(9, 0), _labelled(3, 0), _labelled(3, 0), 2), "divisible"),
    (lambda: ops.split_qkv(_labelled(10, 0), 4, 2, 2), "need 16"),
    (lambda: ops.merge_gate_up(_labelled(4, 0), _labelled(5, 0)), "differ"),
    (lambda: ops.split_gate_up(_labelled(5, 0)), "odd"),
    (lambda: ops.pad_vocab(_labelled(12, 0), 8), "exceeds"),
    (lambda: ops.unpad_vocab(_labelled(8, 0), 12), "fewer"),
])
def test_shape_errors_are_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


CFG = GPTModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=6, num_attention_heads=4,
                     num_query_groups=2, vocab_size=10, make_vocab_size_divisible_by=8)
TABLE = [Mapping(("emb",), "embedding.w", "vocab"),
         Mapping(("m.layers.{i}.q", "m.layers.{i}.k", "m.layers.{i}.v"), "layers.{i}.qkv", "qkv"),
         Mapping(("m.layers.{i}.gate", "m.layers.{i}.up"), "layers.{i}.fc1", "gate_up"),
         Mapping(("head",), "embedding.w", "tied")]
SHAPES = {"emb": (10, 8), "head": (10, 8), "m.layers.{i}.q": (8, 8), "m.layers.{i}.k": (4, 8),
          "m.layers.{i}.v": (4, 8), "m.layers.{i}.gate": (6, 8), "m.layers.{i}.up": (6, 8)}


def _source():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(2):
        for name in ("q", "k", "v", "gate", "up"):
            out[f"m.layers.{i}.{name}"] = torch.randn(SHAPES[f"m.layers.{{i}}.{name}"], generator=g)
    out["emb"] = torch.randn(10, 8, generator=g)
    return out


def test_expand_orders_embedding_layers_then_rest():
    names = [m.mcore for m in expand(TABLE, 2)]
    assert names == ["embedding.w", "layers.0.qkv", "layers.0.fc1", "layers.1.qkv",
                     "layers.1.fc1", "embedding.w"]


def test_check_source_names_every_problem():
    mappings = expand(TABLE, 2)
    shapes = {k: tuple(v.shape) for k, v in _source().items()}
    check_source(mappings, shapes, SHAPES, "ok")
    derived = {"head": (10, 8), "m.layers.0.rotary_emb.inv_freq": (4,)}
    check_source(mappings, {**shapes, **derived}, SHAPES, "ok", (".rotary_emb.inv_freq",))
    broken = dict(shapes, **{"m.layers.1.up": (5, 8), "m.layers.2.q": (8, 8)})
    del broken["m.layers.0.v"]
    with pytest.raises(ValueError) as info:
        check_source(mappings, broken, SHAPES, "src")
    message = str(info.value)
    assert "missing tensors: m.layers.0.v" in message and "unexpected tensors" in message
    assert "m.layers.2.q" in message and "m.layers.1.up (5, 8) (config implies (6, 8))" in message


def test_load_into_waits_for_groups_across_shards_and_checks_completeness():
    source = _source()
    target = {"embedding.w": torch.empty(16, 8), "layers.0.qkv": torch.empty(16, 8),
              "layers.1.qkv": torch.empty(16, 8), "layers.0.fc1": torch.empty(12, 8),
              "layers.1.fc1": torch.empty(12, 8)}
    # q of layer 0 first, its k/v last: the group must be held until complete.
    q, k, v = (f"m.layers.0.{n}" for n in "qkv")
    order = [q] + sorted(set(source) - {q, k, v}) + [k, v]
    stream = [(n, source[n]) for n in order] + [("head", source["emb"].clone())]
    load_into(expand(TABLE, 2), stream, target, CFG, "src")
    assert target["layers.0.qkv"].equal(ops.merge_qkv(source[q], source[k], source[v], 2))
    assert target["embedding.w"][:10].equal(source["emb"])
    assert target["embedding.w"][10:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"partial groups \[.m.layers.0.q.\]"):
        load_into(expand(TABLE, 2), [(n, source[n]) for n in order[:-2]], dict(target), CFG,
                  "src")
    with pytest.raises(ValueError, match="differs from model.embed_tokens"):
        load_into(expand(TABLE, 2), stream[:-1] + [("head", source["emb"] + 1)], target, CFG,
                  "src")
    with pytest.raises(RuntimeError, match="model only"):
        load_into(expand(TABLE, 2), stream, {**target, "extra": torch.empty(1)}, CFG, "src")


def test_shard_plan_and_export_config_refusals():
    import dataclasses

    from nemo_aot.conversion.architectures import LLAMA, hf_config_from_model
    from nemo_aot.conversion.convert import plan_shards

    mappings = [m for m in expand(LLAMA.mappings(CFG), 2)]
    shards = plan_shards(mappings, CFG, torch.float32, limit=1200)
    assert [m for s in shards for m in s] == mappings and len(shards) > 2
    with pytest.raises(ValueError, match="qkv_bias"):
        hf_config_from_model(dataclasses.replace(CFG, qkv_bias=True), LLAMA, "float32")
    with pytest.raises(ValueError, match="rotary_percent"):
        hf_config_from_model(dataclasses.replace(CFG, rotary_percent=0.5), LLAMA, "float32")
