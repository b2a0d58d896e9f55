"""Timing primitives: several candidates timed interleaved in one process, and their statistics.

Timing candidates one after another lets the machine drift between them (clock boost, thermal
throttling, other processes, allocator state), and that drift lands on whichever was timed later.
:func:`time_interleaved` runs one call of every candidate per round instead, in an order that
changes every round (:func:`round_order`), so every candidate sees the same conditions, none is
always first and none always follows the same other one. Candidates are
zero-argument callables keyed by name: an eager model, a channels-last copy, an onnxruntime
session, anything that does one unit of work per call.

>>> samples = time_interleaved({"train": lambda: model(x), "deploy": lambda: plain(x)})
>>> throughput(x.shape[0], median(samples["deploy"]))  # images per second
>>> paired_ratio(samples["deploy"], samples["train"]).value  # how many times faster, paired round by round

Other processes on the cores skew every timing, and more than their share: :class:`OtherLoad`
measures them while a block runs, and :func:`free_cores` says how many cores they leave, to run
on no more threads than that.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SKEW_THRESHOLD",
    "SPREAD_LIMIT",
    "OtherLoad",
    "PairedRatio",
    "available_cores",
    "free_cores",
    "median",
    "p90",
    "paired_ratio",
    "percentile",
    "round_order",
    "spread",
    "synchronizer",
    "throughput",
    "time_interleaved",
]

log = logging.getLogger(__name__)

Candidate = Callable[[], object]
SKEW_THRESHOLD = 0.1  # cores other processes may keep busy before timings count as skewed
# A runner whose p90 exceeds its fastest call by more than this was disturbed in many rounds: its ratios are unsteady.
SPREAD_LIMIT = 1.5


def time_interleaved(
    candidates: Mapping[str, Candidate],
    *,
    rounds: int = 7,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    inference: bool = True,
) -> dict[str, list[float]]:
    """Time every candidate once per round, for ``rounds`` rounds, after ``warmup`` calls of each.

    Each round runs every candidate once, in the order :func:`round_order` gives, so that no
    candidate is always first or always follows the same other one. Everything runs under
    ``torch.inference_mode()`` (unless ``inference=False``) with the garbage collector paused,
    and each call is timed with ``time.perf_counter`` between two synchronizations of the
    device, so asynchronous (CUDA) work is counted in the call that queued it.

    Args:
        candidates: Zero-argument callables keyed by name; each call is one unit of work (a batch).
        rounds: Timed calls per candidate.
        warmup: Untimed calls per candidate first (allocator, kernel selection, lazy init).
        sync: Waits for the device to finish queued work. By default it is chosen from the
            warm-up outputs: ``torch.cuda.synchronize`` (or MPS's) when a candidate returns a
            tensor on that device, otherwise nothing. Pass one (``synchronizer(x)``) when the
            outputs do not show the device: ``warmup=0``, or candidates that return None or NumPy.
        inference: Run under ``torch.inference_mode()``. False runs in the caller's autograd mode,
            for candidates that train (forward, backward and optimizer step).

    Returns:
        Seconds per call, ``rounds`` samples per candidate, in the order of ``candidates``.

    Raises:
        ValueError: No candidates, ``rounds < 1`` or ``warmup < 0``.
    """
    if not candidates:
        raise ValueError("time_interleaved needs at least one candidate, got none")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    with torch.inference_mode(inference):
        devices, last_warmup = set(), {}
        for name in names:
            for _ in range(warmup):
                started = time.perf_counter()
                devices.update(_devices(candidates[name]()))
                last_warmup[name] = time.perf_counter() - started
        if sync is None:
            sync = synchronizer(*devices)
        sync()
        if last_warmup:  # a long timing says how long, before it starts
            log.info(
                "timing %d candidate%s x %d rounds: about %.1f s (from their last warm-up calls)",
                len(names),
                "s" if len(names) != 1 else "",
                rounds,
                rounds * sum(last_warmup.values()),
            )
        gc.collect()
        gc.disable()
        try:
            for round_idx in range(rounds):
                for name in round_order(names, round_idx):
                    samples[name].append(_time_call(candidates[name], sync))
        finally:
            if gc_was_enabled:
                gc.enable()
    for name in names:
        log.info("%s: median %.2f ms, p90 %.2f ms", name, 1e3 * median(samples[name]), 1e3 * p90(samples[name]))
    return samples


def round_order(names: Sequence[str], round_idx: int) -> list[str]:
    """The order of the candidates in round ``round_idx``: a row of a Williams design.

    Rotating the order alone lets every candidate go first equally often, but nearly always
    after the same predecessor, whose leftovers (allocator state, caches) then bias it the same
    way every round. In a Williams design (a Latin square balanced for carry-over), over every
    cycle of ``len(names)`` rounds (twice that for an odd count) each candidate goes first
    equally often and directly follows every other candidate equally often.
    """
    count = len(names)
    base = [0]  # 0, 1, n-1, 2, n-2, ...: consecutive differences that cover every residue once
    low, high = 1, count - 1
    while low <= high:
        base.append(low)
        low += 1
        if low <= high:
            base.append(high)
            high -= 1
    row = round_idx % (count if count % 2 == 0 else 2 * count)
    order = [names[(idx + row) % count] for idx in base]
    return order[::-1] if row >= count else order


def _time_call(candidate: Candidate, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    candidate()
    sync()
    return time.perf_counter() - start


def synchronizer(*where: object) -> Callable[[], None]:
    """A function that waits for the accelerator named in ``where``; a no-op for the CPU.

    Args:
        where: Devices, device strings, or tensors (also nested in lists, tuples or dicts), e.g.
            the model input: ``synchronizer(x)``. The first CUDA or MPS device found decides.
    """
    where = tuple(torch.device(item) if isinstance(item, str) else item for item in where)
    for device in _devices(where):
        if device.type == "cuda":
            return lambda: torch.cuda.synchronize(device)
        if device.type == "mps":
            return torch.mps.synchronize
    return _no_sync


def _no_sync() -> None:
    pass


def _devices(obj: object) -> list[torch.device]:
    if isinstance(obj, Tensor):
        return [obj.device]
    if isinstance(obj, torch.device):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [device for item in obj for device in _devices(item)]
    return []


def median(samples: Sequence[float]) -> float:
    """The median of ``samples`` (the mean of the middle two for an even count)."""
    return statistics.median(samples)


def p90(samples: Sequence[float]) -> float:
    """The 90th percentile of ``samples``; see :func:`percentile`."""
    return percentile(samples, 90)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile, interpolating linearly between order statistics (NumPy's default).

    Raises:
        ValueError: ``samples`` is empty or ``q`` is outside [0, 100].
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def throughput(batch_size: int, seconds: float) -> float:
    """Images per second when a batch of ``batch_size`` takes ``seconds`` (e.g. the median)."""
    if seconds <= 0:
        raise ValueError(f"seconds per batch must be positive, got {seconds}")
    return batch_size / seconds


def spread(samples: Sequence[float]) -> float:
    """How unsteady a runner's times were: their p90 over the fastest (1.0: every call took as long).

    Against the fastest call, not the median: a runner slowed down in most rounds has a median far
    above its fastest call and a p90 close to its median, and is no steadier for that.
    """
    return p90(samples) / min(samples)


@dataclass(frozen=True)
class PairedRatio:
    """How many times faster a candidate ran than a reference, from the rounds in which both were timed.

    :func:`time_interleaved` runs every candidate once per round, so the two calls of a round met
    the same conditions: their ratio is free of whatever drifted between rounds, and its median over
    the rounds is the estimate (:attr:`value`), with the spread of the rounds beside it (:attr:`low`,
    :attr:`high`). A runner whose p90 is far above its fastest call was disturbed in many rounds (an
    eager model whose OpenMP threads stalled whenever another process woke up: p90 9x its median,
    measured): a ratio to it says more about the disturbance than about the runners, and
    :attr:`steady` is False.
    """

    value: float  # median over rounds of reference seconds / candidate seconds; above 1: the candidate is faster
    low: float  # 10th percentile of the per-round ratios
    high: float  # 90th percentile of the per-round ratios
    of_medians: float  # the reference's median over the candidate's: what a table of medians implies
    candidate_spread: float  # the candidate's p90 over its fastest call (:func:`spread`)
    reference_spread: float  # the reference's p90 over its fastest call
    rounds: int
    limit: float = SPREAD_LIMIT  # the widest spread either runner may have for the ratio to count as steady

    @property
    def steady(self) -> bool:
        """Both runners' times were steady enough (spread within :attr:`limit`) for the ratio to mean what it says."""
        return max(self.candidate_spread, self.reference_spread) <= self.limit

    def unsteady_reason(self, candidate: str = "the candidate", reference: str = "the reference") -> str | None:
        """``"the reference's p90 was 9.1x its fastest call ..."`` (the wider of the two), or None when steady."""
        if self.steady:
            return None
        name, wider = max((reference, self.reference_spread), (candidate, self.candidate_spread), key=lambda x: x[1])
        return f"{name}'s p90 was {wider:.1f}x its fastest call (over {self.limit:g}x: unsteady timings)"


def paired_ratio(candidate: Sequence[float], reference: Sequence[float], *, limit: float = SPREAD_LIMIT) -> PairedRatio:
    """Throughput of ``candidate`` over ``reference`` from their samples of the same rounds, in round order.

    Args:
        candidate, reference: Seconds per call, one per round, as :func:`time_interleaved` returns them.
        limit: The widest spread (:func:`spread`) either may have for the ratio to count as steady.

    Raises:
        ValueError: The two hold different numbers of rounds, or none.
    """
    if len(candidate) != len(reference) or not candidate:
        raise ValueError(f"paired samples need the same rounds, got {len(candidate)} and {len(reference)}")
    per_round = [ref / cand for cand, ref in zip(candidate, reference, strict=True)]
    return PairedRatio(
        value=median(per_round),
        low=percentile(per_round, 10),
        high=percentile(per_round, 90),
        of_medians=median(reference) / median(candidate),
        candidate_spread=spread(candidate),
        reference_spread=spread(reference),
        rounds=len(per_round),
        limit=limit,
    )


class OtherLoad:
    """How many cores other processes kept busy while a ``with`` block ran, to flag skewed timings.

    Other processes on the cores skew every timing, more than their share: OpenMP threads that
    outnumber the free cores stall each other. Reads ``/proc/stat`` (Linux); elsewhere ``cores``
    stays None.

    >>> with OtherLoad() as load:
    ...     samples = time_interleaved(candidates)
    >>> load.cores  # e.g. 0.05: other processes used a twentieth of one core on average
    """

    cores: float | None = None

    def __enter__(self) -> OtherLoad:
        self.cores = None
        self._start = (_machine_busy_seconds(), _own_busy_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc_info: object) -> None:
        machine_start, own_start, wall_start = self._start
        machine_end, wall = _machine_busy_seconds(), time.perf_counter() - wall_start
        if machine_start is None or machine_end is None or wall <= 0:
            return
        others = machine_end - machine_start - (_own_busy_seconds() - own_start)
        self.cores = max(0.0, others) / wall

    def warning(self, threshold: float = SKEW_THRESHOLD) -> str | None:
        """A one-line warning when other processes kept more than ``threshold`` cores busy, else None."""
        if self.cores is None or self.cores <= threshold:
            return None
        return (
            f"warning: other processes kept {self.cores:.2f} of {available_cores()} cores busy while timing; "
            "these figures are skewed"
        )


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have used since boot (Linux), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_busy_seconds() -> float:
    times = os.times()
    return times.user + times.system


def available_cores() -> int:
    """The cores this process may run on (its affinity, which a container or ``taskset`` may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_cores(sample_s: float = 0.3) -> tuple[int, float | None]:
    """How many cores other processes leave free, measured over ``sample_s`` seconds; and their load in cores.

    OpenMP's threads wait for each other at the end of every parallel region: one thread that
    shares its core with another busy process holds the others up, so torch on as many threads as
    cores collapses (25 ms to 490 ms a batch, measured) when one core is taken. Use this many.
    """
    with OtherLoad() as load:
        time.sleep(sample_s)
    cores = available_cores()
    if load.cores is None:
        return cores, None
    return max(1, min(cores, round(cores - load.cores))), load.cores
