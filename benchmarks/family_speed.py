"""The re-parameterization families side by side on the CPU: train form vs deploy form, eager and OpenVINO, fp32 and int8.

MobileOne-S0, FastViT-T8, RepViT-M0.9, RepGhost-1.0x and RepVGG-A0 (random weights, randomized BN
statistics) at 224x224, batch 1 and batch 16, timed in one interleaved run per batch size
(:func:`repblocks.bench.time_interleaved`): the train form and the deploy form (checked against it)
eager and through OpenVINO and onnxruntime in fp32 (deploy.py's default engines and runners,
:func:`repblocks.deploy.runners.build_runner`),
and the deploy form in int8 (NNCF into OpenVINO, deploy.py's ``quantize=int8``) where the int8 gate
passes: deploy's :class:`~repblocks.deploy.quantize.Gate`, on random validation images labelled by the
fp32 deploy form itself (random weights have no other labels: the gate is then int8's top-1 agreement with
fp32, at most ``--max-drop`` points lost). A name not registered is skipped, saying so.

The published latencies (iPhone 12, Core ML: MobileOne-S0 0.79 ms, FastViT-T8 0.8 ms, RepViT-M0.9 0.9 ms) are
another device's; the last line compares their order with ours at batch 1.

    python -m benchmarks.family_speed                           # the five at 224x224, batch 1 and 16
    python -m benchmarks.family_speed --json family.json --markdown family.md
    python -m benchmarks.family_speed --quick                   # tiny models, 32x32: a smoke test

Needs the ``[openvino]`` extra.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import repblocks
from benchmarks.common import OtherLoad, parse_benchmark_args, speed_ratio, summarize_samples, write_results
from repblocks.bench import time_interleaved
from repblocks.deploy.engines import engine, openvino
from repblocks.deploy.quantize import Gate
from repblocks.deploy.runners import RunnerSpec, build_runner
from repblocks.numerics import max_errors, randomize_bn_

DEFAULT_MODELS = ["mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_100", "repvgg_a0"]
QUICK_MODELS = ["mobileone_tiny", "fastvit_tiny", "repvit_tiny", "repghostnet_tiny", "repvgg_tiny"]
# Published iPhone 12 latencies (ms): MobileOne (Vasu et al. 2023, Table 9), FastViT (Vasu et al. 2023, Table 1),
# RepViT (Wang et al. 2024, Table 1). RepGhost and RepVGG-A0 publish none on that device.
IPHONE12_MS = {"mobileone_s0": 0.79, "fastvit_t8": 0.8, "repvit_m0_9": 0.9}
# The engines deploy.py times by default beside eager: the fastest of them is "the fastest engine we ship".
ENGINES = ("openvino", "onnxruntime")
FP32 = [(form, backend) for backend in ("eager", *ENGINES) for form in ("train", "deploy")]
REL_TOLERANCE = 1e-4  # deploy vs train form, relative to the largest logit; fp32 reordering gives ~1e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", help="registered names (default: the five)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="N", help="default 1 16 (--quick: 1 2)")
    parser.add_argument("--calibration-images", type=int, help="random images NNCF calibrates on (default 64)")
    parser.add_argument("--validation-images", type=int, help="random images the int8 gate judges (default 128)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="top-1 points int8 may lose (deploy's default)")
    parser.add_argument("--no-int8", action="store_true", help="time fp32 only")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table to PATH")
    defaults = dict(batch_size=16, image_size=224, rounds=10, warmup=2)
    args = parse_benchmark_args(
        parser, argv, defaults=defaults, quick=dict(batch_size=2, image_size=32, rounds=2, warmup=1)
    )
    args.batch_sizes = args.batch_sizes or ([1, args.batch_size] if args.quick else [1, 16])
    args.calibration_images = args.calibration_images or (8 if args.quick else 64)
    args.validation_images = args.validation_images or (16 if args.quick else 128)
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be positive")
    if openvino.missing():
        parser.error(openvino.missing())
    args.models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    return args


def registered(names: list[str]) -> tuple[list[str], list[str]]:
    """The names registered here, and one line for each that is not (another branch may add it)."""
    known = set(repblocks.list_models())
    return [n for n in names if n in known], [f"{n}: not registered here, skipped" for n in names if n not in known]


def build_runners(name: str, args: argparse.Namespace, workdir: Path) -> tuple[dict, dict]:
    """``{label: runner}`` of one model's candidates, and what the int8 gate said (None without int8)."""
    shape = (3, args.image_size, args.image_size)
    train = randomize_bn_(repblocks.create_model(name), seed=args.seed).eval()
    deploy = repblocks.switch_to_deploy(train)
    probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        rel_err = max_errors(train(probe), deploy(probe))[1]
    if not rel_err <= REL_TOLERANCE:
        raise SystemExit(f"family_speed: {name}'s deploy form differs from its train form: rel {rel_err:.1e}")
    forms = {"train": train, "deploy": deploy}
    (workdir / name).mkdir()
    runners = {}
    for form, backend in FP32:
        spec = RunnerSpec(form, backend, "fp32")
        runners[f"{form} {backend} fp32"] = build_runner(forms[form], spec, torch.device("cpu"), workdir / name, shape)
    gate = None
    if not args.no_int8:
        gate, int8 = _gated_int8(deploy, args, shape)
        if int8 is not None:
            runners["deploy openvino int8"] = openvino.runner(int8, mode="latency")
    return runners, gate


