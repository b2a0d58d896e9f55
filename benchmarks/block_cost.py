"""Training cost of one block, offline vs online, per branch set: steps/s and peak memory of a training step.

The issue's yardstick: a block on an 8x32x32x32 input (batch 8, 32 channels, 32x32), where an
offline DBB block costs about 5x a RepVGG block per step. The candidates, all in train mode:

* ``<set> offline``: :class:`~repblocks.blocks.RepBlock`, every branch its own Conv+BN, summed;
* ``<set> online``: :class:`~repblocks.online.OnlineRepBlock`, the scaled branches fused into one
  kernel every step, one conv, one BN (OREPA); ``orepa online`` has OREPA's own branch set, which
  has no offline form; ``kept``: with ``recompute = False``, the conv output kept for backward
  (faster, one map more) instead of recomputed there.

A step is what a block in the middle of a network does in one SGD step: forward on an input that
requires a gradient, a loss that keeps nothing beyond the block's output, backward down to the
input's gradient, and the optimizer step (SGD with momentum, ``benchmarks.train_throughput``'s).
Steps are timed interleaved in one process (:func:`repblocks.bench.time_interleaved`). Peak memory
is measured as ``benchmarks.train_cost`` does (:func:`benchmarks.train_cost.peak_step_bytes`): the
most bytes held at once during one step above what was held before it (the block at rest, its
momentum, the input and the loss's target), on a separate step of each candidate.

    python -m benchmarks.block_cost --threads 1                # a minute on 1 idle core
    python -m benchmarks.block_cost --device cuda --batch-size 64 --channels 64
    python -m benchmarks.block_cost --quick                    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import (
    OtherLoad,
    parse_benchmark_args,
    ratio_and_target_lines,
    run_environment,
    speed_ratio,
    write_results,
)
from benchmarks.train_cost import peak_step_bytes
from benchmarks.train_throughput import recipe_optimizer
from repblocks.bench import median, synchronizer, time_interleaved
from repblocks.blocks import RepBlock
from repblocks.online import OnlineRepBlock, resolve_online_branch_set

# name: (block class, branch set, attributes set on the block)
KEEP = {"recompute": False}  # the online block keeping its conv output for backward instead of recomputing it
CANDIDATES = {
    "repvgg offline": (RepBlock, "repvgg", {}),
    "repvgg online": (OnlineRepBlock, "repvgg", {}),
    "repvgg online kept": (OnlineRepBlock, "repvgg", KEEP),
    "acnet offline": (RepBlock, "acnet", {}),
    "acnet online": (OnlineRepBlock, "acnet", {}),
    "dbb offline": (RepBlock, "dbb", {}),
    "dbb online": (OnlineRepBlock, "dbb", {}),
    "dbb online kept": (OnlineRepBlock, "dbb", KEEP),
    "orepa online": (OnlineRepBlock, "orepa", {}),
}
# (numerator, denominator): the ratios the note reports.
RATIOS = (
    ("repvgg online", "repvgg offline"),
    ("repvgg online kept", "repvgg offline"),
    ("acnet online", "acnet offline"),
    ("dbb online", "dbb offline"),
    ("dbb online kept", "dbb offline"),
    ("dbb offline", "repvgg offline"),
    ("dbb online", "repvgg online"),
    ("orepa online", "repvgg online"),
)
# The targets: (ratio, metric, bound, direction).
TARGETS = (
    ("dbb online / dbb offline", "steps_per_s", 2.0, ">="),
    ("dbb online / dbb offline", "peak_bytes", 0.5, "<="),
    ("repvgg online / repvgg offline", "peak_bytes", 0.6, "<="),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--channels", type=int, default=32, help="input and output channels (default 32)")
    parser.add_argument("--channels-last", action="store_true", help="blocks and input in channels_last")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table to PATH")
    defaults = dict(batch_size=8, image_size=32, rounds=30, warmup=3)
    return parse_benchmark_args(
        parser, argv, defaults=defaults, quick=dict(batch_size=2, image_size=8, rounds=2, warmup=1)
    )


def block_step(block: nn.Module, x: Tensor, target: Tensor, optimizer: torch.optim.Optimizer):
    """One training step of ``block`` as a zero-argument callable: forward, a linear loss, backward to ``x``, SGD."""

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        loss = (block(x) * target).sum()  # keeps nothing for backward but the target, which exists already
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def measure(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Timing samples and peak bytes of every candidate."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=generator).to(device, memory_format=layout).requires_grad_()
    target = torch.randn(shape, generator=generator).to(device, memory_format=layout)
    steps, peaks = {}, {}
    for name, (block_class, branches, attributes) in CANDIDATES.items():
        torch.manual_seed(args.seed)
        block = block_class(args.channels, args.channels, **resolve_online_branch_set(branches))
        for attribute, value in attributes.items():
            setattr(block, attribute, value)
        block = block.to(device, memory_format=layout).train()
        optimizer = recipe_optimizer(block)
        # Its own input: a gradient left on a shared one by another candidate would be freed inside this one's step.
        steps[name] = block_step(block, x.detach().clone().requires_grad_(), target, optimizer)
        steps[name]()  # momentum buffers exist from here on, and the allocator has seen a step
        peaks[name] = peak_step_bytes(steps[name], optimizer, device)
    samples = time_interleaved(
        steps, rounds=args.rounds, warmup=args.warmup, sync=synchronizer(device), inference=False
    )
    return samples, peaks


def summarize(samples: dict[str, list[float]], peaks: dict[str, int]) -> dict:
    """Per-candidate ms/step, steps/s and peak bytes; the ratios and the targets, as plain data."""
    models = {
        name: dict(ms_median=1e3 * median(times), steps_per_s=1 / median(times), peak_bytes=peaks[name])
        for name, times in samples.items()
    }
    ratios = {}
    for numerator, denominator in RATIOS:
        ratio = speed_ratio(samples[numerator], samples[denominator])
        ratio["steps_per_s"] = ratio.pop("ratio")
        ratio["peak_bytes"] = peaks[numerator] / peaks[denominator]
        ratios[f"{numerator} / {denominator}"] = ratio
    targets = []
    for label, metric, bound, direction in TARGETS:
        value = ratios[label][metric]
        met = value >= bound if direction == ">=" else value <= bound
        targets.append(dict(ratio=label, metric=metric, target=f"{direction} {bound}", value=value, met=met))
    return dict(models=models, ratios=ratios, targets=targets)


def markdown(summary: dict, title: str) -> str:
    lines = [title, "", "| block | ms/step median | steps/s | peak KiB above rest |", "|---|---:|---:|---:|"]
    for name, stats in summary["models"].items():
        lines.append(
            f"| {name} | {stats['ms_median']:.2f} | {stats['steps_per_s']:.1f} | {stats['peak_bytes'] / 2**10:.0f} |"
        )
    return "\n".join(lines + ratio_and_target_lines(summary))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with OtherLoad() as load:
        samples, peaks = measure(args)
    summary = summarize(samples, peaks)
    layout = ", channels_last" if args.channels_last else ""
    title = (
        f"Training step of one block on {args.device}{layout}, input {args.batch_size}x{args.channels}x{args.image_size}x"
        f"{args.image_size}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    table = markdown(summary, title)
    print(table)
    if load.warning():
        print(load.warning())
    config = {key: str(value) if key in ("json", "markdown") else value for key, value in vars(args).items()}
    summary.update(config={**config, **run_environment()}, other_processes_cores=load.cores)
    write_results(summary, table, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
