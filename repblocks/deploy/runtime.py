"""Where and how a deploy run computes: the device, torch's threads, cuDNN's kernel choice, and a description of it all."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from repblocks.bench import available_cores, free_cores
from repblocks.errors import UserError

__all__ = [
    "ThreadChoice",
    "check_memory",
    "choose_threads",
    "cudnn_benchmark",
    "describe_device",
    "environment",
    "resolve_device",
    "threads",
    "total_memory",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"bench.device={name} but no CUDA device is available; use bench.device=cpu or auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(f"bench.device={name}: this machine has cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device(name)
    raise UserError(f"unknown bench.device {name!r}; known: auto, cpu, cuda, cuda:N")


def check_memory(*, batch_sizes: Sequence[int], image_shape: tuple[int, int, int], device: torch.device) -> None:
    """Refuse, in one line, a float32 input batch that alone would not fit in ``device``'s memory.

    The activations need more still: this is a floor that catches a typo, not a promise that a run fits.

    Raises:
        UserError: The largest batch of ``image_shape`` images is larger than the memory.
    """
    largest = max(batch_sizes, default=0)
    need, have = largest * math.prod(image_shape) * 4, total_memory(device)
    if have and need > have:
        raise UserError(
            f"a batch of {largest} images of {'x'.join(map(str, image_shape))} is {need / 2**30:.1f} GiB in float32 "
            f"alone, more than the {have / 2**30:.1f} GiB of {device.type} memory here: lower bench.batch_sizes, "
            "verify.batch_size or bench.image_size"
        )


def total_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (the machine's RAM for the CPU); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads a run uses, and why: the setting, or the cores other processes left free."""

    threads: int
    cores: int  # cores this process may run on
    other_load: float | None  # cores other processes kept busy when the choice was made; None: set, not measured
    wait_policy: str  # OMP_WAIT_POLICY: how OpenMP's idle threads wait (deploy.py sets PASSIVE unless told)

    @property
    def note(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        if self.other_load is None:
            return f"{threads} (bench.threads)"
        return (
            f"{threads}: {self.cores} cores, {self.other_load:.2f} kept busy by other processes "
            "when the run started (bench.threads=N to choose)"
        )


def choose_threads(requested: int | None) -> ThreadChoice:
    """``requested`` threads, or (None) as many as the cores other processes leave free, measured now."""
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP spins)")
    if requested:
        return ThreadChoice(requested, available_cores(), None, policy)
    count, load = free_cores()
    return ThreadChoice(count, available_cores(), load or 0.0, policy)


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Inside, torch uses ``count`` intra-op threads (None: leave torch's choice)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Inside, cuDNN times its kernels for each new shape and keeps the fastest (``enabled``), as deployments do."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def describe_device(device: torch.device) -> str:
    """``"cpu (2 threads)"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def environment(device: torch.device, *, tf32: bool) -> dict:
    """Versions and settings that a timing depends on, for the report."""
    import onnxruntime

    found = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads()}
    executorch = sys.modules.get("executorch.extension.pybindings.portable_lib")
    if executorch is not None:  # its own CPU thread pool, set to torch's count by the runs that load a .pte
        found["executorch_threads"] = executorch._threadpool_get_thread_count()
    if device.type == "cuda":
        # "tf32": fp32 convs ran in TF32 on Ampere and later, as PyTorch does by default (the paper's 1080Ti cannot).
        found["fp32_conv_precision"] = torch.backends.cudnn.conv.fp32_precision if tf32 else "ieee"
    return found
