"""``throughput.png``: a deploy run's timings as bars a person reads at a glance.

One panel per batch size, side by side. Each row is one backend and dtype, fastest deploy form on
top; its train form (hollow) sits under its deploy form (filled), so the gain of converting is the
gap between two bars of one colour. Each deploy bar carries its images/s and its speedup over the
train form on the same backend and dtype (int8, which has no train form, its speedup over the train
form eager fp32). Runners that were skipped have no row. The x axis turns logarithmic when one panel
spans more than :data:`LOG_SCALE_RANGE` (eager next to an engine), so that no bar is squashed to 0.

A backend has one colour in every run (:data:`BACKEND_COLORS`, by name, not by the order the backends
come in), so that two plots are compared at a glance. The title gives the input the exported model
takes (``1x3x32x32``), and the PNG's ``Title`` text chunk holds the title.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

__all__ = ["BACKEND_COLORS", "LOG_SCALE_RANGE", "backend_color", "throughput_figure", "write_throughput_plot"]

LOG_SCALE_RANGE = 20.0  # fastest over slowest bar in a panel above which its axis is logarithmic
_BAR = 0.38  # height of one bar; a row holds two
# One colour per backend of the engines' registry, fixed: a backend keeps its colour whichever others ran.
# Variants of one engine share a hue (OpenVINO's latency and throughput hints, onnxruntime and its TensorRT EP).
BACKEND_COLORS = {
    "eager": "tab:gray",
    "channels_last": "tab:brown",
    "compile": "tab:pink",
    "onnxruntime": "tab:blue",
    "onnxruntime_trt": "#9ecae9",  # light blue
    "openvino": "tab:purple",
    "openvino_throughput": "#c5b0d5",  # light purple
    "tensorrt": "tab:green",
    "executorch": "tab:orange",
    "litert": "tab:red",
    "aoti": "tab:olive",
}
# A backend the table does not list yet: a colour chosen by its name alone (a checksum), so still fixed.
_OTHER_COLORS = ("tab:cyan", "#ffbb78", "#98df8a", "#ff9896", "#c49c94", "#f7b6d2", "#dbdb8d", "#17becf")


def write_throughput_plot(report: dict, path: str | Path) -> None:
    """Render :func:`throughput_figure` of a deploy report as a PNG at ``path`` (any suffix: the format is set)."""
    figure = throughput_figure(report)
    figure.savefig(path, format="png", dpi=110, metadata={"Title": figure.get_suptitle()})


def backend_color(backend: str) -> str:
    """The colour of ``backend``'s bars: :data:`BACKEND_COLORS`, else one its name alone picks."""
    if backend in BACKEND_COLORS:
        return BACKEND_COLORS[backend]
    return _OTHER_COLORS[zlib.crc32(backend.encode()) % len(_OTHER_COLORS)]  # crc32: the same in every process


