"""A deploy run's report, for people and for programs: rich tables, ``report.json``, ``report.md``, a plot.

The run's outputs are built in a staging folder and moved to ``out_dir`` whole
(:mod:`repblocks.deploy.outputs`); the paths in the report are the final ones. ``config.json``
holds the run's settings as resolved, ``report.json`` is written last.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.table import Table

from repblocks.bench import SPREAD_LIMIT
from repblocks.deploy.config import BenchConfig, DeployConfig
from repblocks.deploy.convert import Conversion
from repblocks.deploy.engines import BACKENDS, by_backend
from repblocks.deploy.engines.base import Export
from repblocks.deploy.outputs import CONFIG_FILE
from repblocks.deploy.plot import write_throughput_plot
from repblocks.deploy.preprocessing import describe_sources
from repblocks.deploy.runtime import describe_device, environment
from repblocks.deploy.sources import Network
from repblocks.deploy.speed import Timing, fastest_deploy, timer_note
from repblocks.deploy.verify import Verification

if TYPE_CHECKING:
    from repblocks.deploy.quantize import Quantization
from repblocks.files import atomic_path
from repblocks.threads import ThreadChoice

__all__ = [
    "console_tables",
    "deploy_report",
    "headline",
    "load_summary",
    "load_warning",
    "markdown_report",
    "speed_console_table",
    "speed_report",
    "write_reports",
    "write_speed_table",
]

MALLOC_NOTE = (
    "On Linux CPUs, glibc's malloc hands large activation buffers back to the OS after every batch and "
    "page-faults them in again on the next; raising `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` in the "
    "environment (or preloading jemalloc or tcmalloc) avoids that: an earlier measurement took RepVGG-A0's deploy "
    "form from 151 to 112 ms per batch of 16."
)
UNSTEADY_NOTE = (
    "* a runner of this ratio had its p90 over {limit:g}x its fastest call: unsteady, not quoted in the headline"
)
_BENCH_COLUMNS = ("form", "backend", "dtype", "batch", "img/s", "ms/batch", "p90 ms", "vs train", "vs train eager")


def deploy_report(
    *,
    network: Network,
    conversion: Conversion,
    verification: Verification,
    exports: Mapping[str, Export],
    timing: Timing,
    device: torch.device,
    bench: BenchConfig,
    timed_shape: tuple[int, int, int],
    threads: ThreadChoice,
    quantization: Quantization | None = None,
    not_converted: Mapping[str, str] | None = None,
) -> dict:
    """The report of one deploy run, as plain data (what ``report.json`` holds).

    ``not_converted``: the formats whose converter could not take the network, each with its reason.
    """
    int8 = None if quantization is None else {**quantization.summary(), "speed": int8_speed(timing.rows)}
    return {
        "model": network.name,
        "origin": network.origin,
        "device": describe_device(device),
        "input_shape": list(network.input_shape),
        "image_shape": list(timed_shape),
        "num_classes": network.num_classes,
        "preprocessing": network.preprocessing,
        "conversion": conversion.note,
        "already_deployed": conversion.already_deployed,
        "conversion_s": conversion.seconds,
        "max_abs_err": verification.max_abs_err,
        "max_rel_err": verification.max_rel_err,
        "top1_agreement": verification.top1_agreement,
        "verify": verification.as_dict(),
        "exports": {name: export.as_dict() for name, export in exports.items()},
        "not_converted": dict(not_converted or {}),
        "benchmark": timing.rows,
        "fastest_deploy": fastest_deploy(timing.rows),
        "skipped": timing.skipped,
        "load": load_summary(timing, threads),
        "int8": int8,
        "timer": timer_note(bench),
        "environment": environment(device, tf32=bench.tf32),
    }


def load_summary(timing: Timing, threads: ThreadChoice) -> dict:
    """Other processes' load while timing, whether it skewed the figures, and the threads chosen for it."""
    return {
        "other_load_cores": timing.other_load,
        "skewed": timing.skewed,
        "threads": threads.threads,
        "threads_chosen": threads.note,
        "wait_policy": threads.wait_policy,
    }


