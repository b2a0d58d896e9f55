"""Where and how a deploy run computes: the device, torch's threads, cuDNN's kernel choice, and a description of it all."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from repblocks.errors import UserError

__all__ = ["cudnn_benchmark", "describe_device", "environment", "resolve_device", "threads"]


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
    if device.type == "cuda":
        # "tf32": fp32 convs ran in TF32 on Ampere and later, as PyTorch does by default (the paper's 1080Ti cannot).
        found["fp32_conv_precision"] = torch.backends.cudnn.conv.fp32_precision if tf32 else "ieee"
    return found
