"""Do training-time branches help where accuracy is not saturated? Plain vs RepVGG vs ACNet vs DBB vs online, 3 seeds.

On the full digits set every model reaches 99-100%, so nothing can be told apart there. This
program makes it harder: a small stratified fraction of the digits training images (10% by default,
about 14 per class), under strong random affine augmentation, and validation on all 360 held-out
images. Each variant is ``repvgg_tiny`` with another training form; all of them deploy to the same
plain network:

* ``plain``: that network trained as one would without re-parameterization: each 3x3 conv followed
  by a BatchNorm (folded away for deployment). Without the BatchNorm it does not train at all under
  this recipe (10% top-1, chance);
* ``repvgg``: kxk Conv+BN, 1x1 Conv+BN, identity BN (the offline RepBlock);
* ``acnet``, ``dbb``: the ACNet and DBB branch sets, where this version has them (else reported
  as unavailable, never substituted);
* ``online``: the RepVGG branches in OREPA's online form (``block_mode="online"``).

Training reuses ``repblocks.train``: the LightningModule (:class:`RepClassifier`), the data module,
and the optimizer and schedule of ``configs/optimizer/sgd.yaml`` and ``configs/scheduler/cosine.yaml``
(learning rate scaled linearly to the batch, as that config says). No EMA. The top-1 reported is
that of the deploy form after the last epoch.

    python -m benchmarks.branch_accuracy                           # 5 variants x 3 seeds, minutes
    python -m benchmarks.branch_accuracy --variants repvgg online --seeds 0 1 2 --markdown acc.md
    python -m benchmarks.branch_accuracy --quick                   # smoke test
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import repblocks
from benchmarks.common import write_results
from repblocks.blocks import ConvBN, RepBlock
from repblocks.datasets import DigitsData, InMemoryBatches, RandomAffineBatch
from repblocks.models.repvgg import REPVGG_CONFIGS, RepVGG
from repblocks.run_checkpoint import run_record
from repblocks.train.data import ClassificationDataModule
from repblocks.train.module import RepClassifier

MODEL = "repvgg_tiny"
VARIANTS = ("plain", "repvgg", "acnet", "dbb", "online")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE_BATCH = 64  # the batch configs/optimizer/sgd.yaml's learning rate is for
# Strong augmentation: about 3x the digits recipe's rotation and shift, and a wider zoom.
STRONG_AUGMENT = dict(degrees=30.0, translate=0.2, scale=(0.75, 1.25), fill=-1.0)


class Unavailable(Exception):
    """A variant this version of repblocks cannot build."""


@dataclass
class RunResult:
    """One training run of one variant."""

    variant: str
    seed: int
    top1: float  # deploy form, last epoch, % of the validation images
    train_form_top1: float  # the same weights before fusion
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME", help=", ".join(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="model seeds (default 0 1 2)")
    parser.add_argument("--train-fraction", type=float, default=0.1, help="of the 1,437 training images")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true", help="2 epochs, one seed: a smoke test")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table to PATH")
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; known variants: {', '.join(VARIANTS)}")
    if not 0 < args.train_fraction <= 1 or args.epochs < 1 or args.batch_size < 2:
        parser.error("--train-fraction must be in (0, 1], --epochs >= 1, --batch-size >= 2")
    if args.quick:
        args.epochs, args.seeds = 2, args.seeds[:1]
    return args


def build_variant(variant: str, num_classes: int) -> nn.Module:
    """The network of a variant, in train form.

    Raises:
        Unavailable: The variant's branch set is not in this version of repblocks.
    """
    if variant == "plain":
        return _plain_conv_bn(num_classes)
    if variant == "online":
        return repblocks.create_model(MODEL, num_classes=num_classes, block_mode="online")
    if variant == "repvgg":
        return repblocks.create_model(MODEL, num_classes=num_classes)
    try:  # ACNet, DBB: the same network with another branch set in every block
        return RepVGG(replace(REPVGG_CONFIGS[MODEL], block=variant), num_classes=num_classes)
    except (KeyError, ValueError) as err:
        raise Unavailable(f"no {variant!r} branch set in this version ({err})") from None


def _plain_conv_bn(num_classes: int) -> nn.Module:
    """The deploy architecture with a BatchNorm after every conv: each block's ``reparam`` a bias-free Conv+BN."""
    model = repblocks.create_model(MODEL, num_classes=num_classes, deploy=True)
    for block in model.modules():
        if isinstance(block, RepBlock):
            conv = block.reparam
            size, stride = conv.kernel_size[0], conv.stride[0]
            block.reparam = ConvBN(conv.in_channels, conv.out_channels, size, stride=stride, groups=conv.groups)
    return model


