"""Training cost of RepVGG-A0 four ways: steps/s and peak memory, plain vs offline vs online blocks vs timm.

The candidates, all in train mode, all with the same SGD step (``benchmarks.train_throughput``):

* ``plain``: the deploy architecture (one 3x3 conv with a bias per block) trained directly;
* ``offline``: our multi-branch RepBlock (every branch its own Conv+BN);
* ``online``: our OnlineRepBlock (OREPA: scaled branches fused into one conv every step, one BN);
* ``timm``: timm's RepVGG-A0, the reference for the offline block.

Steps are timed interleaved in one process (``repblocks.bench.time_interleaved``). Peak memory is
measured on a separate step of each candidate, after its gradients were released: the most bytes
held at once during forward, backward and optimizer step, above what the model holds at rest
(weights, buffers, momentum). On CUDA that is ``torch.cuda.max_memory_allocated``; on the CPU,
the running total of PyTorch's CPU allocator as its profiler reports it (``profile_memory=True``).

    python -m benchmarks.train_cost --threads 2                    # minutes on 2 idle cores
    python -m benchmarks.train_cost --device cuda --markdown cost.md
    python -m benchmarks.train_cost --quick                        # smoke test, seconds
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

import repblocks
from benchmarks.common import (
    OtherLoad,
    parse_benchmark_args,
    ratio_and_target_lines,
    run_environment,
    speed_ratio,
    summarize_samples,
    write_results,
)
from benchmarks.train_throughput import NUM_CLASSES, random_batch, recipe_optimizer, training_step
from repblocks.bench import median, synchronizer, time_interleaved

MODEL = "repvgg_a0"
CANDIDATES = ("plain", "offline", "online", "timm")
# (numerator, denominator, what): the ratios the note reports, with the targets.
RATIOS = (
    ("online", "offline", "online / offline"),
    ("offline", "timm", "offline / timm"),
    ("plain", "offline", "plain / offline"),
)
TARGETS = {  # ratio name: (metric, bound, direction)
    "online / offline": [("steps_per_s", 1.5, ">="), ("peak_bytes", 0.5, "<=")],
    "offline / timm": [("steps_per_s", 1.0, ">=")],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table to PATH")
    defaults = dict(batch_size=32, image_size=224, rounds=5, warmup=1)
    return parse_benchmark_args(
        parser, argv, defaults=defaults, quick=dict(batch_size=2, image_size=32, rounds=2, warmup=1)
    )


def build_models(seed: int) -> dict[str, nn.Module]:
    """The four candidates, in train mode; ours start from timm's weights (plain and online: fresh)."""
    torch.manual_seed(seed)
    timm_model = timm.create_model(MODEL, pretrained=False, num_classes=NUM_CLASSES)
    offline = repblocks.load_weights(repblocks.create_model(MODEL, num_classes=NUM_CLASSES), timm_model.state_dict())
    return {
        "plain": repblocks.create_model(MODEL, num_classes=NUM_CLASSES, deploy=True).train(),
        "offline": offline.train(),
        "online": repblocks.create_model(MODEL, num_classes=NUM_CLASSES, block_mode="online").train(),
        "timm": timm_model.train(),
    }


def resting_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model holds between steps: parameters, buffers and the optimizer's state (momentum)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def peak_step_bytes(step: Callable[[], object], optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """The most bytes allocated at once during one call of ``step``, above what was allocated before it.

    The gradients of the previous step are released first (as the step's own ``zero_grad`` would),
    so that every step starts from the model at rest.
    """
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu and cuda only, got {device}")
    return _cpu_peak_bytes(step)


def _cpu_peak_bytes(step: Callable[[], object]) -> int:
    """Peak of the CPU allocator's running total during ``step``, read from the profiler's allocation events.

    The event tree is the profiler's experimental API; its ``total_allocated`` field is a running
    total of the blocks the profiler saw allocated and freed, in this process: it does not start
    at 0 in each profile, but where the last one left it (blocks allocated in an earlier profile
    and freed since, such as another model's gradients, are still in it). So the peak is taken
    above the total just before this step's first allocation.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    _, first_size, first_total = events[0]
    return max(total for _, _, total in events) - (first_total - first_size)


def summarize(samples: dict[str, list[float]], memory: dict[str, dict], batch_size: int) -> dict:
    """Per-candidate speed and memory, and the ratios the issue asks for, as plain data (what --json writes)."""
    models = summarize_samples(samples, batch_size)
    for name, stats in models.items():
        stats.update(steps_per_s=1.0 / median(samples[name]), **memory[name])
    ratios = {}
    for numerator, denominator, label in RATIOS:
        if numerator in models and denominator in models:
            ratio = speed_ratio(samples[numerator], samples[denominator])
            ratio["peak_bytes"] = models[numerator]["peak_bytes"] / models[denominator]["peak_bytes"]
            ratio["steps_per_s"] = ratio.pop("ratio")
            ratios[label] = ratio
    targets = []
    for label, checks in TARGETS.items():
        for metric, bound, direction in checks:
            if label in ratios:
                value = ratios[label][metric]
                met = value >= bound if direction == ">=" else value <= bound
                targets.append(dict(ratio=label, metric=metric, target=f"{direction} {bound}", value=value, met=met))
    return dict(models=models, ratios=ratios, targets=targets)


def markdown(summary: dict, title: str) -> str:
    lines = [
        title,
        "",
        "| model | steps/s | ms/step median | ms/step p90 | peak MiB above rest | MiB at rest |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, stats in summary["models"].items():
        lines.append(
            f"| {name} | {stats['steps_per_s']:.3f} | {stats['ms_median']:.0f} | {stats['ms_p90']:.0f} | "
            f"{stats['peak_bytes'] / 2**20:.0f} | {stats['resting_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines + ratio_and_target_lines(summary))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {name: model.to(device, memory_format=memory_format) for name, model in build_models(args.seed).items()}
    images, labels = random_batch(args, device, memory_format)
    steps, memory = {}, {}
    for name, model in models.items():
        optimizer = recipe_optimizer(model)
        steps[name] = training_step(model, images, labels, optimizer)
        steps[name]()  # momentum buffers exist from here on, and the allocator has seen a step
        peak = peak_step_bytes(steps[name], optimizer, device)
        memory[name] = dict(peak_bytes=peak, resting_bytes=resting_bytes(model, optimizer))

    with OtherLoad() as load:
        samples = time_interleaved(
            steps, rounds=args.rounds, warmup=args.warmup, sync=synchronizer(device), inference=False
        )
    summary = summarize(samples, memory, args.batch_size)
    layout = ", channels_last" if args.channels_last else ""
    title = (
        f"Training cost of {MODEL} on {args.device}{layout}, batch {args.batch_size} x "
        f"{args.image_size}x{args.image_size}, {torch.get_num_threads()} threads, median of {args.rounds} "
        "interleaved rounds"
    )
    table = markdown(summary, title)
    print(table)
    if load.warning():
        print(load.warning())
    config = {key: str(value) if key in ("json", "markdown") else value for key, value in vars(args).items()}
    config.update(run_environment())
    summary.update(config=config, other_processes_cores=load.cores)
    write_results(summary, table, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
