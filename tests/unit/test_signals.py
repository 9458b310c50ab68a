"""PreemptionHandler: a signal sets the flag, every rank agrees to stop, handlers are restored."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import torch

from multirank import run_multirank
from nemo_aot.algorithms.signals import PreemptionHandler, any_rank

LOOP = textwrap.dedent("""
    import signal, sys, time
    from nemo_aot.algorithms.signals import PreemptionHandler
    handler = PreemptionHandler().install()
    steps = 0
    open(sys.argv[1], "w").close()
    while not handler.should_stop():
        steps += 1
        time.sleep(0.01)
        if steps > 10000:
            sys.exit(3)
    handler.close()
    restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    print(handler.signal_name, "restored" if restored else "not-restored", flush=True)
""")


def test_subprocess_receiving_sigterm_stops_cleanly(tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(ready)], stdout=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0  # the signal did not kill the process
    assert out.split() == ["SIGTERM", "restored"]


LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    # as torchrun starts a worker: a session of its own (and torchrun's TORCHELASTIC_RUN_ID)
    env = dict(os.environ, **dict([sys.argv[3].split("=")]))
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env,
                              stdout=open(sys.argv[2] + ".out", "w"), start_new_session=True)
    print(worker.pid, flush=True)
    time.sleep(600)
""")


def _kill_the_launcher(tmp_path, variable, wait_s):
    """Start LOOP as the worker of a launcher that sets ``variable``, kill -9 the launcher
    alone; returns (what the worker printed within ``wait_s``, whether it still runs)."""
    ready, out = tmp_path / "ready", tmp_path / "ready.out"
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, LOOP, str(ready), variable],
                                stdout=subprocess.PIPE, text=True, env=env)
    worker = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + wait_s
        while not out.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        try:
            os.kill(worker, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        return out.read_text().split(), alive
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_torchrun_worker_whose_launcher_is_killed_stops_as_for_a_signal(tmp_path):
    """torchrun starts workers in sessions of their own: a kill -9 of torchrun alone reaches
    none of them; each stops at its next check (as for SIGTERM: save, exit)."""
    printed, alive = _kill_the_launcher(tmp_path, "TORCHELASTIC_RUN_ID=none", 30)
    assert printed == ["launcher", "exit", "restored"]


def test_a_process_not_started_by_torchrun_outlives_its_parent(tmp_path):
    """(a plain ``python`` under ``nohup`` must outlive its shell)"""
    printed, alive = _kill_the_launcher(tmp_path, "NOT_TORCHRUN=1", 2)
    assert printed == [] and alive


def test_handlers_are_restored_and_flag_records_first_signal():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: calls.append(a))
    try:
        with PreemptionHandler() as handler:
            assert not handler.should_stop() and handler.signal_name is None
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert handler.should_stop() and handler.signal_name == "SIGUSR1"
        assert calls == []  # our handler replaced the previous one while installed
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert len(calls) == 1  # and the previous one is back
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_disabled_or_off_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    PreemptionHandler(enabled=False).install()
    assert signal.getsignal(signal.SIGTERM) is before
    handlers = []
    thread = threading.Thread(target=lambda: handlers.append(PreemptionHandler().install()))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before and not handlers[0].should_stop()


def _stop_on_all_ranks():
    rank = torch.distributed.get_rank()
    handler = PreemptionHandler().install()
    before = handler.should_stop()
    if rank == 1:  # only one rank is signalled
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    after = handler.should_stop()
    handler.close()
    return before, after, handler.signal_name, any_rank(rank == 0)


def test_should_stop_agrees_across_ranks():
    results = run_multirank(_stop_on_all_ranks, world_size=2, timeout=90)
    assert [r[:2] for r in results] == [(False, True), (False, True)]
    assert [r[2] for r in results] == [None, "SIGTERM"]
    assert [r[3] for r in results] == [True, True]
