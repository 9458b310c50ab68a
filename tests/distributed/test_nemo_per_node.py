"""``open_nemo`` under torch.distributed (2 gloo ranks): one extraction per node, agreed errors.

Both ranks run on this host; a test makes them one node (LOCAL_RANK 0 and 1, one host name) or
two (LOCAL_RANK 0 on both, host names patched apart). Every extraction is recorded as a file in
``calls/``; the extraction base must be empty once the run is over. Failures on one rank must
raise ValueError on both ranks (run_multirank's timeout turns a hang into a failure).
"""

import os
import shutil

import pytest
import torch

from multirank import run_multirank

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                       "nemo_aot", "data", "bundled", "tiny_sft.nemo")
TIMEOUT = 60
SHORT_PG_TIMEOUT_S = 2


def _open(paths, base, calls, hosts, local_ranks, fail_rank=None, load_tp=False):
    """One rank: open paths[rank] with open_nemo under base; report what it saw."""
    import socket

    from nemo_aot.models import nemo_format

    rank = torch.distributed.get_rank()
    if local_ranks[rank] is None:
        os.environ.pop("LOCAL_RANK", None)
    else:
        os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    socket.gethostname = lambda: hosts[rank]
    real = nemo_format.extract_nemo

    def counting(path, dest):
        open(os.path.join(calls, f"rank{rank}-{os.path.basename(dest)}"), "w").close()
        if rank == fail_rank:
            raise OSError(28, "No space left on device")
        return real(path, dest)

    nemo_format.extract_nemo = counting
    try:
        with nemo_format.open_nemo(paths[rank], base) as folder:
            seen = sorted(os.listdir(base)) if os.path.isdir(base) else []
            shard = _load_tp2(folder) if load_tp else None
            return {"folder": folder, "seen": seen, "shard": shard,
                    "complete": os.path.isfile(os.path.join(folder, "model_weights",
                                                            "metadata.json"))}
    except ValueError as err:
        return {"error": str(err)}


def _load_tp2(folder):
    """This rank's TP=2 shard of the word embedding, loaded from the shared folder."""
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.nemo_format import load_nemo_weights, read_nemo_config

    cfg, _ = read_nemo_config(folder)
    parallel = ParallelConfig(2, 1)
    initialize_model_parallel(parallel, cfg)
    chunks = build_model_chunks(cfg, to_transformer_config(cfg, parallel, "fp32"))
    load_nemo_weights(chunks, folder)
    return chunks[0].embedding.word_embeddings.weight.detach().clone()


@pytest.fixture
def dirs(tmp_path):
    base, calls = tmp_path / "extract", tmp_path / "calls"
    calls.mkdir()
    return str(base), str(calls)


def _run(paths, dirs, hosts=("node-a", "node-a"), local_ranks=(0, 1), fail_rank=None,
         load_tp=False):
    """(per-rank results, recorded extractions, what is left under the base afterwards)."""
    base, calls = dirs
    results = run_multirank(_open, 2, args=(list(paths), base, calls, list(hosts),
                                            list(local_ranks), fail_rank, load_tp),
                            timeout=2 * TIMEOUT if load_tp else TIMEOUT)
    return results, sorted(os.listdir(calls)), (os.listdir(base) if os.path.isdir(base) else [])


def test_one_node_extracts_once_and_both_ranks_load_from_it(dirs):
    results, calls, left = _run([BUNDLED] * 2, dirs, load_tp=True)
    assert len(calls) == 1 and calls[0].startswith("rank0-"), calls
    assert results[0]["folder"] == results[1]["folder"]
    assert results[0]["folder"].endswith("-node-a")
    assert results[0]["seen"] == results[1]["seen"] == [os.path.basename(results[0]["folder"])]
    assert results[0]["complete"] and results[1]["complete"]
    assert left == [], "the per-node copy must be removed after the with body"
    # the TP=2 shards are the two halves of the stored (padded) embedding
    from nemo_aot.models.nemo_format import open_nemo

    with open_nemo(BUNDLED) as folder:
        whole = _single_process_embedding(folder)
    assert torch.equal(torch.cat([results[0]["shard"], results[1]["shard"]]), whole)


def _single_process_embedding(folder):
    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models.nemo_format import load_nemo_weights, read_nemo_config

    cfg, _ = read_nemo_config(folder)
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        load_nemo_weights([model], folder)
        return model.embedding.word_embeddings.weight.detach().clone()


