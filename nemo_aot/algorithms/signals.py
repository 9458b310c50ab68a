"""Graceful preemption: a signal sets a flag; the run asks, at agreed points, whether to stop.

Contract: ``PreemptionHandler`` installs handlers for SIGTERM, SIGUSR1 and SIGINT that only
record the signal (no exceptions inside the handler; a Ctrl-C writes one line, a second Ctrl-C
ends the process at once with exit code 130), and restores the previous handlers on
``close()``. A run installs it before any long set-up work (data loading, weight loading,
reference scoring) and acts on it only at points every rank reaches: the local flag
(``requested``) is all-reduced with MAX over the default process group, so a signal that reached
only some ranks (or reached them at different moments) stops every rank at the same point. In
the training loop (once per step) the run then saves a checkpoint and exits 0; during set-up it
exits 0 without training. Either way it skips the final export, and the launcher's status file
says the run is not complete, so the sbatch script requeues the job.

A rank launched by torchrun also stops (saving, as for SIGTERM) when its launcher is gone: torchrun
starts each worker in a session of its own, so a ``kill -9`` of torchrun alone (by a user, or
the kernel's out-of-memory killer) reaches no rank, and the orphaned ranks would otherwise train
on unsupervised, holding their GPUs and the run's lock. Each check (``requested``) compares the
parent pid with the one at start-up. Ranks started otherwise (``srun``, a plain ``python``, even
under ``nohup``) are not watched.

Schedulers:
* SLURM: ``#SBATCH --signal=USR1@300`` (no ``B:``) sends SIGUSR1 to every task 300 s before the
  time limit; at the limit (or on preemption) SLURM sends SIGTERM, then SIGKILL after KillWait
  (often 30 s). Launch one task per GPU with ``srun`` so each rank receives the signal.
* torchrun forwards SIGTERM (not SIGUSR1) to its workers and kills them 30 s later, so keep
  ``trainer.max_time_minutes`` or ``--signal=USR1@...`` as the primary mechanism there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Optional, Sequence

from nemo_aot.distributed.ranks import any_rank

log = logging.getLogger(__name__)

# SIGINT (Ctrl-C) is a stop like SIGTERM: finish the step, save, exit 130; a second Ctrl-C
# aborts at once (nothing saved since the last checkpoint).
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command
SECOND_INTERRUPT_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C, forwarded
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every worker's environment


class PreemptionHandler:
    """Record SIGTERM/SIGUSR1 in a flag; use as a context manager or call ``install``/``close``."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, enabled: bool = True):
        self.signals = tuple(signals)
        self.enabled = enabled
        self.received: Optional[int] = None  # the first signal number received, if any
        self._received_at = 0.0
        self._previous: dict[int, object] = {}
        self.launcher: Optional[int] = None
        """torchrun's pid, watched while installed (None: not launched by torchrun)."""
        self.launcher_gone = False

    def install(self) -> "PreemptionHandler":
        if not self.enabled or self._previous:
            return self
        if threading.current_thread() is not threading.main_thread():
            # Python only lets the main thread install handlers; stay usable, but say so.
            log.warning("PreemptionHandler: not on the main thread, signals will not be handled")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if LAUNCHER_ENV in os.environ:  # a torchrun worker: its parent is the elastic agent
            self.launcher = os.getppid()
        return self

    def close(self) -> None:
        """Restore the handlers that were installed before ``install``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.launcher = None

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.received is not None:
            # A Ctrl-C reaches every process of the terminal's group, and torchrun forwards it
            # to its workers once more within milliseconds: only a later one is a second Ctrl-C.
            if time.monotonic() - self._received_at < SECOND_INTERRUPT_S:
                return
            os.write(2, b"\nsecond interrupt: aborting now, without saving\n")
            os._exit(INTERRUPT_EXIT_CODE)
        if self.received is None:
            self.received = signum
            self._received_at = time.monotonic()
            if signum == signal.SIGINT:
                os.write(2, b"\ninterrupt: stopping after this step and saving a checkpoint "
                            b"(Ctrl-C again to abort at once)\n")

    @property
    def signal_name(self) -> Optional[str]:
        """The signal received (``SIGTERM``...), ``launcher exit`` for a lost torchrun, or None."""
        if self.received is not None:
            return signal.Signals(self.received).name
        return "launcher exit" if self.launcher_gone else None

    @property
    def requested(self) -> bool:
        """This rank received a signal or lost its launcher (local: agree with ``any_rank``
        before acting on it)."""
        if self.launcher is not None and not self.launcher_gone and os.getppid() != self.launcher:
            self.launcher_gone = True
            log.warning("the launcher (torchrun, pid %d) is gone: stopping at the next agreed "
                        "point and saving a checkpoint", self.launcher)
        return self.received is not None or self.launcher_gone

    def should_stop(self, group=None) -> bool:
        """True on every rank when any rank has received a signal (one tiny all-reduce)."""
        return any_rank(self.requested, group)


__all__ = ["PreemptionHandler", "any_rank", "DEFAULT_SIGNALS", "INTERRUPT_EXIT_CODE"]