def _gated_int8(deploy: torch.nn.Module, args: argparse.Namespace, shape: tuple) -> tuple[dict, object | None]:
    """NNCF's int8 of the deploy form judged by deploy's gate; the OpenVINO model where it passes, else None."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    calibration = torch.randn(args.calibration_images, *shape, generator=generator)
    images = torch.randn(args.validation_images, *shape, generator=generator)
    with torch.inference_mode():
        labels = deploy(images).argmax(1)  # random weights: fp32's own top-1 is the only label there is
    batches = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, len(images), 16)]
    gate = Gate.of(torch.inference_mode()(deploy), batches, args.max_drop)
    judged = gate.judge("openvino", engine("openvino").int8(deploy, calibration, metadata={}))
    said = dict(passed=judged.passed, top1=judged.top1, drop=judged.drop, max_drop=args.max_drop)
    return said, judged.model if judged.passed else None


def time_all(runners: dict[str, dict], args: argparse.Namespace) -> dict[int, dict]:
    """Per batch size, one interleaved run of every model's every candidate: medians and ratios to each train eager."""
    results = {}
    for batch_size in args.batch_sizes:
        images = torch.randn(batch_size, 3, args.image_size, args.image_size)  # (B, 3, H, W)
        candidates = {
            (name, label): runner.timed(images) for name, own in runners.items() for label, runner in own.items()
        }
        keys = list(candidates)
        with OtherLoad() as load:  # other processes on the cores skew every timing
            samples = time_interleaved(
                {str(i): candidates[k] for i, k in enumerate(keys)}, rounds=args.rounds, warmup=args.warmup
            )
        by_key = {key: samples[str(i)] for i, key in enumerate(keys)}
        summary = summarize_samples({f"{n} | {label}": t for (n, label), t in by_key.items()}, batch_size)
        results[batch_size] = dict(
            models={
                name: {
                    label: dict(
                        ms_median=summary[f"{name} | {label}"]["ms_median"],
                        vs_train_eager=speed_ratio(by_key[(name, label)], by_key[(name, "train eager fp32")])["ratio"],
                    )
                    for label in own
                }
                for name, own in runners.items()
            },
            other_processes_cores=load.cores,
            warning=load.warning(),
        )
    return results


def markdown(timings: dict[int, dict], gates: dict[str, dict | None], labels: list[str]) -> str:
    """One row per model and batch size: median ms of each candidate and its speed over the train form eager."""
    header = ["model", "batch"] + [f"{label} ms (x train eager)" for label in labels]
    rows = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for batch_size, timing in timings.items():
        for name, own in timing["models"].items():
            cells = [name, str(batch_size)]
            for label in labels:
                if label in own:
                    cells.append(f"{own[label]['ms_median']:.2f} ({own[label]['vs_train_eager']:.2f}x)")
                else:
                    gate = gates.get(name)
                    cells.append(f"gate failed: drop {gate['drop']:.1f} pts" if gate else "-")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fastest_engine(timed: dict[str, dict]) -> str:
    """The label of the fastest deploy-form fp32 engine (not eager) of one model's timings."""
    engines = [f"deploy {engine} fp32" for engine in ENGINES if f"deploy {engine} fp32" in timed]
    return min(engines, key=lambda label: timed[label]["ms_median"])


def ordering_line(timings: dict[int, dict]) -> str:
    """Our batch-1 order of the models with a published iPhone 12 latency, beside the published order."""
    batch = min(timings)
    models = timings[batch]["models"]
    ours = {n: models[n][fastest_engine(models[n])]["ms_median"] for n in models if n in IPHONE12_MS}
    if len(ours) < 2:
        return "iPhone 12 order: fewer than two of MobileOne-S0, FastViT-T8, RepViT-M0.9 timed here; nothing to compare"
    published = sorted(ours, key=IPHONE12_MS.get)
    measured = sorted(ours, key=ours.get)
    same = "the same order" if published == measured else "another order"
    return (
        f"iPhone 12 (published, ms): {', '.join(f'{n} {IPHONE12_MS[n]}' for n in published)}; this CPU, batch {batch}, "
        f"deploy form, each model's fastest fp32 engine (ms): {', '.join(f'{n} {ours[n]:.2f}' for n in measured)}: {same}"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names, skipped = registered(args.models)
    for line in skipped:
        print(line)
    if not names:
        raise SystemExit("family_speed: none of the models is registered here")
    with tempfile.TemporaryDirectory(prefix="repblocks-family-speed-") as tmp:
        runners, gates = {}, {}
        for name in names:
            runners[name], gates[name] = build_runners(name, args, Path(tmp))
        timings = time_all(runners, args)
    labels = [f"{form} {backend} fp32" for form, backend in FP32] + ([] if args.no_int8 else ["deploy openvino int8"])
    table = markdown(timings, gates, labels)
    line = ordering_line(timings)
    print(
        f"CPU, {torch.get_num_threads()} threads, {args.image_size}x{args.image_size}, median of {args.rounds} rounds\n"
    )
    print(table)
    print(f"\n{line}")
    for batch_size, timing in timings.items():
        if timing["warning"]:
            print(f"batch {batch_size}: {timing['warning']}", file=sys.stderr)
    results = dict(models=names, skipped=skipped, gates=gates, timings=timings, iphone12_ms=IPHONE12_MS, ordering=line)
    write_results(results, f"{table}\n\n{line}", json_path=args.json, markdown_path=args.markdown)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