def few_digits(train_fraction: float, batch_size: int) -> DigitsData:
    """The digits set with a stratified fraction of its training images, strongly augmented; all validation images.

    The subset is fixed (seed 0), so every variant and seed trains on the same images.
    """
    data = DigitsData(augment=False, batch_size=batch_size)
    data.setup()
    images, labels = data.train_set.images, data.train_set.labels
    generator = torch.Generator().manual_seed(0)
    keep = []
    for digit in labels.unique():
        members = (labels == digit).nonzero().flatten()
        count = max(1, round(train_fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    keep = torch.cat(keep)
    data.train_set = InMemoryBatches(images[keep], labels[keep], RandomAffineBatch(**STRONG_AUGMENT))
    return data


def recipe(batch_size: int) -> tuple:
    """The optimizer and schedule factories of the train configs, the learning rate scaled to ``batch_size``."""
    optimizer = OmegaConf.load(CONFIGS / "optimizer" / "sgd.yaml")
    optimizer.lr = optimizer.lr * batch_size / RECIPE_BATCH
    return instantiate(optimizer), instantiate(OmegaConf.load(CONFIGS / "scheduler" / "cosine.yaml"))


@torch.no_grad()
def top1(model: nn.Module, data: DigitsData) -> float:
    model.eval()
    correct = total = 0
    for images, labels in data.val_dataloader():
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def train_once(variant: str, seed: int, args: argparse.Namespace) -> RunResult:
    L.seed_everything(seed, workers=True, verbose=False)
    data = few_digits(args.train_fraction, args.batch_size)
    model = build_variant(variant, data.num_classes)
    optimizer, scheduler = recipe(args.batch_size)
    record = run_record(model, model_name=MODEL, model_kwargs={}, in_chans=data.in_chans, image_size=data.image_size)
    module = RepClassifier(model, record=record, optimizer=optimizer, scheduler=scheduler)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # validated once, below, on the deploy form
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=ClassificationDataModule(data))
    seconds = time.perf_counter() - started
    train_form = top1(model, data)
    return RunResult(variant, seed, top1(repblocks.switch_to_deploy(model), data), train_form, seconds)


def summarize(runs: list[RunResult], unavailable: dict[str, str], variants: list[str]) -> list[dict]:
    rows = []
    for variant in variants:
        if variant in unavailable:
            rows.append(dict(variant=variant, available=False, reason=unavailable[variant]))
            continue
        scores = [run.top1 for run in runs if run.variant == variant]
        rows.append(
            dict(
                variant=variant,
                available=True,
                mean=statistics.mean(scores),
                std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
                min=min(scores),
                max=max(scores),
                per_seed=scores,
                seconds_per_run=statistics.mean(run.seconds for run in runs if run.variant == variant),
            )
        )
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, train_images: int) -> str:
    lines = [
        f"{MODEL} on {train_images} digits training images ({args.train_fraction:.0%}, strong augmentation), "
        f"{args.epochs} epochs, top-1 of the deploy form on 360 validation images, seeds {args.seeds}",
        "",
        "| variant | mean top-1 | std | min-max | per seed | s/run |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        if not row["available"]:
            lines.append(f"| {row['variant']} | unavailable | | | {row['reason']} | |")
            continue
        per_seed = ", ".join(f"{score:.1f}" for score in row["per_seed"])
        lines.append(
            f"| {row['variant']} | {row['mean']:.2f}% | {row['std']:.2f} | {row['min']:.1f}-{row['max']:.1f} | "
            f"{per_seed} | {row['seconds_per_run']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    unavailable = {}
    for variant in args.variants:
        try:
            build_variant(variant, 10)
        except Unavailable as err:
            unavailable[variant] = str(err)
    runs = []
    for seed in args.seeds:  # seed-major: a run cut short still has every variant of the first seeds
        for variant in args.variants:
            if variant not in unavailable:
                runs.append(train_once(variant, seed, args))
                print(f"{variant} seed {seed}: top-1 {runs[-1].top1:.2f}% ({runs[-1].seconds:.0f} s)", flush=True)
    rows = summarize(runs, unavailable, args.variants)
    train_images = len(few_digits(args.train_fraction, args.batch_size).train_set)
    table = markdown(rows, args, train_images)
    print(table)
    results = dict(
        config={key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        train_images=train_images,
        augmentation=STRONG_AUGMENT,
        variants=rows,
        runs=[asdict(run) for run in runs],
    )
    write_results(results, table, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