def test_two_nodes_get_one_copy_each(dirs):
    results, calls, left = _run([BUNDLED] * 2, dirs, hosts=("node-a", "node-b"),
                                local_ranks=(0, 0))
    assert len(calls) == 2 and {c[:5] for c in calls} == {"rank0", "rank1"}, calls
    assert results[0]["folder"].endswith("-node-a") and results[1]["folder"].endswith("-node-b")
    names = sorted(os.path.basename(r["folder"]) for r in results)
    assert results[0]["seen"] == results[1]["seen"] == names
    assert names[0].rsplit("-node-", 1)[0] == names[1].rsplit("-node-", 1)[0]  # rank 0's id
    assert left == []


def test_unknown_local_rank_extracts_per_rank(dirs):
    results, calls, left = _run([BUNDLED] * 2, dirs, local_ranks=(None, None))
    assert len(calls) == 2 and results[0]["folder"] != results[1]["folder"]
    assert all(r["complete"] for r in results) and left == []


def test_corrupt_file_raises_on_every_rank(dirs, tmp_path):
    corrupt = str(tmp_path / "corrupt.nemo")
    with open(BUNDLED, "rb") as src, open(corrupt, "wb") as dst:
        dst.write(src.read()[:200_000])  # cut inside model_weights/__0_0.distcp
    results, calls, left = _run([corrupt] * 2, dirs)
    assert len(calls) == 1
    for r in results:
        assert "error" in r, r
        assert corrupt in r["error"] and "rank 0" in r["error"], r["error"]
    assert left == [], "a failed extraction must not leave its folder behind"


def test_failure_on_one_node_raises_on_every_rank(dirs):
    results, calls, left = _run([BUNDLED] * 2, dirs, hosts=("node-a", "node-b"),
                                local_ranks=(0, 0), fail_rank=1)
    assert len(calls) == 2
    for r in results:
        assert "error" in r, r
        assert "rank 1: node-b" in r["error"] and "No space left" in r["error"], r["error"]
        assert "NEMO_AOT_EXTRACT_DIR" in r["error"]
    assert left == [], "node-a's good copy and node-b's partial one must both be removed"


def test_folder_missing_on_one_rank_raises_on_every_rank(dirs, tmp_path):
    from nemo_aot.models.nemo_format import extract_nemo

    folder = extract_nemo(BUNDLED, str(tmp_path / "pre"))
    results, calls, left = _run([folder, str(tmp_path / "absent")], dirs)
    assert calls == [] and left == []
    for r in results:
        assert "error" in r and "rank 1" in r["error"] and "absent" in r["error"], r
    shutil.rmtree(folder)  # it was ours; open_nemo must not have touched it


def test_extracted_folder_is_used_in_place(dirs, tmp_path):
    from nemo_aot.models.nemo_format import extract_nemo

    folder = extract_nemo(BUNDLED, str(tmp_path / "pre"))
    before = sorted(os.listdir(folder))
    results, calls, left = _run([folder] * 2, dirs)
    assert [r["folder"] for r in results] == [folder, folder]
    assert calls == [] and left == [] and sorted(os.listdir(folder)) == before


def _slow_extraction_under_short_timeout(path, base, seconds):
    """Rejoin with a process-group timeout shorter than rank 0's (slowed) extraction."""
    import datetime

    from multirank import free_port
    from nemo_aot.distributed import ranks as node
    from nemo_aot.models import nemo_format

    port = int(node.broadcast_text(str(free_port())))
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=SHORT_PG_TIMEOUT_S))
    real = nemo_format.extract_nemo

    def slow(src, dest):
        import time

        time.sleep(seconds)
        return real(src, dest)

    nemo_format.extract_nemo = slow
    node.POLL_S = SHORT_PG_TIMEOUT_S / 8  # the rounds' skew between ranks stays under it
    with nemo_format.open_nemo(path, base) as folder:
        return os.path.isfile(os.path.join(folder, "model_config.yaml"))


def test_waiting_ranks_outlast_the_process_group_timeout(tmp_path):
    """Rank 1 waits 3x the group's timeout for rank 0's extraction without a timeout error:
    it polls with short collectives instead of sitting in one (NCCL's 30-minute watchdog)."""
    base = str(tmp_path / "extract")
    assert run_multirank(_slow_extraction_under_short_timeout, 2,
                         args=(BUNDLED, base, 3 * SHORT_PG_TIMEOUT_S),
                         timeout=TIMEOUT) == [True, True]
    assert os.listdir(base) == []
