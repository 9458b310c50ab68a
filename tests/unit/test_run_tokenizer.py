"""The tokenizer a run trains with: the one stored in init_from unless data.tokenizer_path names
one with the same vocabulary; a tokenizer of another model is refused, naming the key."""

import dataclasses
import os
import shutil

import pytest
import yaml

from config_stubs import config_only_nemo, model_group
from nemo_aot.algorithms.config import AOTConfig
from nemo_aot.algorithms.resolve import World, resolve_config
from nemo_aot.algorithms.run import policy_tokenizer
from nemo_aot.data.config import DataConfig, resolve_path
from nemo_aot.models.nemo_format import CONFIG_NAME

BUNDLED = resolve_path("bundled:tokenizer")


def _nemo_folder(root, model, tokenizer_dir=None):
    """An extracted .nemo (config only), storing ``tokenizer_dir`` as its artifact if given."""
    folder = config_only_nemo(model, root)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, os.path.join(folder, "tokenizer"))
        path = os.path.join(folder, CONFIG_NAME)
        with open(path) as f:
            cfg = yaml.safe_load(f)
        cfg["tokenizer"] = {"library": "huggingface", "type": "nemo:tokenizer"}
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
    return folder


def _cfg(init_from, tokenizer_path=None, model=None):
    """The resolved run: the architecture is init_from's (``model``, unused: what it stores)."""
    cfg = AOTConfig(init_from=init_from, data=DataConfig(tokenizer_path=tokenizer_path))
    return resolve_config(cfg, world=World(1))


def _other_tokenizer(root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    tok.add_tokens(["<tool_call>"])
    path = os.path.join(str(root), "other_tokenizer")
    tok.save_pretrained(path)
    return path


def test_the_stored_tokenizer_is_the_default(tmp_path):
    tiny = model_group("tiny")
    nemo = _nemo_folder(tmp_path, tiny, BUNDLED)
    tokenizer, folder = policy_tokenizer(_cfg(nemo, model=tiny), str(tmp_path / "scratch"))
    assert folder == os.path.join(nemo, "tokenizer") and len(tokenizer) == 295


def test_the_bundled_nemo_file_carries_its_tokenizer(tmp_path):
    tokenizer, folder = policy_tokenizer(_cfg("bundled:tiny_sft.nemo", model=model_group("tiny")),
                                         str(tmp_path))
    assert folder.startswith(str(tmp_path)) and len(tokenizer) == 295


def test_a_given_tokenizer_must_share_the_stored_vocabulary(tmp_path):
    tiny = model_group("tiny")
    nemo = _nemo_folder(tmp_path, tiny, BUNDLED)
    _, folder = policy_tokenizer(_cfg(nemo, "bundled:tokenizer", tiny), str(tmp_path / "a"))
    assert folder == BUNDLED  # same vocabulary: the user's copy (e.g. its chat template) is used
    other = _other_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"data.tokenizer_path=.*different vocabulary \(296 "
                                         r"tokens\).*data.tokenizer_path=null"):
        policy_tokenizer(_cfg(nemo, other, tiny), str(tmp_path / "b"))


def test_without_a_stored_tokenizer_the_size_must_fit_the_model(tmp_path):
    tiny = model_group("tiny")  # 512 rows for 295 tokens: padding
    _, folder = policy_tokenizer(_cfg(_nemo_folder(tmp_path / "t", tiny), "bundled:tokenizer",
                                      tiny), str(tmp_path / "a"))
    assert folder == BUNDLED
    big = model_group("llama3_8b")  # 128256 rows: another model's tokenizer
    with pytest.raises(ValueError, match=r"295 tokens, far fewer than the model's vocabulary "
                                         r"of 128256"):
        policy_tokenizer(_cfg(_nemo_folder(tmp_path / "b", big), "bundled:tokenizer", big),
                         str(tmp_path / "b2"))
    small = dataclasses.replace(tiny, vocab_size=200)
    with pytest.raises(ValueError, match=r"has 295 tokens but the model's vocabulary"):
        policy_tokenizer(_cfg(_nemo_folder(tmp_path / "s", small), "bundled:tokenizer", small),
                         str(tmp_path / "s2"))
    with pytest.raises(ValueError, match=r"stores no tokenizer; set data.tokenizer_path"):
        policy_tokenizer(_cfg(_nemo_folder(tmp_path / "n", tiny), None, tiny),
                         str(tmp_path / "n2"))
