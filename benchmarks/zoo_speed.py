"""The zoo's cost and speed table: parameters, MACs and deploy-form CPU throughput next to ResNet-18, in one run.

Every model is built with random weights and randomized BN statistics, converted with
``repblocks.switch_to_deploy`` (checked against its train form first), and timed in deploy form,
interleaved with all the others in one process (``repblocks.bench.time_interleaved``), once per
batch size. torchvision's ResNet-18, its Conv+BN pairs folded (what a fair deployment runs), is
timed in the same rounds; the ratio column is each model's throughput over ResNet-18's.

    python -m benchmarks.zoo_speed                                 # A0-B3, QARepVGG A0-B3, MobileOne S0-S4
    python -m benchmarks.zoo_speed --models 'mobileone_*' repvgg_a0 --batch-sizes 1 16
    python -m benchmarks.zoo_speed --quick                         # smoke test, a few seconds
    python -m benchmarks.zoo_speed --json zoo.json --markdown zoo.md
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

import repblocks
from benchmarks.common import OtherLoad, parse_benchmark_args, speed_ratio, summarize_samples
from repblocks.bench import time_interleaved
from repblocks.files import atomic_path
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.profile import count_macs, count_params

BASELINE = "resnet18"
DEFAULT_MODELS = [
    *[f"repvgg_{v}" for v in ("a0", "a1", "a2", "b0", "b1", "b2", "b3")],
    *[f"qarepvgg_{v}" for v in ("a0", "a1", "a2", "b0", "b1", "b2", "b3")],
    *[f"mobileone_s{i}" for i in range(5)],
]
QUICK_MODELS = ["repvgg_tiny", "qarepvgg_tiny", "mobileone_tiny"]
REL_TOLERANCE = 1e-4  # deploy vs train form, relative to the largest logit; fp32 reordering gives ~1e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", help="registered names or shell patterns")
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="N", help="default 1 16 (--quick: 2)")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table to PATH")
    defaults = dict(batch_size=16, image_size=224, rounds=5, warmup=1)
    args = parse_benchmark_args(
        parser, argv, defaults=defaults, quick=dict(batch_size=2, image_size=64, rounds=2, warmup=1)
    )
    args.batch_sizes = args.batch_sizes or ([args.batch_size] if args.quick else [1, 16])
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be positive")
    args.models = resolve_models(args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS), parser)
    return args


def resolve_models(patterns: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Registered names matching ``patterns``, in the order given; an unmatched pattern is an error."""
    names = []
    for pattern in patterns:
        matched = fnmatch.filter(repblocks.list_models(), pattern)
        if not matched:
            parser.error(f"no registered model matches {pattern!r}; registered: {', '.join(repblocks.list_models())}")
        names += [name for name in matched if name not in names]
    return names


def build_deploy_forms(names: list[str], image_size: int, seed: int) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """Each model's deploy form (checked against its train form) and its cost, plus folded ResNet-18."""
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    models, costs = {}, {}
    for name in names:
        train = randomize_bn_(repblocks.create_model(name), seed=seed).eval()
        deploy = repblocks.switch_to_deploy(train)
        with torch.inference_mode():
            rel_err = max_errors(train(images), deploy(images))[1]
        if not rel_err <= REL_TOLERANCE:
            raise SystemExit(f"zoo_speed: {name}'s deploy form differs from its train form: rel {rel_err:.1e}")
        models[name] = deploy
        costs[name] = dict(
            train_params=count_params(train),
            deploy_params=count_params(deploy),
            deploy_macs=count_macs(deploy, (1, 3, image_size, image_size)),
            rel_err=rel_err,
        )
    resnet = repblocks.switch_to_deploy(randomize_bn_(torchvision.models.resnet18(weights=None), seed=seed))
    models[BASELINE] = resnet
    costs[BASELINE] = dict(
        train_params=count_params(resnet),
        deploy_params=count_params(resnet),
        deploy_macs=count_macs(resnet, (1, 3, image_size, image_size)),
        rel_err=0.0,
    )
    return models, costs


def time_models(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[int, dict]:
    """Per batch size: every model's throughput and its ratio to ResNet-18, from the same interleaved rounds."""
    results = {}
    for batch_size in args.batch_sizes:
        images = torch.randn(batch_size, 3, args.image_size, args.image_size)  # (B, 3, H, W)
        candidates = {name: (lambda model=model, images=images: model(images)) for name, model in models.items()}
        with OtherLoad() as load:  # other processes on the cores skew every timing
            samples = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup)
        results[batch_size] = dict(
            models=summarize_samples(samples, batch_size),
            ratios={name: speed_ratio(samples[name], samples[BASELINE]) for name in models},
            other_processes_cores=load.cores,
            warning=load.warning(),
        )
    return results


def markdown_table(costs: dict[str, dict], timings: dict[int, dict], image_size: int) -> str:
    """One row per model: parameters, GMACs, and per batch size img/s and the ratio to ResNet-18."""
    header = ["model", "params, train (M)", "params, deploy (M)", f"GMACs ({image_size}x{image_size})"]
    for batch_size in timings:
        header += [f"img/s, batch {batch_size}", f"x ResNet-18, batch {batch_size}"]
    rows = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, cost in costs.items():
        cells = [name, f"{cost['train_params'] / 1e6:.2f}", f"{cost['deploy_params'] / 1e6:.2f}"]
        cells.append(f"{cost['deploy_macs'] / 1e9:.2f}")
        for timing in timings.values():
            cells += [f"{timing['models'][name]['images_per_s']:.1f}", f"{timing['ratios'][name]['ratio']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models, costs = build_deploy_forms(args.models, args.image_size, args.seed)
    timings = time_models(models, args)
    table = markdown_table(costs, timings, args.image_size)
    print(
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, fp32 eager, "
        f"deploy forms, median of {args.rounds} interleaved rounds per batch size\n"
    )
    print(table)
    for batch_size, timing in timings.items():
        if timing["warning"]:
            print(f"batch {batch_size}: {timing['warning']}")
    if args.markdown is not None:
        write_atomically(args.markdown, table + "\n")
    if args.json is not None:
        config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        config.update(threads=torch.get_num_threads(), torch=torch.__version__, repblocks=repblocks.__version__)
        write_atomically(args.json, json.dumps(dict(config=config, costs=costs, timings=timings), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
