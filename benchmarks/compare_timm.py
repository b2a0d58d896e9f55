"""CPU throughput of RepVGG-A0, ours vs timm's, in train and deploy form, and of ResNet-18 Conv+BN folding.

Six models, timed interleaved in one process (``repblocks.bench.time_interleaved``), so drift of
the machine spreads evenly over all of them:

* our ``repvgg_a0`` in train form (eval mode) and its ``repblocks.switch_to_deploy`` form;
* timm's ``repvgg_a0`` and its ``timm.utils.model.reparameterize_model`` form, with the same
  weights as ours (random BN statistics on timm's model, loaded into ours);
* torchvision's ``resnet18`` (random BN statistics) before and after Conv+BN folding by
  ``repblocks.switch_to_deploy``.

Outputs are checked to agree before anything is timed; the run stops with one line if they do not.

    python -m benchmarks.compare_timm                # about 1.5 minutes on 2 idle cores
    python -m benchmarks.compare_timm --quick        # smoke test, a few seconds
    python -m benchmarks.compare_timm --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
import torchvision
from rich.console import Console
from rich.table import Table
from timm.utils.model import reparameterize_model
from torch import nn

import repblocks
from benchmarks.common import OtherLoad, parse_benchmark_args, run_environment, speed_ratio, summarize_samples
from repblocks.bench import time_interleaved
from repblocks.files import atomic_path
from repblocks.numerics import max_errors, randomize_bn_

REL_TOLERANCE = 1e-4  # max error relative to the largest reference logit; fp32 reordering gives ~1e-6

# (reference, other): pairs of models whose outputs must agree.
CHECKS = [
    ("timm train", "ours train"),
    ("ours train", "ours deploy"),
    ("timm train", "timm deploy"),
    ("timm deploy", "ours deploy"),
    ("resnet18 unfolded", "resnet18 folded"),
]
# (label, candidate, baseline): throughput of the candidate over the baseline's; above 1 is faster.
RATIOS = [
    ("ours deploy / ours train", "ours deploy", "ours train"),
    ("timm deploy / timm train", "timm deploy", "timm train"),
    ("ours deploy / timm deploy", "ours deploy", "timm deploy"),
    ("ours train / timm train", "ours train", "timm train"),
    ("resnet18 folded / unfolded", "resnet18 folded", "resnet18 unfolded"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 60 rounds: whole cycles of time_interleaved's balanced order of six candidates.
    defaults = dict(batch_size=16, image_size=224, rounds=60, warmup=2)
    return parse_benchmark_args(
        parser, argv, defaults=defaults, quick=dict(batch_size=2, image_size=64, rounds=2, warmup=1)
    )


def build_models(seed: int) -> dict[str, nn.Module]:
    """The six models, in eval mode; our RepVGG-A0 carries timm's (BN-randomized) weights."""
    timm_train = randomize_bn_(timm.create_model("repvgg_a0"), seed=seed).eval()
    ours_train = repblocks.load_weights(repblocks.create_model("repvgg_a0"), timm_train.state_dict()).eval()
    resnet = randomize_bn_(torchvision.models.resnet18(weights=None), seed=seed).eval()
    return {
        "ours train": ours_train,
        "ours deploy": repblocks.switch_to_deploy(ours_train),
        "timm train": timm_train,
        "timm deploy": reparameterize_model(timm_train).eval(),
        "resnet18 unfolded": resnet,
        "resnet18 folded": repblocks.switch_to_deploy(resnet),
    }


@torch.inference_mode()
def output_errors(models: dict[str, nn.Module], images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Max absolute and relative error of each pair in ``CHECKS``, keyed ``"other vs reference"``."""
    outputs = {name: model(images) for name, model in models.items()}
    return {f"{other} vs {reference}": max_errors(outputs[reference], outputs[other]) for reference, other in CHECKS}


def summarize(samples: dict[str, list[float]], batch_size: int) -> dict:
    """Per-model statistics and the ratios of ``RATIOS``, as plain data (what ``--json`` writes)."""
    ratios = {label: speed_ratio(samples[candidate], samples[baseline]) for label, candidate, baseline in RATIOS}
    return dict(models=summarize_samples(samples, batch_size), ratios=ratios)


def print_errors(console: Console, errors: dict[str, tuple[float, float]]) -> None:
    table = Table(title="Outputs agree? (max error; relative to the largest reference logit)")
    for column in ("pair", "abs", "rel"):
        table.add_column(column, justify="left" if column == "pair" else "right")
    for pair, (abs_err, rel_err) in errors.items():
        table.add_row(pair, f"{abs_err:.2e}", f"{rel_err:.2e}")
    console.print(table)


def print_timings(console: Console, summary: dict, args: argparse.Namespace) -> None:
    title = (
        f"CPU throughput, batch {args.batch_size} x {args.image_size}x{args.image_size}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    table = Table(title=title)
    for column in ("model", "img/s", "ms/batch median", "ms/batch p90"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, stats in summary["models"].items():
        table.add_row(name, f"{stats['images_per_s']:.1f}", f"{stats['ms_median']:.1f}", f"{stats['ms_p90']:.1f}")
    console.print(table)

    table = Table(title="Throughput ratios (above 1: the first is faster)")
    for column in ("ratio", "median of rounds", "of medians", "round min-max"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for label, ratio in summary["ratios"].items():
        spread = f"{ratio['per_round_min']:.3f}-{ratio['per_round_max']:.3f}"
        table.add_row(label, f"{ratio['ratio']:.3f}", f"{ratio['of_medians']:.3f}", spread)
    console.print(table)


def write_json(path: Path, results: dict) -> None:
    """Write ``results`` to ``path`` atomically: a failure never leaves half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console()
    models = build_models(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)  # (B, 3, H, W)

    errors = output_errors(models, images)
    print_errors(console, errors)
    disagree = [f"{pair}: rel {rel:.1e}" for pair, (_, rel) in errors.items() if not rel <= REL_TOLERANCE]
    if disagree:
        raise SystemExit(f"compare_timm: outputs disagree beyond rel {REL_TOLERANCE:g}: {'; '.join(disagree)}")

    candidates = {name: (lambda model=model: model(images)) for name, model in models.items()}
    with OtherLoad() as load:  # other processes on the cores skew every timing
        samples = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup)
    summary = summarize(samples, args.batch_size)
    print_timings(console, summary, args)
    if load.cores is not None:
        summary["other_processes_cores"] = load.cores
    if load.warning():
        console.print(f"[yellow]{load.warning()}")

    if args.json is not None:
        config = {key: value for key, value in vars(args).items() if key != "json"}
        config.update(run_environment(torchvision=torchvision.__version__))
        errors_json = {pair: dict(abs=abs_err, rel=rel_err) for pair, (abs_err, rel_err) in errors.items()}
        write_json(args.json, dict(config=config, errors=errors_json, **summary))
        console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
