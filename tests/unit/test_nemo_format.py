"""The .nemo layout, config compatibility with NeMo, and refusal of tampered files.

Every tampering test plants a payload that would create a marker directory if it were ever
unpickled; the tests check the load is refused *and* the marker does not exist. Where it is
cheap, a test also shows the payload is live (plain pickle runs it), so the test can fail.
"""

import io
import os
import pickle
import tarfile

import pytest
import torch
import yaml
from test_conversion_families import build_hf, hf_logits, megatron_logits, random_tokens, save_hf


class Payload:
    """Unpickling this calls os.mkdir(path): stands in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def nemo_file(tmp_path_factory):
    from nemo_aot.conversion import hf_to_nemo

    root = tmp_path_factory.mktemp("nemo")
    model = build_hf("llama_gqa", seed=2)
    hf_to_nemo(save_hf(model, root / "hf"), str(root / "model.nemo"), dtype="fp32")
    return str(root / "model.nemo"), model


def _rewrite(src, dst, replace=None, add=()):
    """Copy a tar, replacing some members' bytes and appending extra (TarInfo, bytes) pairs."""
    replace = replace or {}
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            if member.name in replace:
                member.size = len(replace[member.name])
                tout.addfile(member, io.BytesIO(replace[member.name]))
            else:
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        for info, data in add:
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def _member(name, kind=tarfile.REGTYPE, data=b"x", link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


def _load(nemo, tmp_path, **cfg_changes):
    import dataclasses

    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config

    cfg, _ = read_nemo_config(nemo)
    cfg = dataclasses.replace(cfg, **cfg_changes)
    extracted = extract_nemo(nemo, str(tmp_path / "x"))
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        load_nemo_weights([model], extracted)
        return megatron_logits(model, random_tokens())


def test_layout_is_an_uncompressed_tar_with_nemo_keys(nemo_file):
    from nemo_aot.models.nemo_format import read_checkpoint_metadata

    path, _ = nemo_file
    with open(path, "rb") as f:
        assert f.read(2) != b"\x1f\x8b", "must not be gzip-compressed"
    with tarfile.open(path, "r:") as tar:
        names = set(tar.getnames())
        config = yaml.safe_load(tar.extractfile("model_config.yaml"))
    assert {"model_config.yaml", "model_weights/metadata.json", "model_weights/.metadata",
            "model_weights/common.pt", "tokenizer/tokenizer.json",
            "hf_config/config.json"} <= names
    assert not any(n.startswith(("/", "./", "..")) for n in names)
    for key, value in {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176,
                       "num_attention_heads": 4, "num_query_groups": 2, "normalization": "rmsnorm",
                       "activation": "fast-swiglu", "position_embedding_type": "rope",
                       "rotary_base": 500000.0, "bias": False, "mcore_gpt": True,
                       "share_embeddings_and_output_weights": False,
                       "override_vocab_size": 300}.items():
        assert config[key] == value, key
    assert config["tokenizer"]["library"] == "huggingface"
    assert config["tokenizer"]["type"] == "nemo:tokenizer"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        from nemo_aot.models.nemo_format import extract_nemo

        keys = set(read_checkpoint_metadata(os.path.join(extract_nemo(path, tmp),
                                                         "model_weights")).state_dict_metadata)
    assert {"model.embedding.word_embeddings.weight", "model.output_layer.weight",
            "model.decoder.final_layernorm.weight",
            "model.decoder.layers.self_attention.linear_qkv.weight",
            "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            "model.decoder.layers.mlp.linear_fc1.weight"} <= keys


def test_config_round_trips_through_yaml():
    from nemo_aot.models.config import GPTModelConfig, RopeScaling
    from nemo_aot.models.nemo_format import model_config_from_nemo, nemo_config_dict

    for cfg in (GPTModelConfig(),
                GPTModelConfig(num_query_groups=1, kv_channels=32, qkv_bias=True, vocab_size=1000,
                               share_embeddings_and_output_weights=True,
                               rope_scaling=RopeScaling(factor=32.0, high_freq_factor=2.0),
                               attention_backend="unfused", make_vocab_size_divisible_by=64)):
        text = yaml.safe_dump(nemo_config_dict(cfg, extra_cfg={"optim": {"lr": 1e-6}}))
        assert model_config_from_nemo(yaml.safe_load(text)) == cfg
    with pytest.raises(ValueError, match="overwrite architecture keys"):
        nemo_config_dict(GPTModelConfig(), extra_cfg={"hidden_size": 8})


def test_reads_a_nemo1_style_config(tmp_path):
    """NeMo 1.x spellings and defaults, interpolations, './' member names, gzip."""
    from nemo_aot.models.config import RopeScaling
    from nemo_aot.models.nemo_format import read_nemo_config

    nemo1 = {"mcore_gpt": True, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
             "num_attention_heads": 4, "num_query_groups": 2, "max_position_embeddings": 128,
             "encoder_seq_length": "${max_position_embeddings}", "position_embedding_type": "rope",
             "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False,
             "rotary_percentage": 1.0, "override_vocab_size": 256,
             "share_embeddings_and_output_weights": False, "scale_positional_embedding": True,
             "transformer_engine": True, "precision": "bf16",
             "tokenizer": {"library": "huggingface", "type": "meta-llama/Meta-Llama-3-8B"}}
    data = yaml.safe_dump(nemo1).encode()
    path = str(tmp_path / "nemo1.nemo")
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    cfg, full = read_nemo_config(path)
    assert (cfg.encoder_seq_length, cfg.vocab_size, cfg.make_vocab_size_divisible_by) == (128, 256,
                                                                                          128)
    assert cfg.rope_scaling == RopeScaling() and cfg.share_embeddings_and_output_weights is False
    assert full["precision"] == "bf16"
    for change, match in (({"position_embedding_type": None}, "learned_absolute|only 'rope'"),
                          ({"seq_len_interpolation_factor": 4}, "seq_len_interpolation_factor"),
                          ({"activation": "gelu"}, "activation")):
        bad = {k: v for k, v in {**nemo1, **change}.items() if v is not None}
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / "model_config.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=match):
            read_nemo_config(str(tmp_path / "c"))


@pytest.mark.parametrize("member, match", [
    (_member("../evil.txt"), "climbs out"),
    (_member("model_weights/../../evil.txt"), "climbs out"),
    (_member("/tmp/evil-absolute.txt"), "absolute path"),
    (_member("evil_link", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
    (_member("evil_hard", tarfile.LNKTYPE, link="model_config.yaml"), "is a link"),
    (_member("evil_dev", tarfile.CHRTYPE), "special file"),
    (_member("evil_fifo", tarfile.FIFOTYPE), "special file"),
    (_member("model_config.yaml"), "appears twice"),
])
def test_tampered_archive_members_are_refused(nemo_file, tmp_path, member, match):
    from nemo_aot.models.nemo_format import extract_nemo

    bad = _rewrite(nemo_file[0], str(tmp_path / "bad.nemo"), add=[member])
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(ValueError, match=match):
        extract_nemo(bad, str(dest))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not os.path.exists("/tmp/evil-absolute.txt")


def test_pickle_payload_in_common_pt_is_refused(nemo_file, tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"innocent": torch.ones(1), "payload": Payload(marker)}, buf)
    bad = _rewrite(nemo_file[0], str(tmp_path / "bad.nemo"),
                   replace={"model_weights/common.pt": buf.getvalue()})
    with pytest.raises(ValueError, match="common.pt holds more than tensors"):
        _load(bad, tmp_path)
    assert not marker.exists()


def _tampered_metadata(nemo, tmp_path, edit):
    from nemo_aot.models.nemo_format import extract_nemo, read_checkpoint_metadata

    extracted = extract_nemo(nemo, str(tmp_path / "orig"))
    meta = read_checkpoint_metadata(os.path.join(extracted, "model_weights"))
    edit(meta)
    return _rewrite(nemo, str(tmp_path / "bad.nemo"),
                    replace={"model_weights/.metadata": pickle.dumps(meta)})


def test_pickle_payload_in_dcp_metadata_is_refused(nemo_file, tmp_path):
    marker = tmp_path / "pwned"
    bad = _tampered_metadata(nemo_file[0], tmp_path,
                             lambda meta: setattr(meta, "planner_data", Payload(marker)))
    with pytest.raises(ValueError, match="posix.mkdir is not allowed"):
        _load(bad, tmp_path)
    assert not marker.exists()
    with tarfile.open(bad) as tar:  # the payload is live: plain pickle (torch DCP's) runs it
        pickle.loads(tar.extractfile("model_weights/.metadata").read())
    assert marker.exists()


def test_tensor_stored_as_pickled_bytes_is_refused(nemo_file, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    def edit(meta):
        meta.state_dict_metadata["model.decoder.final_layernorm.weight"] = BytesStorageMetadata()

    bad = _tampered_metadata(nemo_file[0], tmp_path, edit)
    with pytest.raises(ValueError, match="final_layernorm.weight is stored as pickled bytes"):
        _load(bad, tmp_path)


def test_extra_state_payload_is_never_unpickled(nemo_file, tmp_path):
    """_extra_state entries are pickled bytes in every dist checkpoint; we never read them."""
    from nemo_aot.models.nemo_format import extract_nemo, read_checkpoint_metadata

    marker = tmp_path / "pwned"
    extracted = extract_nemo(nemo_file[0], str(tmp_path / "orig"))
    meta = read_checkpoint_metadata(os.path.join(extracted, "model_weights"))
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    (index, info), = [(i, s) for i, s in meta.storage_data.items() if "_extra_state" in i.fqn][:1]
    with open(os.path.join(extracted, "model_weights", info.relative_path), "rb") as f:
        shard = f.read()
    meta.storage_data[index] = type(info)(info.relative_path, len(shard), len(buf.getvalue()),
                                          info.transform_descriptors)
    bad = _rewrite(nemo_file[0], str(tmp_path / "bad.nemo"), replace={
        "model_weights/.metadata": pickle.dumps(meta),
        f"model_weights/{info.relative_path}": shard + buf.getvalue()})
    logits = _load(bad, tmp_path)
    assert not marker.exists()
    ref = hf_logits(nemo_file[1], random_tokens())
    assert (logits - ref).abs().max() <= 1e-4


def test_mismatched_model_and_vocab_repadding(nemo_file, tmp_path):
    with pytest.raises(ValueError, match="does not fit the model"):
        _load(nemo_file[0], tmp_path / "a", num_layers=4)
    # 300 tokens: stored padded to 384 rows, this model pads to 304; the loader re-pads.
    logits = _load(nemo_file[0], tmp_path / "b", make_vocab_size_divisible_by=8)
    assert (logits - hf_logits(nemo_file[1], random_tokens())).abs().max() <= 1e-4


def test_non_dist_and_foreign_files_are_refused(tmp_path):
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config

    old = str(tmp_path / "old.nemo")
    with tarfile.open(old, "w") as tar:
        for info, data in (_member("model_config.yaml", data=b"num_layers: 2\n"),
                           _member("model_weights.ckpt", data=b"pickled")):
            tar.addfile(info, io.BytesIO(data))
    extracted = extract_nemo(old, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="pre-dist-checkpoint"):
        load_nemo_weights([], extracted)
    (tmp_path / "plain.nemo").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a .nemo"):
        read_nemo_config(str(tmp_path / "plain.nemo"))
    with pytest.raises(ValueError, match="required key 'hidden_size'"):
        read_nemo_config(old)


def test_failed_save_leaves_nothing(nemo_file, tmp_path):
    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models.nemo_format import read_nemo_config, save_nemo

    cfg, _ = read_nemo_config(nemo_file[0])
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty_tok").mkdir()
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        with pytest.raises(ValueError, match="holds no files"):
            save_nemo(str(out / "m.nemo"), cfg, [model], str(tmp_path / "empty_tok"))
        with pytest.raises(ValueError, match="reserved"):
            save_nemo(str(out / "m.nemo"), cfg, [model], None, extra_files={"../x": b""})
        with pytest.raises(ValueError, match="reserved"):
            save_nemo(str(out / "m.nemo"), cfg, [model], None,
                      extra_files={"model_weights/x": b""})
    assert os.listdir(out) == [] and not (tmp_path / "x").exists()


def test_vocab_size_falls_back_to_the_stored_embedding(nemo_file, tmp_path):
    """NeMo-made configs may carry no vocabulary size; the padded table's rows are used."""
    from nemo_aot.models.nemo_format import read_nemo_config

    with tarfile.open(nemo_file[0]) as tar:
        config = yaml.safe_load(tar.extractfile("model_config.yaml"))
    del config["vocab_size"], config["override_vocab_size"]
    bare = _rewrite(nemo_file[0], str(tmp_path / "bare.nemo"),
                    replace={"model_config.yaml": yaml.safe_dump(config).encode()})
    cfg, _ = read_nemo_config(bare)
    assert (cfg.vocab_size, cfg.padded_vocab_size(1), cfg.padded_vocab_size(2)) == (384, 384, 384)
    logits = _load(bare, tmp_path)
    assert (logits - hf_logits(nemo_file[1], random_tokens())).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- open_nemo
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                       "nemo_aot", "data", "bundled", "tiny_sft.nemo")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def test_extracted_folder_loads_the_same_weights_as_the_file(nemo_file, tmp_path, monkeypatch):
    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models.aot_model import load_nemo_into
    from nemo_aot.models.nemo_format import extract_nemo, read_nemo_config

    base = tmp_path / "extract_base"
    monkeypatch.setenv("NEMO_AOT_EXTRACT_DIR", str(base))
    folder = extract_nemo(nemo_file[0], str(tmp_path / "pre"))
    before = sorted(os.walk(folder))
    cfg, _ = read_nemo_config(folder)
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        load_nemo_into(nemo_file[0], [model])
        from_file = _params(model)
        assert os.listdir(base) == [], "the .nemo's copy must be removed after loading"
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        load_nemo_into(folder, [model])
        from_folder = _params(model)
    assert from_file.keys() == from_folder.keys() and len(from_file) > 5
    for key, value in from_file.items():
        assert torch.equal(value, from_folder[key]), key
    assert from_file["embedding.word_embeddings.weight"].abs().sum() > 0
    assert sorted(os.walk(folder)) == before, "the folder is used as is"


def test_open_nemo_without_distributed(tmp_path, monkeypatch):
    from nemo_aot.models.nemo_format import open_nemo

    assert not torch.distributed.is_initialized()
    env_base, arg_base = tmp_path / "env", tmp_path / "arg"
    monkeypatch.setenv("NEMO_AOT_EXTRACT_DIR", str(env_base))
    with open_nemo(BUNDLED) as folder:
        assert os.path.dirname(folder) == str(env_base)
        assert {"model_config.yaml", "model_weights", "tokenizer"} <= set(os.listdir(folder))
    assert os.listdir(env_base) == []
    (arg_base / "keep").mkdir(parents=True)  # already there: never removed
    with pytest.raises(RuntimeError, match="body failed"):
        with open_nemo(BUNDLED, str(arg_base)) as folder:
            assert os.path.dirname(folder) == str(arg_base)
            raise RuntimeError("body failed")
    assert os.listdir(arg_base) == ["keep"] and os.listdir(env_base) == []
    monkeypatch.delenv("NEMO_AOT_EXTRACT_DIR")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "sys_tmp"))
    (tmp_path / "sys_tmp").mkdir()
    with open_nemo(BUNDLED) as folder:
        assert os.path.dirname(folder) == str(tmp_path / "sys_tmp")
    with pytest.raises(ValueError, match="without model_config.yaml"):
        with open_nemo(str(arg_base)):
            pass
    with pytest.raises(ValueError, match="not found"):
        with open_nemo(str(tmp_path / "missing.nemo")):
            pass
    (tmp_path / "junk.nemo").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match="junk.nemo"):
        with open_nemo(str(tmp_path / "junk.nemo"), str(arg_base)):
            pass
    assert os.listdir(arg_base) == ["keep"] and os.listdir(tmp_path / "sys_tmp") == []


