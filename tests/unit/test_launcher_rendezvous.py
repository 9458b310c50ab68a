"""A real two-"node" rendezvous from fake SLURM variables: two processes on this machine derive
their ranks with the launcher, join through nemo_aot's init_distributed (gloo), and all-reduce."""

import os
import socket
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent("""
    import os
    import torch
    from nemo_aot.launcher import derive_env
    from nemo_aot.distributed.parallel import init_distributed

    env = derive_env()
    os.environ.update(env.torch_env())
    init_distributed(timeout_minutes=1)
    value = torch.tensor([float(env.rank + 1)])
    torch.distributed.all_reduce(value)
    print(env.rank, env.node_rank, env.master_port, torch.distributed.get_world_size(),
          int(value.item()), flush=True)
    torch.distributed.destroy_process_group()
""")


def free_port_in_launcher_range():
    """A free port the launcher derives from a job id (10000 + id mod 20000)."""
    for port in range(21000, 30000, 37):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 21000-29999")


def test_two_nodes_meet_at_the_derived_address_and_port():
    port = free_port_in_launcher_range()
    job_id = str(port - 10000 + 20000)  # the launcher must take it modulo 20000
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                           "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_JOB_ID=job_id, SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(rank),
                   SLURM_NODEID=str(rank), SLURM_LOCALID="0", SLURM_STEP_NUM_NODES="2",
                   SLURM_STEP_NODELIST="localhost,localhost", SLURM_STEP_TASKS_PER_NODE="1(x2)",
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PATH="/usr/bin:/bin")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            for other in procs:
                if other.poll() is None and proc.returncode is None:
                    other.kill()
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out.split())
    assert outputs == [["0", "0", str(port), "2", "3"], ["1", "1", str(port), "2", "3"]]
