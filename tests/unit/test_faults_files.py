"""Files that are not what they say, through every command that reads them: a .nemo cut short
(at its start, in its middle) or a folder where a .nemo is expected, in ``train``'s init_from
(also demo's and the launcher's: the same resolution), ``score`` and ``convert nemo-to-hf``;
a Hugging Face folder that is a file, lacks its config or has a broken one, in ``convert
hf-to-nemo``; a data path that is a folder or a file cut mid-record. Each must give one line
naming the file and the likely cause, exit 2, no traceback. (A damaged checkpoint step in
``export``: tests/unit/test_faults_checkpoints.py.)"""

import json
import os
import shutil

import pytest

from nemo_aot import cli
from nemo_aot.data.config import resolve_path

BUNDLED_NEMO = resolve_path("bundled:tiny_sft.nemo")


def _cut(tmp_path, nbytes, name="cut.nemo"):
    path = tmp_path / name
    with open(BUNDLED_NEMO, "rb") as f:
        path.write_bytes(f.read(nbytes))
    return path


NEMOS = {  # name -> (make, what the message must say)
    "cut at its start": (lambda t: _cut(t, 100), "cut short at its start"),
    "cut in its middle": (lambda t: _cut(t, os.path.getsize(BUNDLED_NEMO) // 2),
                          "damaged or incomplete"),
    "empty": (lambda t: _cut(t, 0), "0 bytes"),
    "a folder": (lambda t: t / "folder.nemo" if (t / "folder.nemo").mkdir() is None else None,
                 "folder"),
}


def _commands(path, tmp_path):
    return {
        "train init_from": ["train", "recipe=demo", f"init_from={path}"],
        "demo init_from": ["demo", "--output-dir", str(tmp_path / "demo"), f"init_from={path}"],
        "launch init_from": ["launch", "--dry-run", "--", "train", "recipe=demo",
                             f"init_from={path}"],
        "score --model": ["score", "--model", str(path), "--data",
                          resolve_path("bundled:paired/validation.jsonl"), "--out",
                          str(tmp_path / "s.jsonl")],
        "generate --model": ["generate", "--model", str(path), "--prompt", "hi", "--out",
                             str(tmp_path / "g.jsonl")],
        "convert nemo-to-hf": ["convert", "nemo-to-hf", "--nemo", str(path), "--out",
                               str(tmp_path / "hf_out")],
    }


def _run(capsys, argv):
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", NEMOS)
def test_a_bad_nemo_is_named_with_its_likely_cause_by_every_command(kind, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    make, cause = NEMOS[kind]
    path = make(tmp_path)
    for name, argv in _commands(path, tmp_path).items():
        code, err = _run(capsys, argv)
        assert code == 2, (name, err)
        assert str(path) in err and cause in err, (name, err)
        assert "Traceback" not in err, name
    assert not (tmp_path / "hf_out").exists() and not (tmp_path / "s.jsonl").exists()


def _hf(tmp_path, what):
    path = tmp_path / "hf"
    if what == "a file":
        path.write_text("not a folder")
        return path
    path.mkdir()
    if what == "broken config.json":
        (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidd')
    return path


HF = {"a file": "not found", "no config.json": "config.json",
      "broken config.json": "config.json"}


@pytest.mark.parametrize("what", HF)
def test_a_bad_hugging_face_folder_is_named(what, tmp_path, capsys):
    path = _hf(tmp_path, what)
    code, err = _run(capsys, ["convert", "hf-to-nemo", "--hf", str(path), "--out",
                              str(tmp_path / "o.nemo")])
    assert code == 2 and str(path) in err and HF[what] in err, err
    assert "Traceback" not in err


def _data(tmp_path, what):
    if what == "a folder":
        path = tmp_path / "data"
        path.mkdir()
        return path
    path = tmp_path / "prefs.jsonl"
    row = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    text = "".join(json.dumps(row) + "\n" for _ in range(4))
    path.write_text(text[:-15])  # the last record cut mid-way
    return path


DATA = {"a folder": "", "cut mid-record": ":line 4"}


@pytest.mark.parametrize("what", DATA)
def test_a_bad_data_file_is_named_with_its_line(what, tmp_path, capsys):
    from nemo_aot.data.config import DataConfig
    from nemo_aot.data.dataset import load_preference_data

    path = _data(tmp_path, what)
    with pytest.raises(ValueError) as err:
        load_preference_data(DataConfig(train_path=str(path), validation_path=None,
                                        tokenizer_path="bundled:tokenizer"))
    assert f"{path}{DATA[what]}" in str(err.value)
    shutil.rmtree(tmp_path, ignore_errors=True)
