"""Training throughput of RepVGG-A0, ours vs timm's: forward + backward + SGD step, in train mode.

Both models start from the same weights (timm's, loaded into ours), see the same batch and
random labels, and train with the same SGD (momentum, weight decay by ``repblocks.optim.param_groups``).
Each candidate call is one whole training step; the two are timed interleaved in one process
(``repblocks.bench.time_interleaved``), so drift of the machine spreads evenly over both. The
first step's losses are checked to agree before anything is timed.

    python -m benchmarks.train_throughput --threads 2          # about 1 minute on 2 idle cores
    python -m benchmarks.train_throughput --channels-last --device cuda
    python -m benchmarks.train_throughput --quick              # smoke test, a few seconds
    python -m benchmarks.train_throughput --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

import repblocks
from benchmarks.common import OtherLoad, parse_benchmark_args, run_environment, speed_ratio, summarize_samples
from repblocks.bench import synchronizer, time_interleaved
from repblocks.files import atomic_path
from repblocks.train.optim import param_groups

REL_TOLERANCE = 1e-4  # of the first step's loss; fp32 reordering gives ~1e-6
NUM_CLASSES = 1000  # RepVGG-A0's ImageNet head: the classifier is part of the training cost


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    defaults = dict(batch_size=32, image_size=224, rounds=10, warmup=2)
    return parse_benchmark_args(
        parser, argv, defaults=defaults, quick=dict(batch_size=2, image_size=32, rounds=2, warmup=1)
    )


def build_models(seed: int) -> dict[str, nn.Module]:
    """Our RepVGG-A0 and timm's, with the same (timm-initialized) weights, in train mode."""
    torch.manual_seed(seed)
    timm_model = timm.create_model("repvgg_a0", pretrained=False, num_classes=NUM_CLASSES)
    ours = repblocks.load_weights(repblocks.create_model("repvgg_a0", num_classes=NUM_CLASSES), timm_model.state_dict())
    return {"ours": ours.train(), "timm": timm_model.train()}


def random_batch(args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format):
    """Seeded random images ``(B, 3, H, W)`` and labels of ``args``' batch and image size, on ``device``."""
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(NUM_CLASSES, (args.batch_size,), generator=generator)
    return images.to(device, memory_format=memory_format), labels.to(device)


def recipe_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The SGD every benchmarked training step uses: momentum, weight decay by ``param_groups``."""
    return torch.optim.SGD(param_groups(model, 1e-4), lr=1e-3, momentum=0.9)


def training_step(
    model: nn.Module, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer | None = None
) -> Callable[[], Tensor]:
    """One SGD step of ``model`` on the batch, as a zero-argument callable returning the loss.

    ``optimizer``: by default :func:`recipe_optimizer`'s; pass one to read its state afterwards.
    """
    optimizer = optimizer if optimizer is not None else recipe_optimizer(model)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def summarize(samples: dict[str, list[float]], batch_size: int) -> dict:
    """Per-model statistics and the ours/timm throughput ratio, as plain data (what ``--json`` writes)."""
    return dict(
        models=summarize_samples(samples, batch_size),
        ratio_ours_over_timm=speed_ratio(samples["ours"], samples["timm"]),
    )


def print_summary(console: Console, summary: dict, args: argparse.Namespace) -> None:
    layout = ", channels_last" if args.channels_last else ""
    title = (
        f"Training throughput on {args.device}{layout}, batch {args.batch_size} x {args.image_size}x{args.image_size}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    table = Table(title=title)
    for column in ("model", "img/s", "ms/step median", "ms/step p90"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, stats in summary["models"].items():
        table.add_row(name, f"{stats['images_per_s']:.1f}", f"{stats['ms_median']:.1f}", f"{stats['ms_p90']:.1f}")
    console.print(table)
    ratio = summary["ratio_ours_over_timm"]
    console.print(
        f"ours / timm throughput: {ratio['ratio']:.3f} (above 1: ours faster; median of per-round ratios); of the "
        f"medians {ratio['of_medians']:.3f}, per-round range {ratio['per_round_min']:.3f}-{ratio['per_round_max']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console()
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {name: model.to(device, memory_format=memory_format) for name, model in build_models(args.seed).items()}
    images, labels = random_batch(args, device, memory_format)
    steps = {name: training_step(model, images, labels) for name, model in models.items()}

    # The first step doubles as the check that both train the same network from the same weights.
    losses = {name: step().item() for name, step in steps.items()}
    rel_error = abs(losses["ours"] - losses["timm"]) / abs(losses["timm"])
    if not rel_error <= REL_TOLERANCE:
        raise SystemExit(f"train_throughput: first-step losses disagree: {losses} (rel {rel_error:.1e})")

    with OtherLoad() as load:
        sync = synchronizer(device)  # chosen from the device, so it holds with --warmup 0 too
        samples = time_interleaved(steps, rounds=args.rounds, warmup=args.warmup, sync=sync, inference=False)
    summary = summarize(samples, args.batch_size)
    print_summary(console, summary, args)
    summary.update(first_step_losses=losses, other_processes_cores=load.cores)
    if load.warning():
        console.print(f"[yellow]{load.warning()}")

    if args.json is not None:
        config = {key: value for key, value in vars(args).items() if key != "json"}
        config.update(run_environment())
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(dict(config=config, **summary), indent=2))
        console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
