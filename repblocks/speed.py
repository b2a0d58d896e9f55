"""Speed of models side by side: train vs deploy form per backend and dtype, and the paper's speed table.

A *runner* is one way to execute one model: a backend (``eager``, ``channels_last``, ``compile``,
``onnxruntime``) in a dtype (``fp32``, ``fp16``, ``bf16``) on a device. Every runner of one batch
size is timed in one ``repblocks.bench.time_interleaved`` call, so the ratios between them
(deploy over train form, one backend over another) are measured under the same conditions.
Each runner is called once before timing; one that fails there (no compiler for
``torch.compile``, an operator missing in a dtype) is reported as skipped, with the reason, and
the others are timed.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch
from torch import Tensor, nn

from repblocks.bench import median, p90, synchronizer, throughput, time_interleaved
from repblocks.export import export_onnx, onnx_session

__all__ = ["BACKENDS", "DTYPES", "RunnerSpec", "applicable", "benchmark_forms", "fastest_deploy", "speed_table"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("eager", "channels_last", "compile", "onnxruntime")
PAPER_BASELINE = "torchvision:resnet18"  # the paper states every speed relative to ResNet-18

Candidate = Callable[[], object]


@dataclass(frozen=True)
class RunnerSpec:
    """What one timed candidate runs: which model form, through which backend, in which dtype."""

    form: str  # "train"/"deploy", or a model name in the speed table
    backend: str
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.form} {self.backend} {self.dtype}"


def applicable(backend: str, dtype: str, device: torch.device) -> str | None:
    """Why ``backend`` in ``dtype`` is not benchmarked on ``device``, or None when it is."""
    if dtype == "fp16" and device.type == "cpu":
        return "fp16 convolutions on the CPU are slow emulations, not a deployment setting (bf16 is timed on the CPU)"
    if backend == "onnxruntime" and dtype != "fp32":
        return "the ONNX export is float32; onnxruntime runs it as such"
    if backend == "onnxruntime" and device.type == "cuda" and "CUDAExecutionProvider" not in _ort_providers():
        return f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(_ort_providers())})"
    return None


def _ort_providers() -> list[str]:
    return onnxruntime.get_available_providers()


def benchmark_forms(
    forms: Mapping[str, nn.Module],
    *,
    device: torch.device,
    batch_sizes: Sequence[int],
    image_shape: tuple[int, int, int],
    backends: Sequence[str],
    dtypes: Sequence[str],
    rounds: int,
    warmup: int,
) -> tuple[list[dict], list[dict]]:
    """Time every form (``{"train": model, "deploy": plain}``) through every applicable backend and dtype.

    Args:
        forms: float32 CPU models in eval mode, keyed by form.
        device: Where to run them.
        batch_sizes: One interleaved timing per batch size, of all runners together.
        image_shape: ``(C, H, W)`` of the random input.
        backends, dtypes: Names from :data:`BACKENDS` and :data:`DTYPES`.
        rounds, warmup: See :func:`repblocks.bench.time_interleaved`.

    Returns:
        ``rows``: one per runner and batch size, with ``form, backend, dtype, batch_size,
        throughput`` (img/s), ``latency_ms`` and ``latency_p90_ms`` (per batch), ``ratio_to_train``
        (over the train form in the same backend and dtype) and ``ratio_to_train_eager`` (over the
        train form, eager, fp32); ``skipped``: ``what`` was not timed and ``reason``.
    """
    specs, skipped = [], []
    if not batch_sizes:
        return [], skipped
    for backend in backends:
        for dtype in dtypes:
            reason = applicable(backend, dtype, device)
            if reason is not None:
                skipped.append({"what": f"{backend} {dtype}", "reason": reason})
                continue
            specs.extend(RunnerSpec(form, backend, dtype) for form in forms)
    with tempfile.TemporaryDirectory(prefix="repblocks-bench-") as workdir:
        runners = {}
        for spec in specs:
            try:
                runners[spec] = _runner(forms[spec.form], spec, device, Path(workdir), image_shape)
            except Exception as err:  # an export or session that fails is reported, not fatal
                skipped.append({"what": spec.key, "reason": _one_line(err)})
        rows = []
        for batch_size in batch_sizes:
            images = torch.randn(batch_size, *image_shape, generator=torch.Generator().manual_seed(batch_size))
            samples, failed = _time_batch(runners, images, device, rounds=rounds, warmup=warmup)
            skipped.extend(failed)
            rows.extend(_row(spec, batch_size, times) for spec, times in samples.items())
    _add_ratios(rows)
    return rows, skipped


def fastest_deploy(rows: list[dict]) -> list[dict]:
    """Per batch size, the fastest deploy-form runner of ``rows`` and its throughput over the train form, eager fp32."""
    best: dict[int, dict] = {}
    for row in rows:
        current = best.get(row["batch_size"])
        if row["form"] == "deploy" and (current is None or row["throughput"] > current["throughput"]):
            best[row["batch_size"]] = row
    keys = ("batch_size", "backend", "dtype", "throughput", "ratio_to_train_eager")
    return [{key: row[key] for key in keys} for _, row in sorted(best.items())]


def speed_table(
    models: Mapping[str, nn.Module],
    *,
    device: torch.device,
    batch_size: int,
    image_shape: tuple[int, int, int],
    rounds: int,
    warmup: int,
) -> list[dict]:
    """The paper's protocol: every model eager in fp32, all timed interleaved at one batch size.

    Rows carry ``model, batch_size, throughput, latency_ms, latency_p90_ms`` and
    ``ratio_to_resnet18`` (throughput over that of ``torchvision:resnet18``, when it is among the models).
    """
    runners = {
        RunnerSpec(name, "eager", "fp32"): _runner(model, RunnerSpec(name, "eager", "fp32"), device, None, image_shape)
        for name, model in models.items()
    }
    images = torch.randn(batch_size, *image_shape, generator=torch.Generator().manual_seed(0))
    samples, failed = _time_batch(runners, images, device, rounds=rounds, warmup=warmup)
    if failed:
        raise RuntimeError(f"cannot time {failed[0]['what']}: {failed[0]['reason']}")
    rows = [dict(model=spec.form, **_row(spec, batch_size, times)) for spec, times in samples.items()]
    baseline = next((row["throughput"] for row in rows if row["model"] == PAPER_BASELINE), None)
    for row in rows:
        for key in ("form", "backend", "dtype"):
            row.pop(key)
        row["ratio_to_resnet18"] = row["throughput"] / baseline if baseline else None
    return rows


def _runner(
    model: nn.Module, spec: RunnerSpec, device: torch.device, workdir: Path | None, image_shape: tuple[int, int, int]
) -> Callable[[Tensor], Candidate]:
    """Prepare ``model`` for ``spec``; the result turns a float32 CPU batch into a zero-argument candidate."""
    dtype = DTYPES[spec.dtype]
    if spec.backend == "onnxruntime":
        path = workdir / f"{spec.form}.onnx"
        example = torch.randn(2, *image_shape)  # (2, C, H, W): the export's example batch
        export_onnx(model, path, example, atol=1e-3, rtol=1e-3)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        session = onnx_session(path, providers=providers)
        name = session.get_inputs()[0].name

        def ort_candidate(images: Tensor) -> Candidate:
            feed = {name: images.numpy()}  # on CUDA, each call copies it to the GPU and the logits back
            return lambda: session.run(None, feed)

        return ort_candidate
    memory_format = torch.channels_last if spec.backend == "channels_last" else torch.contiguous_format
    runnable = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=memory_format)
    if spec.backend == "compile":
        runnable = torch.compile(runnable)
    elif spec.backend not in ("eager", "channels_last"):
        raise ValueError(f"unknown backend {spec.backend!r}; known backends: {', '.join(BACKENDS)}")

    def candidate(images: Tensor) -> Candidate:
        batch = images.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)  # (B, C, H, W)
        return lambda: runnable(batch)

    return candidate


def _time_batch(
    runners: Mapping[RunnerSpec, Callable[[Tensor], Candidate]],
    images: Tensor,
    device: torch.device,
    *,
    rounds: int,
    warmup: int,
) -> tuple[dict[RunnerSpec, list[float]], list[dict]]:
    candidates, skipped = {}, []
    for spec, runner in runners.items():
        try:
            candidate = runner(images)
            with torch.inference_mode():
                candidate()  # the first call compiles, selects kernels, allocates: failures show here
        except Exception as err:
            if (spec.backend, spec.dtype) == ("eager", "fp32"):
                raise  # the reference itself failing is a bug, not a limitation of a backend
            log.warning("not timing %s at batch %d: %s", spec.key, images.shape[0], _one_line(err))
            skipped.append({"what": f"{spec.key} batch {images.shape[0]}", "reason": _one_line(err)})
            continue
        candidates[spec] = candidate
    if not candidates:
        return {}, skipped
    log.info("timing %d runners at batch %d, %d rounds", len(candidates), images.shape[0], rounds)
    by_key = time_interleaved(
        {spec.key: candidate for spec, candidate in candidates.items()},
        rounds=rounds,
        warmup=warmup,
        sync=synchronizer(device),
    )
    return {spec: by_key[spec.key] for spec in candidates}, skipped


def _row(spec: RunnerSpec, batch_size: int, times: list[float]) -> dict:
    return {
        "form": spec.form,
        "backend": spec.backend,
        "dtype": spec.dtype,
        "batch_size": batch_size,
        "throughput": throughput(batch_size, median(times)),
        "latency_ms": 1e3 * median(times),
        "latency_p90_ms": 1e3 * p90(times),
    }


def _add_ratios(rows: list[dict]) -> None:
    by_key = {(row["form"], row["backend"], row["dtype"], row["batch_size"]): row for row in rows}
    for row in rows:
        train = by_key.get(("train", row["backend"], row["dtype"], row["batch_size"]))
        train_eager = by_key.get(("train", "eager", "fp32", row["batch_size"]))
        row["ratio_to_train"] = row["throughput"] / train["throughput"] if train else None
        row["ratio_to_train_eager"] = row["throughput"] / train_eager["throughput"] if train_eager else None


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
