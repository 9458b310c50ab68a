"""nemo_aot.launcher: SLURM node lists, ranks from SLURM/torchrun variables, placement errors."""

import os
import stat

import pytest

from nemo_aot.launcher import (
    LaunchEnv,
    derive_env,
    expand_nodelist,
    expand_tasks_per_node,
    rank_coordinates,
    resolve_hostnames,
)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("login1", ["login1"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("dgx[1,3]-ib,dgx9-ib", ["dgx1-ib", "dgx3-ib", "dgx9-ib"]),
    ("n[5]", ["n5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad, match", [
    ("node[1-3", "unbalanced"), ("node1-3]", "unbalanced"), ("n[[1]]", "nested"),
    ("node[3-1]", "descending"), ("node[a-b]", "bad range"), ("node[1-]", "bad range"),
    ("a,,b", "empty host"), ("", "empty host"),
])
def test_expand_nodelist_rejects_malformed_lists(bad, match):
    with pytest.raises(ValueError, match=match):
        expand_nodelist(bad)


def test_tasks_per_node_format():
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks per node"):
        expand_tasks_per_node("8(2)")


def test_scontrol_is_preferred_when_present(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho from-scontrol-a; echo from-scontrol-b\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert resolve_hostnames("node[1-2]") == ["from-scontrol-a", "from-scontrol-b"]
    fake.write_text("#!/bin/sh\nexit 1\n")  # a broken scontrol falls back to the parser
    assert resolve_hostnames("node[1-2]") == ["node1", "node2"]


def slurm_env(nodes, per_node, rank, nodelist, job_id="123456", **extra):
    env = {"SLURM_JOB_ID": job_id, "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
           "SLURM_NTASKS": str(nodes * per_node), "SLURM_PROCID": str(rank),
           "SLURM_NODEID": str(rank // per_node), "SLURM_LOCALID": str(rank % per_node),
           "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NODELIST": nodelist,
           "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
           "SLURM_GPUS_ON_NODE": str(per_node)}
    env.update(extra)
    return env


@pytest.mark.parametrize("nodes, nodelist, first", [
    (1, "gpu07", "gpu07"), (2, "node[01-02]", "node01"), (16, "gpu[001-004,010-021]", "gpu001")])
def test_every_slurm_rank_resolves_consistently(nodes, nodelist, first):
    per_node = 8
    envs = [derive_env(slurm_env(nodes, per_node, r, nodelist), expand_nodelist)
            for r in range(nodes * per_node)]
    hosts = expand_nodelist(nodelist)
    assert sorted(e.rank for e in envs) == list(range(nodes * per_node))
    for e in envs:
        assert e.source == "slurm" and e.world_size == nodes * per_node and e.num_nodes == nodes
        assert (e.node_rank, e.local_rank) == divmod(e.rank, per_node)
        assert e.local_world_size == per_node and e.gpus_on_node == per_node
        assert (e.master_addr, e.master_port) == (first, 10000 + 123456 % 20000)
        assert e.hosts[e.node_rank] == hosts[e.node_rank]
    assert envs[77 % len(envs)].torch_env()["RANK"] == str(77 % len(envs))


def test_slurm_rank_on_a_sixteen_node_job():
    env = derive_env(slurm_env(16, 8, 77, "gpu[001-016]", job_id="987654"), expand_nodelist)
    assert env.torch_env() == {"RANK": "77", "WORLD_SIZE": "128", "LOCAL_RANK": "5",
                               "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "9",
                               "MASTER_ADDR": "gpu001", "MASTER_PORT": str(10000 + 987654 % 20000)}
    assert env.hosts[env.node_rank] == "gpu010"


def test_exported_master_addr_and_port_win():
    env = derive_env(slurm_env(2, 4, 5, "n[1-2]", MASTER_ADDR="n1-ib", MASTER_PORT="31000"),
                     expand_nodelist)
    assert (env.master_addr, env.master_port) == ("n1-ib", 31000)


def test_torchrun_variables_are_used_as_is_even_inside_slurm():
    env = {**slurm_env(2, 1, 0, "n[1-2]"), "TORCHELASTIC_RUN_ID": "abc", "RANK": "11",
           "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}
    got = derive_env(env, expand_nodelist)
    assert got == LaunchEnv("torchrun", 11, 16, 3, 8, 1, 2, "n1", 29400,
                            gpus_on_node=1, job_id="abc")


def test_no_launcher_is_one_process():
    got = derive_env({"PATH": "/usr/bin"})
    assert (got.source, got.rank, got.world_size, got.local_world_size) == ("single", 0, 1, 1)


@pytest.mark.parametrize("env, match", [
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}, "not in a job step"),
    (slurm_env(2, 8, 0, "n[1-2]", SLURM_STEP_TASKS_PER_NODE="8,4", SLURM_STEP_NUM_TASKS="12"),
     "uneven tasks per node"),
    (slurm_env(2, 8, 0, "n[1-3]"), "inconsistent"),
    (slurm_env(2, 8, 0, "n[1-2]", SLURM_STEP_NUM_TASKS="15"), "sum to 16"),
    (slurm_env(2, 8, 16, "n[1-2]"), "SLURM_PROCID=16 is outside"),
    (slurm_env(2, 8, 0, "n[1-2]", SLURM_LOCALID="x"), "SLURM_LOCALID='x' is not an integer"),
    ({k: v for k, v in slurm_env(2, 8, 0, "n[1-2]").items() if k != "SLURM_PROCID"},
     "SLURM_PROCID is not set"),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "RANK=4 is outside"),
    ({"RANK": "0", "WORLD_SIZE": "6", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}, "multiple"),
])
def test_inconsistent_environments_are_refused(env, match):
    with pytest.raises(ValueError, match=match):
        derive_env(env, expand_nodelist)


@pytest.mark.parametrize("tp, pp, world", [(2, 2, 8), (8, 4, 64), (1, 2, 4), (4, 1, 8)])
def test_rank_coordinates_match_megatron_rank_groups(tp, pp, world):
    from megatron.core.parallel_state import RankGenerator

    dp = world // (tp * pp)
    groups = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for axis in ("tp", "dp", "pp"):
        for group in groups.get_ranks(axis):
            for index, rank in enumerate(group):
                assert rank_coordinates(rank, tp, pp, world)[axis] == index, (axis, group)