def load_warning(report: dict) -> str | None:
    """One line saying the figures are skewed by other processes, or None."""
    load = report.get("load") or {}
    if not load.get("skewed"):
        return None
    return (
        f"warning: other processes kept {load['other_load_cores']:.2f} cores busy while timing: these figures, "
        "and the ratios between them, are skewed; time again on an idle machine"
    )


def int8_speed(rows: list[dict]) -> list[dict]:
    """Each int8 row, and each gated bf16/fp16 row, beside fp32 from the same interleaved timing: the same
    backend's, and the fastest fp32 engine's."""
    fp32 = {
        (row["backend"], row["batch_size"]): row for row in rows if row["form"] == "deploy" and row["dtype"] == "fp32"
    }
    speed = []
    for row in rows:
        if not _gated_dtype(row):
            continue
        same = fp32.get((row["backend"], row["batch_size"]))
        best = max(
            (r for (_, b), r in fp32.items() if b == row["batch_size"]), key=lambda r: r["throughput"], default=None
        )
        speed.append(
            {
                "backend": row["backend"],
                "dtype": row["dtype"],
                "batch_size": row["batch_size"],
                "throughput": row["throughput"],
                "fp32_throughput": same["throughput"] if same else None,
                "ratio_to_fp32": row["throughput"] / same["throughput"] if same else None,
                "best_fp32": f"{best['backend']}" if best else None,
                "ratio_to_best_fp32": row["throughput"] / best["throughput"] if best else None,
                "ratio_to_train_eager": row["ratio_to_train_eager"],
            }
        )
    return speed


def _gated_dtype(row: dict) -> bool:
    """Whether ``row`` times a model the int8 gate judged: int8, or a reduced float precision its engine gates
    (OpenVINO's bf16; not eager bf16, which bench.dtypes times ungated)."""
    if row["form"] != "deploy" or row["dtype"] == "fp32":
        return False
    return row["dtype"] == "int8" or (row["backend"] in BACKENDS and row["dtype"] in by_backend(row["backend"]).floats)


def speed_report(
    *, timing: Timing, device: torch.device, bench: BenchConfig, image_shape: tuple[int, ...], threads: ThreadChoice
) -> dict:
    """The report of a speed table run (``models=[...]``)."""
    return {
        "device": describe_device(device),
        "image_shape": list(image_shape),
        "dtype": "fp32",
        "backend": "eager",
        "rows": timing.rows,
        "load": load_summary(timing, threads),
        "timer": timer_note(bench),
        "environment": environment(device, tf32=bench.tf32),
    }


def write_reports(report: dict, into: str | Path, *, out_dir: str | Path, config: DeployConfig) -> dict[str, str]:
    """Write ``config.json``, ``throughput.png`` (when anything was timed), ``report.md`` and ``report.json``.

    Args:
        into: Where to write them (the staging folder).
        out_dir: Where they will be when the run is done: the paths in the report and the result.
        config: The run's settings, as resolved.
    """
    into, out_dir = Path(into), Path(out_dir)
    files = {"config": _write(into, out_dir, CONFIG_FILE, lambda tmp: tmp.write_text(_config_json(config)))}
    if report["benchmark"]:
        files["plot"] = _write(into, out_dir, "throughput.png", lambda tmp: write_throughput_plot(report, tmp))
    files["markdown"] = _write(into, out_dir, "report.md", lambda tmp: tmp.write_text(markdown_report(report)))
    files["json"] = str(out_dir / "report.json")
    _write(into, out_dir, "report.json", lambda tmp: tmp.write_text(json.dumps({**report, "files": files}, indent=2)))
    return files


def write_speed_table(report: dict, into: str | Path, *, out_dir: str | Path, config: DeployConfig) -> dict[str, str]:
    """Write ``config.json``, ``speed_table.md`` and ``speed_table.json`` (see :func:`write_reports`)."""
    into, out_dir = Path(into), Path(out_dir)
    files = {"config": _write(into, out_dir, CONFIG_FILE, lambda tmp: tmp.write_text(_config_json(config)))}
    files["markdown"] = _write(into, out_dir, "speed_table.md", lambda tmp: tmp.write_text(_speed_markdown(report)))
    files["json"] = str(out_dir / "speed_table.json")
    _write(
        into, out_dir, "speed_table.json", lambda tmp: tmp.write_text(json.dumps({**report, "files": files}, indent=2))
    )
    return files


