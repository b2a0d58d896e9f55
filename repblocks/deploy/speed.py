"""Speed of models side by side: train vs deploy form per backend and dtype, and the paper's speed table.

A *runner* (:mod:`repblocks.deploy.engines`) is one way to execute one model: a backend in a
dtype on a device. Every runner of one batch
size is timed in one ``repblocks.bench.time_interleaved`` call, so the ratios between them
(deploy over train form, one backend over another) are measured under the same conditions.
Each runner is called once before timing; one that fails there (no compiler for
``torch.compile``, an operator missing in a dtype) is reported as skipped, with the reason, and
the others are timed. Other processes' load is measured while timing (:class:`repblocks.bench.OtherLoad`)
and goes with the figures (:class:`Timing`): above :data:`repblocks.bench.SKEW_THRESHOLD` cores, they
are flagged as skewed.

A ratio between two runners is the median of their per-round ratios (:func:`repblocks.bench.paired_ratio`):
the two calls of a round met the same conditions. A ratio to a runner whose times spread widely (p90 over
the fastest call above :data:`repblocks.bench.SPREAD_LIMIT`) is marked unsteady, and the headline
(:func:`fastest_deploy`) withholds it rather than quote a ratio to a reference that collapsed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from repblocks.bench import (
    SKEW_THRESHOLD,
    OtherLoad,
    PairedRatio,
    median,
    p90,
    paired_ratio,
    spread,
    synchronizer,
    throughput,
    time_interleaved,
)
from repblocks.deploy import executorch, low_precision, openvino, tensorrt
from repblocks.deploy.config import BenchConfig
from repblocks.deploy.engines import (
    OPENVINO_MODES,
    Candidate,
    RunnerSpec,
    applicable,
    build_runner,
    et_runner,
    one_line,
    ort_runner,
)
from repblocks.deploy.export import onnx_session
from repblocks.deploy.runtime import cudnn_benchmark
from repblocks.numerics import ieee_fp32

if TYPE_CHECKING:
    from repblocks.deploy.quantize import Quantization

__all__ = [
    "Timing",
    "benchmark_forms",
    "fastest_deploy",
    "int8_runners",
    "speed_table",
    "time_forms",
    "time_models",
    "timer_note",
]
Prepared = Callable[[Path], Callable[[Tensor], Candidate]]  # builds a runner, given a work folder

log = logging.getLogger(__name__)

PAPER_BASELINE = "torchvision:resnet18"  # the paper states every speed relative to ResNet-18


@dataclass(frozen=True)
class Timing:
    """What the time stage measured: a row per runner and batch size, what was not timed, and under what load."""

    rows: list[dict] = field(default_factory=list)  # form, backend, dtype, batch_size, throughput, latency_ms, ...
    skipped: list[dict] = field(default_factory=list)  # what was not timed, and the reason
    other_load: float | None = None  # cores other processes kept busy while timing; None: nothing timed, or unknown
    threads: int | None = None  # torch's intra-op threads while timing

    @property
    def skewed(self) -> bool:
        """Other processes were busy enough to skew the figures (and the ratios between them)."""
        return self.other_load is not None and self.other_load > SKEW_THRESHOLD


def time_forms(
    forms: Mapping[str, nn.Module],
    *,
    device: torch.device,
    bench: BenchConfig,
    image_shape: tuple[int, int, int],
    prepared: Mapping[RunnerSpec, Prepared] | None = None,
) -> Timing:
    """The time stage of a deploy run: :func:`benchmark_forms` under ``bench``'s cuDNN and TF32 settings."""
    if not bench.batch_sizes:
        return Timing()
    with cudnn_benchmark(bench.cudnn_benchmark), ieee_fp32(not bench.tf32), OtherLoad() as load:
        rows, skipped = benchmark_forms(
            forms,
            device=device,
            batch_sizes=bench.batch_sizes,
            image_shape=image_shape,
            backends=bench.backends,
            dtypes=bench.dtypes,
            rounds=bench.rounds,
            warmup=bench.warmup,
            prepared=prepared,
        )
    return _measured(rows, skipped, load)


def time_models(
    models: Mapping[str, nn.Module], *, device: torch.device, bench: BenchConfig, image_shape: tuple[int, int, int]
) -> Timing:
    """The paper's speed table under ``bench``'s settings: :func:`speed_table` at each batch size."""
    with cudnn_benchmark(bench.cudnn_benchmark), ieee_fp32(not bench.tf32), OtherLoad() as load:
        rows = [
            row
            for batch_size in bench.batch_sizes
            for row in speed_table(
                models,
                device=device,
                batch_size=batch_size,
                image_shape=image_shape,
                rounds=bench.rounds,
                warmup=bench.warmup,
            )
        ]
    return _measured(rows, [], load)


