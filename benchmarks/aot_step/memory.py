"""The peak-memory probe: on CUDA the allocator's own peak, on the CPU a sampled malloc count."""

from __future__ import annotations

import ctypes
import gc
import threading
from typing import Callable, Optional

import torch


class PeakMemory:
    """Peak memory a variant adds: the highest bytes-in-use minus the bytes in use at start().

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: bytes handed out by malloc (glibc
    ``mallinfo2``: in-use arena chunks + mmapped chunks; not fooled by memory the allocator keeps
    cached), sampled every millisecond by a thread; the process RSS where mallinfo2 is missing.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._read = mallinfo_reader()
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated minus allocated at the variant's start"
        elif self._read is not None:
            self.method = ("malloc bytes in use (glibc mallinfo2), peak rise over build + warm-up, "
                           "sampled every 1 ms (approximate: short peaks can be missed)")
        else:
            import psutil

            self._read = lambda: psutil.Process().memory_info().rss
            self.method = ("process RSS rise over build + warm-up, sampled every 1 ms "
                           "(approximate: the allocator reuses memory freed earlier)")
        self._peak = self._base = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        self._base = self._peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._read())

    def stop(self) -> Optional[float]:
        """GiB added at the peak since start(); None when not started."""
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self._base) / 2**30
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._peak = max(self._peak, self._read())
        return (self._peak - self._base) / 2**30


def mallinfo_reader() -> Optional[Callable[[], int]]:
    """A function returning glibc's malloc bytes in use (``mallinfo2``), or None without it."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2

    def read() -> int:
        info = fn()
        return info.uordblks + info.hblkhd
    return read


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