def _config_json(config: DeployConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2) + "\n"


def _write(into: Path, out_dir: Path, name: str, writer) -> str:
    with atomic_path(into / name) as tmp:
        writer(tmp)
    return str(out_dir / name)


def console_tables(report: dict) -> list[Table]:
    """Rich tables of a deploy report: verification and exports, then the benchmark."""
    checks = Table(title=f"{report['model']} on {report['device']}: {report['conversion']}")
    for column in ("check", "max abs err", "max rel err", "detail"):
        checks.add_column(column, justify="left" if column in ("check", "detail") else "right")
    verification = report["verify"]
    checks.add_row("deploy vs train form", _err(report["max_abs_err"]), _err(report["max_rel_err"]), _compared(report))
    real = verification["real_images"]
    checks.add_row("validation images", "", "", real if isinstance(real, str) else _real_summary(real))
    for dtype, errors in verification.get("dtypes", {}).items():
        checks.add_row(f"{dtype} vs fp32 train", "", f"{errors['deploy_rel_err']:.2e}", _dtype_summary(errors))
    for fmt, info in report["exports"].items():
        abs_err, rel_err = info.get("max_abs_err"), info.get("max_rel_err")
        checks.add_row(
            f"export {fmt}",
            "" if abs_err is None else f"{abs_err:.2e}",
            "" if rel_err is None else f"{rel_err:.2e}",
            f"{Path(info['path']).name}: {info.get('check') or info.get('runtime')}",
        )
    for fmt, reason in (report.get("not_converted") or {}).items():
        checks.add_row(f"export {fmt}", "", "", f"not converted: {reason}")
    tables = [checks]
    if report.get("int8"):
        tables.append(_int8_table(report["int8"]))
    if report["benchmark"]:
        title = "Train vs deploy form (ratios: throughput over the train form's)"
        if report["already_deployed"]:
            title = "Deploy form (loaded in deploy form: no train form to time)"
        caption = "\n".join(filter(None, [_fastest(report), _unsteady_note(report), load_warning(report)]))
        bench = Table(title=title, caption=caption)
        for column in _BENCH_COLUMNS:
            bench.add_column(column, justify="left" if column in _BENCH_COLUMNS[:3] else "right")
        for row in report["benchmark"]:
            bench.add_row(*_bench_cells(row))
        tables.append(bench)
    return tables


def _int8_table(int8: dict) -> Table:
    evaluation = int8["evaluation"]
    table = Table(
        title=f"int8 on {evaluation['images']} validation images: fp32 top-1 {evaluation['fp32_top1']:.2f}%, "
        f"gate: at most {evaluation['max_drop']:g} points lost",
        caption="\n".join(_int8_measured_on(int8)),
    )
    for column in ("engine", "top-1", "drop", "agreement", "gate", "method"):
        table.add_column(column, justify="left" if column in ("engine", "gate", "method") else "right")
    for engine, result in int8["engines"].items():
        table.add_row(*_int8_cells(engine, result))
    for item in int8["skipped"]:
        table.add_row(item["what"], "", "", "", "skipped", item["reason"])
    return table


def _int8_cells(engine: str, result: dict) -> list[str]:
    return [
        engine,
        f"{result['top1']:.2f}%",
        f"{result['drop']:+.2f}",
        f"{result['top1_agreement']:.1%}",
        "passed" if result["passed"] else "failed",
        result["method"],
    ]


def _int8_measured_on(int8: dict) -> list[str]:
    """What the gate measured on and what calibrated, and the near-chance warning: lines for the table and report.md."""
    evaluation = int8["evaluation"]
    mapping = f"; classes: {evaluation['class_mapping']}" if evaluation.get("class_mapping") else ""
    lines = [
        f"gated on {evaluation['images']} images of {evaluation.get('source', 'the validation set')}{mapping}",
        f"prepared as: {evaluation['preprocessing']}" if evaluation.get("preprocessing") else "",
        f"calibrated on {int8['calibration']['images']} images: {int8['calibration']['source']}",
        f"WARNING: {evaluation['near_chance']}" if evaluation.get("near_chance") else "",
    ]
    return [line for line in lines if line]


