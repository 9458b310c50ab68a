"""Progress of long phases, and the console logging that shows it.

A long phase (tokenizing 100k records, the reference scoring pass) reports through the
``logging`` module on rank 0 only, every ``interval`` seconds and once at the end::

    INFO nemo_aot.progress: reference scoring: 1200/5000 global batches (24%), 3.1/s, ETA 20m 26s
    INFO nemo_aot.progress: reference scoring: done, 5000/5000 global batches in 26m 53s, 3.1/s

A phase shorter than ``interval`` stays silent. Usage, from any layer::

    with Progress(total=len(batches), what="reference scoring", unit="global batches") as progress:
        for batch in batches:
            ...
            progress.update()        # or update(n) after n items

    for batch in track(batches, total=num_global_batches, what="reference scoring",
                       unit="global batches"):
        ...

Contract: time comes from ``time.monotonic`` (injectable for tests); no collective is ever
called, so a reporter can sit inside any loop whatever the ranks do; the rank is read once,
from ``torch.distributed`` when it is already imported and initialized, else from ``RANK``.
This module imports nothing from nemo_aot (any layer may use it) and not torch.

``configure_logging`` is the console set-up of the ``nemo-aot`` entry points: nemo_aot's
loggers at INFO (``NEMO_AOT_LOG_LEVEL`` overrides), third-party libraries at WARNING, and on
ranks other than 0 only WARNING and above.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Mapping, Optional, TypeVar, Union

LOGGER_NAME = "nemo_aot.progress"
DEFAULT_INTERVAL_S = 30.0
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
THIRD_PARTY_LEVEL = logging.WARNING
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

T = TypeVar("T")


def current_rank() -> int:
    """This process's global rank: the initialized default process group's, else ``RANK``
    (torchrun and the launcher set it), else 0. Never imports torch nor calls a collective."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def format_duration(seconds: float) -> str:
    """``45s``, ``20m 26s``, ``3h 07m``, ``2d 04h``: two units at most, rounded down."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def format_rate(per_second: float) -> str:
    """``3.1/s``; slow phases per minute or per hour (``4.9/min``, ``12.0/h``) so digits stay."""
    if per_second >= 1.0:
        value, suffix = per_second, "/s"
    elif per_second * 60.0 >= 1.0:
        value, suffix = per_second * 60.0, "/min"
    else:
        value, suffix = per_second * 3600.0, "/h"
    return f"{value:.0f}{suffix}" if value >= 100 else f"{value:.1f}{suffix}"


class Progress:
    """Rank-0 progress of one phase: ``update(n)`` after each step, ``close()`` at the end.

    total     number of items (None when unknown: no percent, no ETA)
    what      the phase, first word of each line ("reference scoring", "tokenizing train")
    unit      the items' name, plural ("global batches", "records")
    interval  seconds between lines; a phase that ends sooner logs nothing
    logger    a ``logging.Logger`` or a logger name (default ``nemo_aot.progress``)
    clock     seconds as a float, ``time.monotonic`` unless a test passes a fake
    rank      who reports (only rank 0 does); default ``current_rank()``
    """

    def __init__(self, total: Optional[int], what: str, unit: str = "items", *,
                 interval: float = DEFAULT_INTERVAL_S,
                 logger: Union[logging.Logger, str] = LOGGER_NAME,
                 clock: Callable[[], float] = time.monotonic, rank: Optional[int] = None):
        if total is not None and total < 0:
            raise ValueError(f"Progress total must be >= 0 or None, got {total}")
        if interval <= 0:
            raise ValueError(f"Progress interval must be > 0 seconds, got {interval}")
        self.total, self.what, self.unit, self.interval = total, what, unit, interval
        self.done = 0
        self.lines = 0  # lines logged so far
        self.active = (current_rank() if rank is None else rank) == 0
        self._logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self._clock = clock
        self._start = self._last = clock() if self.active else 0.0
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done; log a line when ``interval`` has passed since the last."""
        self.done += n
        if not self.active or self._closed:
            return
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._log(self.line(now))

    def close(self) -> None:
        """End the phase: the final line if the phase took ``interval`` or longer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.active:
            return
        now = self._clock()
        if self.lines or now - self._start >= self.interval:
            self._log(self.final_line(now))

    def line(self, now: float) -> str:
        """``what: done/total unit (pct%), rate, ETA t`` as of clock time ``now``."""
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            return f"{self.what}: {self.done} {self.unit}, {format_rate(rate)}"
        percent = 100 * self.done // self.total if self.total else 100
        left = max(0, self.total - self.done)
        eta = format_duration(left / rate) if rate > 0 else "unknown"
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({percent}%), "
                f"{format_rate(rate)}, ETA {eta}")

    def final_line(self, now: float) -> str:
        elapsed = now - self._start
        count = f"{self.done}" if self.total is None else f"{self.done}/{self.total}"
        rate = f", {format_rate(self.done / elapsed)}" if elapsed > 0 else ""
        return f"{self.what}: done, {count} {self.unit} in {format_duration(elapsed)}{rate}"

    def _log(self, message: str) -> None:
        self.lines += 1
        self._logger.info(message)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], total: Optional[int] = None, what: str = "working",
          unit: str = "items", **options) -> Iterator[T]:
    """Yield from ``iterable`` inside a ``Progress``; an item counts as done when the loop asks
    for the next one. ``total`` defaults to ``len(iterable)`` when it has one; ``options`` go to
    ``Progress``. The final line is logged when the loop ends or the generator is closed
    (``break``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, what, unit, **options) as progress:
        for item in iterable:
            yield item
            progress.update()


# ---------------------------------------------------------------- console logging
def log_level(environ: Optional[Mapping[str, str]] = None) -> int:
    """nemo_aot's console level: ``NEMO_AOT_LOG_LEVEL`` (a name, any case, or a number), INFO
    when unset or empty. ValueError naming the variable for anything else."""
    env = os.environ if environ is None else environ
    value = (env.get("NEMO_AOT_LOG_LEVEL") or "").strip()
    if not value:
        return logging.INFO
    if value.isdigit():
        return int(value)
    if value.upper() in _LEVELS:
        return getattr(logging, value.upper())
    raise ValueError(f"NEMO_AOT_LOG_LEVEL={value!r} is not a log level. Fix: set it to one of "
                     f"{', '.join(_LEVELS)} (INFO is the default; WARNING hides progress lines) "
                     "or unset it")


class RankZeroFilter(logging.Filter):
    """Passes WARNING and above from every rank, lower levels only from rank 0 (rank read at
    each record, so a launcher that sets ``RANK`` after logging was configured is obeyed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or current_rank() == 0


def configure_logging(environ: Optional[Mapping[str, str]] = None) -> int:
    """Console logging of the entry points; returns nemo_aot's level.

    Logger ``nemo_aot`` (and its children) at ``log_level()``; the root logger, hence
    megatron, NeMo, torch and the rest, at WARNING (or at nemo_aot's level when that is
    higher, so ``NEMO_AOT_LOG_LEVEL=ERROR`` quiets everything); every root handler drops
    records below WARNING on ranks other than 0. Raises ValueError for a bad
    ``NEMO_AOT_LOG_LEVEL`` before changing anything.
    """
    level = log_level(environ)
    logging.basicConfig(format=LOG_FORMAT)  # a stderr handler, unless the root has one already
    logging.getLogger().setLevel(max(THIRD_PARTY_LEVEL, level))
    logging.getLogger("nemo_aot").setLevel(level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RankZeroFilter) for f in handler.filters):
            handler.addFilter(RankZeroFilter())
    return level