def _measured(rows: list[dict], skipped: list[dict], load: OtherLoad) -> Timing:
    timing = Timing(rows, skipped, other_load=load.cores, threads=torch.get_num_threads())
    if timing.skewed:
        log.warning(load.warning())
    return timing


def timer_note(bench: BenchConfig) -> str:
    """How the times were taken, for the report."""
    return (
        f"time.perf_counter around each call, between device synchronizations (repblocks.bench.time_interleaved); "
        f"median and p90 of {bench.rounds} rounds after {bench.warmup} warm-up calls, every runner of a batch size "
        "interleaved in one process; ratios are medians of per-round ratios; onnxruntime with torch's thread count "
        "and without spinning idle threads, ExecuTorch's thread pool on torch's count, one image per call"
    )


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
    prepared: Mapping[RunnerSpec, Prepared] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Time every form (``{"train": model, "deploy": plain}``) through every applicable backend and dtype.

    Args:
        forms: float32 CPU models in eval mode, keyed by form.
        device: Where to run them.
        batch_sizes: One interleaved timing per batch size, of all runners together.
        image_shape: ``(C, H, W)`` of the random input.
        backends, dtypes: Names from :data:`BACKENDS` and :data:`DTYPES`.
        rounds, warmup: See :func:`repblocks.bench.time_interleaved`.
        prepared: More runners, each built by a function of the work folder: the int8 models of
            ``quantize=int8`` (:func:`int8_runners`), timed in the same rounds as the others.

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
    log.info(
        "time: %d runners x batch sizes %s x %d rounds after %d warm-up calls, at %s; building the runners first",
        len(specs) + len(prepared or {}),
        list(batch_sizes),
        rounds,
        warmup,
        "x".join(map(str, image_shape)),
    )
    with tempfile.TemporaryDirectory(prefix="repblocks-bench-") as workdir:
        runners = {}
        for spec in specs:
            try:
                runners[spec] = build_runner(forms[spec.form], spec, device, Path(workdir), image_shape)
            except Exception as err:  # an export or session that fails is reported, not fatal
                skipped.append({"what": spec.key, "reason": one_line(err)})
        for spec, build in (prepared or {}).items():
            try:
                runners[spec] = build(Path(workdir))
            except Exception as err:
                skipped.append({"what": spec.key, "reason": one_line(err)})
        rows = []
        for batch_size in batch_sizes:
            images = torch.randn(batch_size, *image_shape, generator=torch.Generator().manual_seed(batch_size))
            samples, failed = _time_batch(runners, images, device, rounds=rounds, warmup=warmup)
            skipped.extend(failed)
            rows.extend(_row(spec, batch_size, times) for spec, times in samples.items())
    _add_ratios(rows)
    return rows, skipped


def int8_runners(quantization: Quantization, *, device: torch.device, backends: Sequence[str]) -> dict:
    """``{RunnerSpec: build(workdir) -> runner}`` for the int8 models that passed the gate, in the backends asked for.

    The CPU engines run on the CPU only; on a GPU the QDQ model becomes a TensorRT int8 engine.
    """
    passed, prepared = quantization.passed, {}
    if device.type == "cpu" and "openvino" in passed:
        for backend in ("openvino", "openvino_throughput"):
            if backend in backends:
                model, mode = passed["openvino"].model, OPENVINO_MODES[backend]
                prepared[RunnerSpec("deploy", backend, "int8")] = lambda _, m=model, mode=mode: openvino.runner(
                    m, mode=mode
                )
    if device.type == "cpu":  # HOOK(low_precision): bf16/fp16 in the same interleaved rounds
        for (backend, dtype), model in low_precision.timed_models(passed, backends=backends).items():
            prepared[RunnerSpec("deploy", backend, dtype)] = lambda _, m=model, b=backend: openvino.runner(
                m, mode=OPENVINO_MODES[b]
            )
    if device.type == "cpu" and "executorch" in passed and "executorch" in backends:
        program = passed["executorch"].model  # the .pte's bytes
        prepared[RunnerSpec("deploy", "executorch", "int8")] = lambda _: et_runner(executorch.runner(program))
    if "onnxruntime" in passed:
        qdq = passed["onnxruntime"].model  # the QDQ ONNX file's bytes
        if device.type == "cpu" and "onnxruntime" in backends:
            prepared[RunnerSpec("deploy", "onnxruntime", "int8")] = lambda _: ort_runner(onnx_session(qdq))
        if device.type == "cuda" and "tensorrt" in backends and tensorrt.missing(device) is None:
            prepared[RunnerSpec("deploy", "tensorrt", "int8")] = lambda workdir: _tensorrt_int8(qdq, workdir, device)
    return prepared


