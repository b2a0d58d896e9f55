"""How many threads a run computes on, on a machine that other processes may share.

OpenMP's threads wait for each other at the end of every parallel region, so one thread that shares
its core with a busy process holds up all the others: a run on as many threads as the machine has
cores costs far more than its share when another process is busy (2 epochs of ``qarepvgg_a0`` on
2 cores next to one busy process: 191 s on torch's default 2 threads, 10 s on 1). train.py and
deploy.py therefore run on as many threads as the cores other processes leave free
(:func:`repblocks.bench.free_cores`), unless a setting or ``OMP_NUM_THREADS`` says how many
(:func:`choose_threads`), and start as many data-loading workers as fit beside them
(:func:`loader_workers`); predict.py chooses its engine's threads the same way.

Every entry script checks its threads setting (``threads=``, deploy's ``bench.threads=``) and
``OMP_NUM_THREADS`` with :func:`check_threads` before any work: a whole number from 1 to
:func:`max_threads` (4 per CPU of the machine), else one line naming the range and exit status 1.
More threads than that only wait on each other, and a count far beyond it is a crash, not a slow
run: torch starting a million threads ended train.py with SIGSEGV, predict.py grew to gigabytes.
A count above the limit is refused rather than clamped, so that a typo is never run quietly.

OpenMP's idle threads should also sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``): a spinning
thread on a core another process uses steals it at every barrier. OpenMP reads that setting once, when
torch loads it, so each entry script sets it (unless the environment already does) before its first
import of torch, which any import of ``repblocks`` brings; :class:`ThreadChoice` reports what was in force.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from repblocks.bench import available_cores, free_cores
from repblocks.errors import UserError

__all__ = ["ThreadChoice", "check_threads", "choose_threads", "loader_workers", "max_threads", "use_threads"]

MAX_LOADER_WORKERS = 8  # beyond this, more data-loading processes rarely feed a model faster
THREADS_PER_CPU = 4  # the most threads a setting may ask for, per CPU of the machine


def max_threads() -> int:
    """The most threads a setting (or ``OMP_NUM_THREADS``) may ask for: :data:`THREADS_PER_CPU` per CPU here."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def check_threads(value: object, *, setting: str = "threads") -> int | None:
    """A threads setting as given, and ``OMP_NUM_THREADS``, checked the one way every entry script checks them.

    ``OMP_NUM_THREADS`` is checked even when the setting decides: OpenMP and the engines read it too.

    Args:
        value: The setting: None (or empty text) to choose; else a whole number, or its text.
        setting: Its name, for the message (``threads``, ``bench.threads``).

    Returns:
        The count asked for, or None when the setting leaves it to :func:`choose_threads`.

    Raises:
        UserError: Not a whole number from 1 to :func:`max_threads`, in the setting or ``OMP_NUM_THREADS``
            (each of its comma-separated counts, ``"4,2"`` for nested regions); one line naming the range.
    """
    environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    for count in environment.split(",") if environment else ():
        _count(count, "OMP_NUM_THREADS", shown=environment)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _count(value, setting)


def _count(value: object, name: str, *, shown: object = None) -> int:
    limit = max_threads()
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdecimal() and text.isascii():
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, int) or not 1 <= text <= limit:
        raise UserError(
            f"{name} must be a whole number of threads from 1 to {limit} ({THREADS_PER_CPU} per CPU of this "
            f"machine), got {str(value if shown is None else shown)!r}"  # as typed, whichever command read it
        )
    return text


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads a run uses, and why: a setting, ``OMP_NUM_THREADS``, or the cores left free."""

    threads: int
    cores: int  # cores this process may run on
    other_load: float | None  # cores other processes kept busy when the choice was made; None: not measured
    wait_policy: str  # OMP_WAIT_POLICY: how OpenMP's idle threads wait
    setting: str = "threads"  # the setting that chooses the count by hand, e.g. bench.threads
    source: str = "measured"  # measured (the free cores), setting, or OMP_NUM_THREADS
    free: int | None = None  # this process's share of the cores left free (of all cores, when not measured)

    @property
    def note(self) -> str:
        """One line for a log or a report: ``1 thread: 2 cores, 1.02 kept busy by other processes ...``."""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        if self.source == "setting":
            return f"{threads} ({self.setting})"
        if self.source == "OMP_NUM_THREADS":
            return f"{threads} (OMP_NUM_THREADS in the environment; {self.setting}=N to choose)"
        return (
            f"{threads}: {self.cores} cores, {self.other_load:.2f} kept busy by other processes "
            f"when the run started ({self.setting}=N to choose)"
        )


def choose_threads(
    requested: int | None, *, setting: str = "threads", processes: int = 1, measure: bool = True
) -> ThreadChoice:
    """``requested`` threads; else ``OMP_NUM_THREADS``; else the cores other processes leave free, measured now.

    Args:
        requested: The count a setting asks for; None or 0 to choose.
        setting: The setting's name, for the note (``threads``, ``bench.threads``).
        processes: Processes of this run sharing the machine (DDP on the CPU): each gets its share.
        measure: False: torch's own count instead of measuring (nothing is timed, a measurement would only cost).

    Raises:
        UserError: ``requested`` or ``OMP_NUM_THREADS`` is not a whole number from 1 to :func:`max_threads`.
    """
    requested = check_threads(requested or None, setting=setting)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP spins)")
    cores, processes = available_cores(), max(1, processes)
    share = max(1, cores // processes)
    if requested:
        return ThreadChoice(requested, cores, None, policy, setting, "setting", share)
    from_environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_environment:
        outermost = int(from_environment.split(",")[0])  # "4,2": 4 threads, then 2 in nested regions
        return ThreadChoice(outermost, cores, None, policy, setting, "OMP_NUM_THREADS", share)
    if not measure:
        return ThreadChoice(torch.get_num_threads(), cores, None, policy, setting, "setting", share)
    free, load = free_cores()
    share = max(1, free // processes)
    return ThreadChoice(share, cores, load or 0.0, policy, setting, "measured", share)


def loader_workers(requested: int | None, choice: ThreadChoice) -> int:
    """Data-loading worker processes: ``requested``, else one fewer than the free cores (the training loop has one).

    A worker only decodes the next batches while the model computes, so it costs the threads beside it
    little; but every worker beyond the free cores stalls them, and each one starts a process.
    """
    if requested is not None:
        return requested
    return max(0, min(MAX_LOADER_WORKERS, (choice.free or choice.cores) - 1))


@contextlib.contextmanager
def use_threads(count: int | None) -> Iterator[None]:
    """Inside, torch uses ``count`` intra-op threads (None: leave torch's choice)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
