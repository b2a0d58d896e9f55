"""How many threads a run computes on, on a machine that other processes may share.

OpenMP's threads wait for each other at the end of every parallel region, so one thread that shares
its core with a busy process holds up all the others: a run on as many threads as the machine has
cores costs far more than its share when another process is busy (2 epochs of ``qarepvgg_a0`` on
2 cores next to one busy process: 191 s on torch's default 2 threads, 10 s on 1). train.py and
deploy.py therefore run on as many threads as the cores other processes leave free
(:func:`repblocks.bench.free_cores`), unless a setting or ``OMP_NUM_THREADS`` says how many
(:func:`choose_threads`), and start as many data-loading workers as fit beside them
(:func:`loader_workers`).

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

__all__ = ["ThreadChoice", "choose_threads", "loader_workers", "use_threads"]

MAX_LOADER_WORKERS = 8  # beyond this, more data-loading processes rarely feed a model faster


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


def choose_threads(requested: int | None, *, setting: str = "threads", processes: int = 1) -> ThreadChoice:
    """``requested`` threads; else ``OMP_NUM_THREADS``; else the cores other processes leave free, measured now.

    Args:
        requested: The count a setting asks for; None or 0 to choose.
        setting: The setting's name, for the note (``threads``, ``bench.threads``).
        processes: Processes of this run sharing the machine (DDP on the CPU): each gets its share.

    Raises:
        UserError: ``OMP_NUM_THREADS`` is set but is not a whole number of at least 1.
    """
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP spins)")
    cores, processes = available_cores(), max(1, processes)
    share = max(1, cores // processes)
    if requested:
        return ThreadChoice(requested, cores, None, policy, setting, "setting", share)
    from_environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_environment:
        outermost = from_environment.split(",")[0].strip()  # "4,2": 4 threads, then 2 in nested regions
        if not outermost.isdigit() or int(outermost) < 1:
            raise UserError(f"OMP_NUM_THREADS must be a whole number of threads, at least 1, got {from_environment!r}")
        return ThreadChoice(int(outermost), cores, None, policy, setting, "OMP_NUM_THREADS", share)
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