def _tensorrt_int8(qdq: bytes, workdir: Path, device: torch.device) -> Callable:
    path = workdir / "int8.onnx"
    path.write_bytes(qdq)
    return tensorrt.runner(path, dtype="int8", image_shape=_input_shape(qdq), max_batch=128, device=device)


def _input_shape(onnx_bytes: bytes) -> tuple[int, int, int]:
    import onnx

    dims = onnx.load_from_string(onnx_bytes).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])


def fastest_deploy(rows: list[dict]) -> list[dict]:
    """Per batch size, the fastest deploy-form runner of ``rows`` and its throughput over the train form, eager fp32.

    The headline of a report. Its ratio is the paired one, with the middle 80% of the rounds
    (``ratio_range``); when either runner's times were unsteady, ``ratio_to_train_eager`` is None and
    ``withheld`` says why: a ratio to a reference that collapsed is no figure to quote.
    """
    best: dict[int, dict] = {}
    for row in rows:
        current = best.get(row["batch_size"])
        if row["form"] == "deploy" and (current is None or row["throughput"] > current["throughput"]):
            best[row["batch_size"]] = row
    headline = []
    for _, row in sorted(best.items()):
        withheld = row.get("ratio_to_train_eager_unsteady")
        headline.append(
            {
                **{key: row[key] for key in ("batch_size", "backend", "dtype", "throughput")},
                "ratio_to_train_eager": None if withheld else row["ratio_to_train_eager"],
                "ratio_range": row.get("ratio_to_train_eager_range"),
                "withheld": withheld,
            }
        )
    return headline


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
        RunnerSpec(name, "eager", "fp32"): build_runner(
            model, RunnerSpec(name, "eager", "fp32"), device, None, image_shape
        )
        for name, model in models.items()
    }
    images = torch.randn(batch_size, *image_shape, generator=torch.Generator().manual_seed(0))
    samples, failed = _time_batch(runners, images, device, rounds=rounds, warmup=warmup)
    if failed:
        raise RuntimeError(f"cannot time {failed[0]['what']}: {failed[0]['reason']}")
    rows = [dict(model=spec.form, **_row(spec, batch_size, times)) for spec, times in samples.items()]
    baseline = next((times for spec, times in samples.items() if spec.form == PAPER_BASELINE), None)
    for row, times in zip(rows, samples.values(), strict=True):
        for key in ("form", "backend", "dtype"):
            row.pop(key)
        paired = paired_ratio(times, baseline) if baseline else None
        row["ratio_to_resnet18"] = paired.value if paired else None
        row["ratio_to_resnet18_unsteady"] = paired.unsteady_reason(row["model"], PAPER_BASELINE) if paired else None
    return rows


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
            log.warning("not timing %s at batch %d: %s", spec.key, images.shape[0], one_line(err))
            skipped.append({"what": f"{spec.key} batch {images.shape[0]}", "reason": one_line(err)})
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
        "spread": spread(times),  # p90 over the fastest call: how steady its times were
        "latency_rounds_ms": [round(1e3 * t, 4) for t in times],  # in round order: what the ratios pair
    }


def _add_ratios(rows: list[dict]) -> None:
    """Each row's throughput over the train form's (same backend and dtype; eager fp32), paired round by round."""
    by_key = {(row["form"], row["backend"], row["dtype"], row["batch_size"]): row for row in rows}
    for row in rows:
        train = _paired(row, by_key.get(("train", row["backend"], row["dtype"], row["batch_size"])))
        train_eager = _paired(row, by_key.get(("train", "eager", "fp32", row["batch_size"])))
        row["ratio_to_train"] = train.value if train else None
        row["ratio_to_train_eager"] = train_eager.value if train_eager else None
        row["ratio_to_train_eager_range"] = [train_eager.low, train_eager.high] if train_eager else None
        row["ratio_to_train_eager_unsteady"] = (
            train_eager.unsteady_reason(_name(row), "the train form eager fp32") if train_eager else None
        )


def _paired(row: dict, reference: dict | None) -> PairedRatio | None:
    """``row`` over ``reference``, timed in the same rounds (one ``time_interleaved`` call per batch size)."""
    if reference is None:
        return None
    return paired_ratio(row["latency_rounds_ms"], reference["latency_rounds_ms"])  # a ratio: the unit cancels


def _name(row: dict) -> str:
    return f"the {row['form']} form {row['backend']} {row['dtype']}"