def _int8_markdown(int8: dict) -> list[str]:
    evaluation = int8["evaluation"]
    lines = [
        "",
        "## int8",
        "",
        f"fp32 top-1 {evaluation['fp32_top1']:.2f}%; an engine's int8 model is exported only if it loses at most "
        f"{evaluation['max_drop']:g} points.",
        "",
        *[f"- {line}" for line in _int8_measured_on(int8)],
        "",
        "| engine | top-1 | drop (points) | top-1 agreement with fp32 | gate | method |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(_int8_cells(engine, r)) + " |" for engine, r in int8["engines"].items()]
    lines += [f"| {item['what']} | | | | skipped | {item['reason']} |" for item in int8["skipped"]]
    for engine, result in int8["engines"].items():
        if result["fp32_layers"]:
            lines += ["", f"{engine}: kept in fp32 by accuracy control: {', '.join(result['fp32_layers'])}."]
        if result["worst_layers"]:
            worst = ", ".join(f"`{w['layer']}` {w['sqnr_db']:.1f} dB" for w in result["worst_layers"])
            lines += [
                "",
                f"{engine}: worst layers by quantization error (SQNR of the int8 model's output against fp32, "
                f"lower is worse): {worst}.",
            ]
    if int8["speed"]:
        lines += [
            "",
            "| backend | batch | int8 img/s | fp32 img/s, same backend | int8 vs fp32 | int8 vs fastest fp32 engine | vs train eager fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in int8["speed"]:
            fp32 = "" if row["fp32_throughput"] is None else f"{row['fp32_throughput']:.1f}"
            same = "" if row["ratio_to_fp32"] is None else f"{row['ratio_to_fp32']:.2f}x"
            best = "" if row["ratio_to_best_fp32"] is None else f"{row['ratio_to_best_fp32']:.2f}x ({row['best_fp32']})"
            train = "" if row["ratio_to_train_eager"] is None else f"{row['ratio_to_train_eager']:.2f}x"
            dtype = row.get("dtype", "int8")
            backend = row["backend"] if dtype == "int8" else f"{row['backend']} {dtype}"  # OpenVINO's bf16, fp16
            lines.append(
                f"| {backend} | {row['batch_size']} | {row['throughput']:.1f} | {fp32} | {same} | {best} | {train} |"
            )
    return lines


def _err(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def _compared(report: dict) -> str:
    verification = report["verify"]
    if report["max_abs_err"] is None:
        return verification["reason"]
    shapes = ", ".join("x".join(map(str, shape)) for shape in verification["image_shapes"])
    return f"top-1 agreement {report['top1_agreement']:.0%} on {verification['random_images']} random images ({shapes})"


def _preprocessing(report: dict) -> str:
    pre = report["preprocessing"]
    return (
        f"input {'x'.join(map(str, pre['input_size']))}, mean {pre['mean']}, std {pre['std']}, crop_pct "
        f"{pre['crop_pct']}, {pre['interpolation']} ({describe_sources(pre)})"
    )


def _fastest(report: dict) -> str:
    return "Fastest deploy form: " + "; ".join(_fastest_part(best) for best in report["fastest_deploy"])


def _fastest_part(best: dict) -> str:
    """``batch 16: openvino fp32, 2.49x the train form eager fp32 (rounds 2.41x-2.55x)``, or why the ratio is withheld."""
    part = f"batch {best['batch_size']}: {best['backend']} {best['dtype']}"
    rounds = best.get("ratio_range")
    spread = f"rounds {rounds[0]:.2f}x-{rounds[1]:.2f}x" if rounds else None
    if best.get("withheld"):
        return f"{part}, its ratio to the train form eager fp32 withheld: {best['withheld']}; {spread}"
    if best["ratio_to_train_eager"] is None:
        return part
    return f"{part}, {best['ratio_to_train_eager']:.2f}x the train form eager fp32" + (f" ({spread})" if spread else "")


def _unsteady_note(report: dict) -> str | None:
    """What * means, when a ratio of the report was unsteady; else None."""
    rows = report.get("benchmark") or report.get("rows") or []
    if any(row.get("ratio_to_train_eager_unsteady") or row.get("ratio_to_resnet18_unsteady") for row in rows):
        return UNSTEADY_NOTE.format(limit=SPREAD_LIMIT)
    return None


def _validation_images(real: dict) -> str:
    """``360 validation images``, or with a cap ``256 of the 360 validation images (verify.real_batches=4)``.

    Training's words for the same set (``over the 360 validation images``), so the counts read alike.
    """
    total = real.get("validation_images")
    if total is None or total == real["images"]:
        return f"{real['images']} validation images"
    return f"{real['images']} of the {total} validation images (verify.real_batches={real.get('real_batches')})"


def _real_summary(real: dict) -> str:
    return (
        f"{_validation_images(real)}: top-1 agreement {real['top1_agreement']:.1%}, accuracy train "
        f"{real['train_accuracy']:.1%} / deploy {real['deploy_accuracy']:.1%}; "
        f"{real['max_abs_err']:.1e} abs, {real['max_rel_err']:.1e} rel"
    )


def headline(report: dict) -> str:
    """The run in one line: model, how well the forms agree, the fastest engine's speed-up, where the files are.

    ``repvgg_a0: deploy form agrees with the train form on 100.0% of 360 validation images (max error 5.2e-06 there);
    fastest: onnxruntime fp32 at batch 16, 2.49x the train form eager fp32; files in outputs/deploy/RUN``
    """
    verification, real = report["verify"], report["verify"]["real_images"]
    if report["max_abs_err"] is None:
        agreement = f"deploy form {verification['reason']}"
    elif isinstance(real, dict):
        agreement = (
            f"deploy form agrees with the train form on {real['top1_agreement']:.1%} of "
            f"{_validation_images(real)} (max error {real['max_abs_err']:.1e} there)"
        )
    else:
        agreement = (
            f"deploy form agrees with the train form on {report['top1_agreement']:.1%} of "
            f"{verification['random_images']} random images (max error {report['max_abs_err']:.1e})"
        )
    speed = "not timed"
    if report.get("fastest_deploy"):
        best = report["fastest_deploy"][-1]  # the largest batch: where the forms differ most
        speed = f"fastest: {best['backend']} {best['dtype']} at batch {best['batch_size']}"
        if best.get("withheld"):
            speed += " (its speed-up withheld: unsteady timings)"
        elif best.get("ratio_to_train_eager") is not None:
            speed += f", {best['ratio_to_train_eager']:.2f}x the train form eager fp32"
    files = report.get("files") or {}
    where = f"; files in {Path(files['json']).parent}" if files.get("json") else ""
    missing = report.get("not_converted") or {}
    missing = f"; not converted: {', '.join(missing)} (why: report.md)" if missing else ""
    return f"{report['model']}: {agreement}; {speed}{missing}{where}"


def _dtype_summary(errors: dict) -> str:
    return f"deploy form; the train form in the same dtype: {errors['train_rel_err']:.2e}"


def _bench_cells(row: dict) -> list[str]:
    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    unsteady = "*" if row.get("ratio_to_train_eager_unsteady") else ""  # see UNSTEADY_NOTE
    return [
        row["form"],
        row["backend"],
        row["dtype"],
        str(row["batch_size"]),
        f"{row['throughput']:.1f}",
        f"{row['latency_ms']:.2f}",
        f"{row['latency_p90_ms']:.2f}",
        ratio(row["ratio_to_train"]),
        ratio(row["ratio_to_train_eager"]) + unsteady,
    ]


def markdown_report(report: dict) -> str:
    """The report as Markdown: summary, checks, exports, benchmark, what was skipped and how it was timed."""
    verification = report["verify"]
    real = verification["real_images"]
    lines = [
        f"# Deploy report: {report['model']}",
        "",
        headline(report),
        "",
        f"- weights: {report['origin']}",
        f"- preprocessing: {_preprocessing(report)}",
        f"- device: {report['device']}; exports take {' x '.join(map(str, report['input_shape']))}, "
        f"timed at {' x '.join(map(str, report['image_shape']))}",
        f"- conversion: {report['conversion']}",
    ]
    if report["max_abs_err"] is None:
        lines.append(f"- deploy vs train form: {verification['reason']}")
    else:
        lines.append(
            f"- deploy vs train form: max error {report['max_abs_err']:.2e} abs, {report['max_rel_err']:.2e} "
            f"relative (tolerance atol {verification['atol']:g} or rtol {verification['rtol']:g}); " + _compared(report)
        )
    lines.append(f"- validation images: {real if isinstance(real, str) else _real_summary(real)}")
    for dtype, errors in verification.get("dtypes", {}).items():
        lines.append(
            f"- {dtype}: deploy form {errors['deploy_rel_err']:.2e} relative to fp32, {_dtype_summary(errors)}"
        )
    if report["exports"]:
        lines += ["", "## Exports", "", "| format | file | check |", "|---|---|---|"]
        for fmt, info in report["exports"].items():
            check = info.get("check") or (
                f"{info['runtime']} at batch {info['checked_batch_sizes']}: "
                f"{info['max_abs_err']:.1e} abs, {info['max_rel_err']:.1e} rel"
            )
            lines.append(f"| {fmt} | `{Path(info['path']).name}` | {check} |")
    if report.get("not_converted"):
        lines += [
            "",
            "## Not converted",
            "",
            "Each converter's own reason; the other formats were written and checked.",
            "",
        ]
        lines += [f"- {fmt}: {reason}" for fmt, reason in report["not_converted"].items()]
    if report.get("int8"):
        lines += _int8_markdown(report["int8"])
    if report["benchmark"]:
        lines += ["", "## Benchmark", "", "| " + " | ".join(_BENCH_COLUMNS) + " |", "|---|---|---|" + "---:|" * 6]
        lines += ["| " + " | ".join(_bench_cells(row)) + " |" for row in report["benchmark"]]
        lines += ["", _fastest(report) + "."] + (["", _unsteady_note(report)] if _unsteady_note(report) else [])
        lines += ["", f"Timer: {report['timer']}; {report['load']['threads_chosen']}."]
        lines += ["", f"**{load_warning(report)}**"] if load_warning(report) else []
        lines += ["", MALLOC_NOTE]
    if report["skipped"]:
        lines += ["", "## Not timed", ""] + [f"- {item['what']}: {item['reason']}" for item in report["skipped"]]
    environment = ", ".join(f"{key} {value}" for key, value in report["environment"].items())
    return "\n".join([*lines, "", f"Environment: {environment}.", ""])


def speed_console_table(report: dict) -> Table:
    """The speed table as a rich table."""
    table = Table(
        title=_speed_title(report), caption="\n".join(filter(None, [_unsteady_note(report), load_warning(report)]))
    )
    for column in ("model", "batch", "img/s", "ms/batch", "vs resnet18"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in report["rows"]:
        table.add_row(*_speed_cells(row))
    return table


def _speed_title(report: dict) -> str:
    return (
        f"Deploy-form speed, {report['backend']} {report['dtype']}, input {report['image_shape']}, {report['device']}"
    )


def _speed_cells(row: dict) -> list[str]:
    ratio = row["ratio_to_resnet18"]
    unsteady = "*" if row.get("ratio_to_resnet18_unsteady") else ""
    return [
        row["model"],
        str(row["batch_size"]),
        f"{row['throughput']:.1f}",
        f"{row['latency_ms']:.1f}",
        "" if ratio is None else f"{ratio:.2f}x{unsteady}",
    ]


def _speed_markdown(report: dict) -> str:
    lines = [
        f"# {_speed_title(report)}",
        "",
        "Zoo models (RepVGG, QARepVGG, MobileOne) in deploy form; torchvision models as built and with Conv+BN folded (`folded`).",
        "The paper (GTX 1080Ti, batch 128, fp32) has RepVGG-A0 at 1.33x ResNet-18.",
        "",
        "| model | batch | img/s | ms/batch | vs resnet18 |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(_speed_cells(row)) + " |" for row in report["rows"]]
    lines += ["", _unsteady_note(report)] if _unsteady_note(report) else []
    lines += ["", f"**{load_warning(report)}**"] if load_warning(report) else []
    return "\n".join([*lines, "", f"Timer: {report['timer']}.", ""])
