"""Where and how a deploy run computes: the device, cuDNN's kernel choice, and a description of it all.

How many threads it computes on is the core's choice, the same as training's (:mod:`repblocks.threads`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence

import torch

from repblocks.errors import UserError

__all__ = [
    "check_memory",
    "cudnn_benchmark",
    "describe_device",
    "environment",
    "resolve_device",
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
    count = torch.get_num_threads()
    return f"cpu ({count} thread{'s' if count != 1 else ''})"


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
