"""What the benchmark programs share: their command-line options, other processes' load, and statistics.

The timing itself is :func:`repblocks.bench.time_interleaved` and the other processes' load
:class:`repblocks.bench.OtherLoad` (the library's, which deploy.py uses too); this module holds what
only the programs in ``benchmarks/`` need.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import repblocks
from repblocks.bench import OtherLoad, median, p90, paired_ratio, throughput
from repblocks.files import atomic_path

__all__ = [
    "OtherLoad",
    "parse_benchmark_args",
    "ratio_and_target_lines",
    "speed_ratio",
    "summarize_samples",
    "write_results",
]


def summarize_samples(samples: Mapping[str, Sequence[float]], batch_size: int) -> dict[str, dict]:
    """Per-candidate images/s, median and p90 milliseconds, and the raw samples, as plain data."""
    return {
        name: dict(
            images_per_s=throughput(batch_size, median(times)),
            ms_median=1e3 * median(times),
            ms_p90=1e3 * p90(times),
            samples_s=list(times),
        )
        for name, times in samples.items()
    }


def speed_ratio(candidate: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """Throughput of ``candidate`` over ``baseline`` (above 1: the candidate is faster), from paired samples.

    ``ratio`` is the one speed ratio of this project, the one deploy's report quotes
    (:func:`repblocks.bench.paired_ratio`): the median of the per-round ratios, each round's two calls
    having run back to back in :func:`time_interleaved`. ``of_medians`` is what a table of medians
    implies; the per-round range shows how much of the ratio is noise.
    """
    paired = paired_ratio(candidate, baseline)
    per_round = [base / cand for cand, base in zip(candidate, baseline, strict=True)]
    return dict(
        ratio=paired.value,
        of_medians=paired.of_medians,
        per_round_min=min(per_round),
        per_round_max=max(per_round),
    )


def ratio_and_target_lines(summary: Mapping) -> list[str]:
    """The markdown table of a cost summary's paired ratios, then one line per target with whether it was met."""
    lines = ["", "| ratio | steps/s | per-round range | peak memory |", "|---|---:|---:|---:|"]
    for label, ratio in summary["ratios"].items():
        lines.append(
            f"| {label} | {ratio['steps_per_s']:.2f}x | {ratio['per_round_min']:.2f}-{ratio['per_round_max']:.2f} | "
            f"{ratio['peak_bytes']:.2f}x |"
        )
    return (
        lines
        + [""]
        + [
            f"- target {t['ratio']} {t['metric']} {t['target']}: {t['value']:.2f} ({'met' if t['met'] else 'NOT met'})"
            for t in summary["targets"]
        ]
    )


def parse_benchmark_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    defaults: Mapping[str, int],
    quick: Mapping[str, int],
) -> argparse.Namespace:
    """Add the options every benchmark program shares, parse ``argv``, and fill and check the sizes.

    The shared options are ``--batch-size``, ``--image-size``, ``--rounds``, ``--warmup`` (their
    values come from ``defaults``, or from ``quick`` with ``--quick``), ``--threads``, ``--seed``,
    ``--quick`` and ``--json``. The program adds its own options to ``parser`` first.
    """

    def sizes(name: str) -> str:
        return f"(default {defaults[name]}; --quick: {quick[name]})"

    parser.add_argument("--batch-size", type=int, help=f"images per batch {sizes('batch_size')}")
    parser.add_argument("--image-size", type=int, help=f"input height and width {sizes('image_size')}")
    parser.add_argument("--rounds", type=int, help=f"timed calls per candidate, interleaved {sizes('rounds')}")
    parser.add_argument("--warmup", type=int, help=f"untimed calls per candidate first {sizes('warmup')}")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, BN statistics and inputs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH")
    args = parser.parse_args(argv)
    for name, value in (quick if args.quick else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.batch_size, args.image_size, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batch-size, --image-size and --rounds must be positive, --warmup non-negative")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    return args


def write_results(results: object, markdown: str, *, json_path: Path | None, markdown_path: Path | None) -> None:
    """Write ``results`` as JSON to ``json_path`` and ``markdown`` to ``markdown_path``, each when given, atomically."""
    for path, text in ((json_path, json.dumps(results, indent=2)), (markdown_path, markdown + "\n")):
        if path:
            with atomic_path(path) as tmp:
                tmp.write_text(text)


def run_environment(**extra: str) -> dict:
    """What a result was measured with: torch's threads, the versions of torch, timm and repblocks, the processor."""
    import timm  # the training benchmarks compare with it; the int8 ones do not need it
    import torch

    return dict(
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        timm=timm.__version__,
        **extra,
        repblocks=repblocks.__version__,
        processor=platform.processor() or platform.machine(),
    )
