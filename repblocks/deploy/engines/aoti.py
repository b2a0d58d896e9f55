"""AOTInductor (part of torch, opt-in): ``model.aoti.pt2``, the model compiled ahead of time to a shared library.

``torch._inductor.aoti_compile_and_package`` turns a ``torch.export`` program (dynamic batch axis) into
C++ that a compiler (``g++``, or ``$CXX``) builds for this machine's CPU; the package holds the library,
the weights and the deploy metadata (``aot_inductor.metadata``). ``aoti_load_package`` runs it from any
PyTorch of the same version, without Python model code. The library is native code built for the CPU it
was compiled on (the package records its ISA, ``AOTI_CPU_ISA``): load only packages you built yourself.

The export is checked as every other: the package, loaded back, must reproduce the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from repblocks.deploy.engines.base import Engine, Runner, check_outputs
from repblocks.errors import OutputMismatch
from repblocks.files import atomic_path
from repblocks.int8.conversion import dynamic_axes

__all__ = ["ENGINE"]

# What inductor logs while it compiles on a machine without a GPU, none of it about the model.
_LOGGERS = ("torch.utils.cpp_extension", "torch._inductor", "torch._dynamo", "torch.export")


def compiler() -> str | None:
    """The C++ compiler inductor would call (``$CXX``, else ``g++``), when it is on the PATH."""
    return shutil.which(os.environ.get("CXX") or "g++")


def compile_package(model: nn.Module, path: Path, example: Tensor, metadata: Mapping[str, str]) -> None:
    """Compile ``model`` (batch axis dynamic) into the AOTInductor package ``path``, ``metadata`` inside."""
    with torch.no_grad(), _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=(dynamic_axes(),))
        with open(path, "wb") as handle:  # a file object: the temporary name need not end in .pt2
            torch._inductor.aoti_compile_and_package(
                program, package_path=handle, inductor_configs={"aot_inductor.metadata": dict(metadata)}
            )


def load(path: Path):
    """The package at ``path``, loaded (its library opened): images -> logits, and ``get_metadata()``."""
    with open(path, "rb") as handle:
        return torch._inductor.aoti_load_package(handle)


def _metadata(loaded) -> dict[str, str]:
    # AOTI_*: what inductor records of the machine it compiled for, not the deploy metadata.
    return {key: value for key, value in loaded.get_metadata().items() if not key.startswith("AOTI_")}


def _runner(loaded, metadata: dict[str, str] | None = None) -> Runner:
    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return loaded(images.float().contiguous())

    return Runner(run, metadata=metadata or {})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Inductor's warnings while compiling (no CUDA runtime found, ...) stay out of the user's log."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class AOTInductor(Engine):
    name = "aoti"
    title = "AOTInductor"
    backends = ("aoti",)

    def missing(self, device=None):
        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return f"torch {torch.__version__} has no AOTInductor packaging (torch 2.6 or later has)"
        if compiler() is None:
            return f"AOTInductor builds C++, and no compiler was found ({os.environ.get('CXX') or 'g++'}; set CXX)"
        return None

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        path = Path(path)
        with atomic_path(path) as tmp:
            compile_package(model, tmp, example, metadata)
            loaded = load(tmp)
            errors = check_outputs(
                model, _runner(loaded), example, check=check, what=f"AOTInductor reading {path.name}"
            )
            if _metadata(loaded) != dict(metadata):
                raise OutputMismatch(f"{path.name} does not read back the metadata compiled into it")
        return {"path": str(path), "format": "aoti", "runtime": f"torch {torch.__version__} AOTInductor", **errors}

    def read_metadata(self, path):
        return _metadata(load(Path(path)))

    def open(self, path, threads, *, precision=None):
        try:
            loaded = load(Path(path))
        except Exception as err:  # torch's RuntimeError: not a package, or built for another machine
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise ValueError(f"AOTInductor cannot load {path}: {(lines or [''])[0][:300]}") from None
        return _runner(loaded, _metadata(loaded))

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        path = workdir / "model.aoti.pt2"
        compile_package(model, path, torch.randn(2, *image_shape), {})
        return _runner(load(path))


ENGINE = AOTInductor()
