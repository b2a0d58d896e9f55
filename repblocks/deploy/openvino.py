"""OpenVINO (extra ``[openvino]``): convert a deploy form, compile it for the CPU, save and check ``.xml``/``.bin``.

OpenVINO is optional: this module imports it only inside its functions, and :func:`missing`
says why it cannot be used (for the benchmark's list of skipped backends) where
:func:`require` stops a run that asked for it by name. The conversion and the compilation are
:mod:`repblocks.int8.openvino`'s, shared with int8 and QAT; this module adds timing and files.

Two settings are always explicit, because their defaults change results or speed:

* ``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX-512 BF16 OpenVINO's default is bf16, which
  changes the outputs (the export check would fail) and, on a CPU without AMX, ran A0 1.8x
  slower than f32 here;
* ``PERFORMANCE_HINT``: ``LATENCY`` (one stream using every thread: the ``openvino`` backend) or
  ``THROUGHPUT`` (several streams sharing the threads, requests in flight together: the
  ``openvino_throughput`` backend, which splits each batch among them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from torch import Tensor

# One conversion and one compilation for fp32 and int8, deployment and QAT: they live in the int8 package.
from repblocks.deploy.formats import openvino_installed
from repblocks.int8.openvino import (
    INSTALL,
    compile_model,
    infer,
    missing,
    record_precision,
    recorded_precision,
    require,
    to_openvino,
)

__all__ = [
    "INSTALL",
    "compile_model",
    "infer",
    "installed",
    "load",
    "missing",
    "read_metadata",
    "record_precision",
    "recorded_precision",
    "require",
    "runner",
    "save",
    "set_metadata",
    "to_openvino",
]


def installed() -> bool:
    """Whether OpenVINO and NNCF can be imported, without importing them (what defaults are chosen by)."""
    return openvino_installed()


def set_metadata(ov_model, metadata: Mapping[str, str]) -> None:
    """Store ``metadata`` (model name, preprocessing, ...) in the model's runtime info, under ``repblocks``."""
    for key, value in metadata.items():
        ov_model.set_rt_info(value, ["repblocks", key])


def read_metadata(ov_model) -> dict[str, str]:
    """What :func:`set_metadata` stored in the model's runtime info, as strings (``{}`` when there is none)."""
    if not ov_model.has_rt_info(["repblocks"]):
        return {}
    entries = ov_model.get_rt_info(["repblocks"]).astype(dict)
    return {str(key): value.astype(str) for key, value in entries.items()}


def runner(ov_model, *, mode: str, threads: int | None = None) -> Callable[[Tensor], Callable[[], object]]:
    """For timing: a float32 CPU batch -> a zero-argument call that runs it (split among requests in throughput mode)."""
    compiled = compile_model(ov_model, mode=mode, threads=threads)
    if mode == "latency":
        request = compiled.create_infer_request()

        def latency_candidate(images: Tensor) -> Callable[[], object]:
            feed = {0: images.numpy()}
            return lambda: request.infer(feed)

        return latency_candidate
    ov = require("the openvino backend")
    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def candidate(images: Tensor) -> Callable[[], object]:
        chunks = [chunk.numpy() for chunk in images.chunk(len(queue))]  # one request per chunk, run together

        def run() -> None:
            for chunk in chunks:
                queue.start_async({0: chunk})
            queue.wait_all()

        return run

    return candidate


def save(ov_model, path: str | Path) -> list[Path]:
    """Write ``path`` (``.xml``) and its ``.bin``, weights kept in their precision; return both paths.

    Both are written under temporary names and renamed, the ``.bin`` first: a ``.xml`` at the
    final name always has its whole ``.bin`` beside it, and a failure leaves neither.
    """
    ov = require("the openvino export")
    path = Path(path)
    weights = path.with_suffix(".bin")
    with _temporary_pair(path) as tmp:
        # compress_to_fp16 defaults to True: float32 weights would be rounded to fp16 on the way to disk.
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), weights)
        os.replace(tmp, path)
    return [path, weights]


def load(path: str | Path):
    """Read an ``.xml`` (and its ``.bin``) back as an ``openvino.Model``."""
    ov = require("reading an OpenVINO model")
    return ov.Core().read_model(str(path))


@contextlib.contextmanager
def _temporary_pair(path: Path) -> Iterator[Path]:
    """A hidden temporary ``.xml`` name beside ``path``; whatever is left of it and its ``.bin`` is removed after."""
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp.xml")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