def test_extract_tokenizer_extracts_only_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from nemo_aot.models.nemo_format import extract_nemo, extract_tokenizer

    dest = tmp_path / "tok"
    folder = extract_tokenizer(BUNDLED, str(dest))
    assert folder == str(dest / "tokenizer") and os.listdir(dest) == ["tokenizer"]
    assert len(AutoTokenizer.from_pretrained(folder)) > 100
    pre = extract_nemo(BUNDLED, str(tmp_path / "pre"))
    in_place = tmp_path / "unused"
    assert extract_tokenizer(pre, str(in_place)) == os.path.join(pre, "tokenizer")
    assert not in_place.exists(), "nothing is copied from an extracted folder"


def test_extract_tokenizer_without_one_and_unsafe_members(tmp_path):
    from nemo_aot.models.nemo_format import extract_tokenizer

    with tarfile.open(BUNDLED) as tar:
        config = yaml.safe_load(tar.extractfile("model_config.yaml"))
    config["tokenizer"] = None
    bare = _rewrite(BUNDLED, str(tmp_path / "bare.nemo"),
                    replace={"model_config.yaml": yaml.safe_dump(config).encode()})
    assert extract_tokenizer(bare, str(tmp_path / "a")) is None
    for i, (member, match) in enumerate([
            (_member("tokenizer/../../evil.txt"), "climbs out"),
            (_member("/tmp/evil-absolute.txt"), "absolute path"),
            (_member("tokenizer/evil", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
            (_member("tokenizer/fifo", tarfile.FIFOTYPE), "special file")]):
        bad = _rewrite(BUNDLED, str(tmp_path / f"bad{i}.nemo"), add=[member])
        with pytest.raises(ValueError, match=match):
            extract_tokenizer(bad, str(tmp_path / f"d{i}"))
        assert not os.path.exists(tmp_path / f"d{i}" / "tokenizer")
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/evil-absolute.txt")