def throughput_figure(report: dict) -> Figure:
    """The figure of ``report["benchmark"]`` (rows of form, backend, dtype, batch_size, throughput, ratios)."""
    rows = [row for row in report["benchmark"] if _finite(row.get("throughput"))]
    batch_sizes = sorted({row["batch_size"] for row in rows}) or [None]
    labels = _row_labels(rows)
    height = 1.3 + 0.42 * max(len(labels), 1)
    # A bare Figure, not pyplot: no global backend or window state, and it renders PNG on any server.
    figure = Figure(figsize=(2.4 + 4.8 * len(batch_sizes), height), layout="constrained")
    panels = figure.subplots(1, len(batch_sizes), sharey=True, squeeze=False)[0]
    colors = {backend: backend_color(backend) for backend, _ in labels}
    # One scale for every panel, so that the panels read alike.
    log = any(_spread([row for row in rows if row["batch_size"] == size]) > LOG_SCALE_RANGE for size in batch_sizes)
    for axes, batch_size in zip(panels, batch_sizes, strict=True):
        _panel(axes, [row for row in rows if row["batch_size"] == batch_size], labels, colors, batch_size, log=log)
    if labels:
        panels[0].set_yticks(range(len(labels)), [f"{backend} {dtype}" for backend, dtype in labels])
        panels[0].set_ylim(len(labels) - 0.5, -0.5)  # the first row on top
    figure.suptitle(_title(report), fontsize="medium")
    figure.legend(
        handles=[
            Patch(
                facecolor="0.35",
                edgecolor="0.35",
                label="deploy form: images/s and speedup over the train form (same backend and dtype)",
            ),
            Patch(facecolor="white", edgecolor="0.35", hatch="///", label="train form"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize="small",
        frameon=False,
    )
    return figure


def _panel(
    axes, rows: list[dict], labels: list[tuple[str, str]], colors: dict, batch_size: int | None, *, log: bool
) -> None:
    axes.set_title("nothing timed" if batch_size is None else f"batch {batch_size}", fontsize="medium")
    axes.set_xlabel("images / s (log scale)" if log else "images / s")
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    if not rows:
        return
    speeds = [row["throughput"] for row in rows]
    for row in rows:
        index = labels.index((row["backend"], row["dtype"]))
        deploy = row["form"] != "train"
        # The deploy bar above the train bar; a row with one form centres its bar.
        paired = any(
            other["backend"] == row["backend"] and other["dtype"] == row["dtype"] and other["form"] != row["form"]
            for other in rows
        )
        y = index + ((-_BAR / 2 if deploy else _BAR / 2) if paired else 0)
        color = colors[row["backend"]]
        axes.barh(
            y,
            row["throughput"],
            height=_BAR * 0.92,
            color=color if deploy else "white",
            edgecolor=color,
            hatch=None if deploy else "///",
            linewidth=1.0,
        )
        axes.annotate(
            _bar_text(row),
            (row["throughput"], y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize="x-small",
            fontweight="bold" if deploy else "normal",
            color="0.1" if deploy else "0.4",
        )
    if log:
        axes.set_xscale("log")
        axes.set_xlim(min(speeds) / 2, max(speeds) * 8)  # room on the right for the text
    else:
        axes.set_xlim(0, max(speeds) * 1.45)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _short(value)))


def _bar_text(row: dict) -> str:
    text = _count(row["throughput"])
    if row["form"] == "train":
        return text
    if row.get("ratio_to_train") is not None:
        return f"{text}  {row['ratio_to_train']:.2f}x"
    if row.get("ratio_to_train_eager") is not None:
        return f"{text}  {row['ratio_to_train_eager']:.2f}x train eager"
    return text


def _row_labels(rows: list[dict]) -> list[tuple[str, str]]:
    """(backend, dtype) of each row, fastest deploy form first (at the largest batch size, where forms differ most)."""
    best: dict[tuple[str, str], tuple[int, float]] = {}
    for row in rows:
        key = (row["backend"], row["dtype"])
        rank = (row["batch_size"], row["throughput"] if row["form"] != "train" else 0.0)
        best[key] = max(best.get(key, rank), rank)
    return sorted(best, key=lambda key: (-best[key][0], -best[key][1]))


def _title(report: dict) -> str:
    """Model, the input its exports take (one image: ``1xCxHxW``), where timed at another size, and the device."""
    taken = report.get("input_shape") or report.get("image_shape") or []
    timed = report.get("image_shape") or taken
    shape = "x".join(map(str, [1, *taken]))
    at = "" if list(timed) == list(taken) else f" (timed at {'x'.join(map(str, [1, *timed]))})"
    lines = [
        f"{report.get('model', 'model')}: train form vs deploy form, model input {shape}{at}, {report.get('device', '')}"
    ]
    if (report.get("load") or {}).get("skewed"):
        cores = report["load"]["other_load_cores"]
        lines.append(f"other processes kept {cores:.2f} cores busy while timing: the figures are skewed")
    return "\n".join(lines)


def _spread(rows: list[dict]) -> float:
    speeds = [row["throughput"] for row in rows]
    return max(speeds) / min(speeds) if speeds else 1.0


def _short(value: float) -> str:
    """An axis tick: 500, 2k, 1.5M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _count(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
