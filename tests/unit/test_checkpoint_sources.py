"""Naming a checkpoint: a .nemo, a Hugging Face folder or a hub id (nemo_aot.conversion.sources),
and ``--plan`` / ``--print-config`` reading the architecture alone: ``config.json`` for a hub id
(no weights fetched), no data, no checkpoint. Offline, against a hub cache built on local disk."""

import json
import os

import pytest

from config_stubs import config_only_nemo, model_group
from hub_cache import LLAMA31_8B_CONFIG, add_snapshot

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRODUCTION = sorted(n[:-5] for n in os.listdir(os.path.join(ROOT, "conf", "recipe"))
                    if n.endswith(".yaml") and n[:-5] not in ("base", "demo"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at an empty cache under tmp_path, offline; converted copies in
    tmp_path/converted."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("NEMO_AOT_CACHE", str(tmp_path / "converted"))
    return home


def test_a_checkpoint_is_a_nemo_a_folder_or_a_hub_id(tmp_path):
    from nemo_aot.conversion.sources import checkpoint_source

    nemo = tmp_path / "m.nemo"
    nemo.write_bytes(b"")
    assert checkpoint_source(str(nemo)).kind == "nemo"
    extracted = config_only_nemo(model_group("tiny"), tmp_path)
    assert checkpoint_source(extracted).kind == "nemo"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert checkpoint_source(str(hf)).kind == "hf"
    hub = checkpoint_source("Qwen/Qwen3-8B@a1b2c3")
    assert (hub.kind, hub.repo_id, hub.revision) == ("hub", "Qwen/Qwen3-8B", "a1b2c3")
    assert checkpoint_source("org/name").revision is None
    with pytest.raises(ValueError, match=r"init_from: .*nowhere.nemo does not exist; give a "
                                         r"\.nemo file"):
        checkpoint_source(str(tmp_path / "nowhere.nemo"))
    with pytest.raises(ValueError, match="--model: .* is a folder with neither"):
        checkpoint_source(str(tmp_path), key="--model")


def test_offline_without_the_id_cached_names_the_id_the_cache_and_the_command(offline_hub):
    from nemo_aot.conversion.sources import checkpoint_source, read_architecture

    with pytest.raises(ValueError) as err:
        read_architecture(checkpoint_source("nobody/nothing@v2"))
    message = str(err.value)
    assert "nobody/nothing@v2" in message and "HF_HUB_OFFLINE" in message
    assert str(offline_hub / "hub") in message
    assert "`hf download nobody/nothing --revision v2`" in message
    assert "huggingface-cli download nobody/nothing --revision v2" in message


def test_plan_of_a_hub_id_fetches_config_json_only(offline_hub, monkeypatch):
    """--plan from a hub id asks huggingface_hub for config.json and nothing else (the cache
    holds no weights at all), and plans the architecture that config describes."""
    import huggingface_hub

    from nemo_aot.algorithms.resolve import World, resolve_run

    add_snapshot(offline_hub, LLAMA_8B, files={"config.json": LLAMA31_8B_CONFIG})
    fetched = []
    real = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        fetched.append(filename)
        return real(repo_id, filename, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("--plan must not download a snapshot (weights)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    run = resolve_run(["recipe=llama3_8b", f"init_from={LLAMA_8B}"], world=World.planned(),
                      purpose="plan")
    assert fetched == ["config.json"]
    m = run.config.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_query_groups,
            m.vocab_size) == (32, 4096, 14336, 8, 128256)
    assert run.init_from is None and run.init_source.repo_id == LLAMA_8B
    assert "converted once when training starts" in run.describe()


def test_plan_and_print_of_a_folder_read_no_weights(tmp_path, offline_hub):
    """A Hugging Face folder whose weight file is garbage plans and prints (only config.json is
    read); training from it converts the weights and refuses them."""
    from nemo_aot.algorithms.resolve import World, resolve_run

    folder = tmp_path / "Llama-3.1-8B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA31_8B_CONFIG))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    for purpose in ("plan", "print"):
        run = resolve_run(["recipe=llama3_8b", f"init_from={folder}", "data.train_path=x",
                           "data.validation_path=null"], world=World.planned(), purpose=purpose)
        assert run.config.model.num_layers == 32 and run.init_source.kind == "hf"
    with pytest.raises(ValueError, match="conversion to .nemo failed"):
        resolve_run(["recipe=llama3_8b", f"init_from={folder}", "data.train_path=x",
                     "data.validation_path=null", "trainer.devices=null"], world=World(1))
    left = os.listdir(tmp_path / "converted" / "converted" / "folders")
    assert [n for n in left if not n.endswith(".lock")] == []  # no partial .nemo left behind


def test_a_stored_run_started_from_a_hub_id_finds_its_converted_copy(offline_hub, tmp_path):
    """``nemo-aot export`` of a LoRA run resolves the run's stored config: a hub id there is
    the converted copy of that id (reused, here a stand-in file: nothing is converted)."""
    from config_stubs import DEMO_WITHOUT_CHECKPOINT
    from nemo_aot.algorithms.resolve import World, resolve_run, resolve_stored

    commit = "ab" * 20
    add_snapshot(offline_hub, "org/tiny", commit=commit, files={
        "config.json": {"torch_dtype": "float32"}, "model.safetensors": b""})
    target = tmp_path / "converted" / "converted" / "models--org--tiny" / f"{commit}-fp32.nemo"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    stored = tmp_path / "config.yaml"
    yaml = resolve_run(DEMO_WITHOUT_CHECKPOINT, world=World(1)).config_yaml
    assert "\ninit_from: null\n" in yaml
    stored.write_text(yaml.replace("\ninit_from: null\n", "\ninit_from: org/tiny\n"))
    run = resolve_stored(str(stored), world=World(1))
    assert run.init_from == str(target) and run.config.init_from == "org/tiny"


@pytest.mark.parametrize("recipe", PRODUCTION)
def test_plan_of_every_production_recipe_needs_no_data_and_no_checkpoint(recipe, capsys):
    from nemo_aot.cli import main

    assert main(["train", f"recipe={recipe}", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan per GPU: ") and "largest trainer.micro_batch_size" in out


def test_training_still_needs_its_data_and_checkpoint():
    from nemo_aot.algorithms.resolve import resolve_run

    with pytest.raises(ValueError, match="init_from: the policy .nemo"):
        resolve_run(["recipe=llama3_8b"])


def test_a_file_system_without_locks_still_converts(tmp_path, monkeypatch, caplog):
    """Where flock is refused (Lustre without -o flock), the conversion goes ahead unlocked:
    each process renames its own finished copy into place, so a reader never sees a part."""
    from nemo_aot.conversion import sources

    def refuse(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(sources.fcntl, "flock", refuse)
    entered = []
    with sources._locked(str(tmp_path / "entry.nemo")):
        entered.append(True)
    assert entered and "refuses locks" in caplog.text


def test_a_tokenizer_or_an_adapter_may_be_a_hub_id(offline_hub, tmp_path, monkeypatch):
    """local_or_hub_folder: an existing path (even one spelled like a hub id) is used as is, a
    hub id becomes its cached snapshot, a missing one offline names the key and the command,
    and a missing path that is no hub id is handed back for the caller's own error."""
    from nemo_aot.conversion.sources import local_or_hub_folder
    from nemo_aot.data import load_tokenizer
    from nemo_aot.data.config import resolve_path

    bundled = resolve_path("bundled:tokenizer")
    snapshot = add_snapshot(offline_hub, "tinyorg/tok", files_from=bundled)
    folder = local_or_hub_folder("tinyorg/tok", "data.tokenizer_path", "tokenizer")
    assert os.path.samefile(folder, snapshot)
    assert load_tokenizer(folder).vocab_size == load_tokenizer(bundled).vocab_size
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinyorg" / "tok").mkdir(parents=True)  # a local folder wins over the hub id
    assert local_or_hub_folder("tinyorg/tok", "data.tokenizer_path", "tokenizer") == "tinyorg/tok"
    assert local_or_hub_folder("no_such_dir", "peft.adapter_from", "adapter") == "no_such_dir"
    with pytest.raises(ValueError) as err:
        local_or_hub_folder("nobody/adapter@v3", "peft.adapter_from", "adapter")
    message = str(err.value)
    assert message.startswith("peft.adapter_from: nobody/adapter@v3 (Hugging Face hub)")
    assert "no local path nobody/adapter@v3 exists" in message
    assert "`hf download nobody/adapter --revision v3`" in message
