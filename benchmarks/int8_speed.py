"""int8 vs fp32 on the CPU engines, in one interleaved run, with the machine's measured GEMM rates beside them.

RepVGG-A0 (random weights, randomized BN statistics) at 224x224, batch 16, through every engine
deploy.py uses: the train form eager (the reference), the deploy form eager, onnxruntime and
OpenVINO in fp32, and the int8 models of ``quantize=int8`` (NNCF into OpenVINO, onnxruntime's static
QDQ), quantizing the deploy form and, for comparison, the train form before fusion. In the same
rounds it times a stack of large fp32 and int8 matrix multiplies through OpenVINO: the machine's
GEMM rates, against which each engine's achieved GOP/s (2 x MACs x images / s) is put. A stack,
not one multiply: a lone int8 GEMM also converts its float input and output on every call, and
that memory traffic, not the multiply, would set its rate.

    python -m benchmarks.int8_speed                      # A0, 224x224, batch 16 (a few minutes on 2 cores)
    python -m benchmarks.int8_speed --model qarepvgg_a0 --json int8.json --markdown int8.md
    python -m benchmarks.int8_speed --quick              # smoke test

Needs the ``[openvino]`` extra.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import repblocks
from benchmarks.common import OtherLoad, parse_benchmark_args, speed_ratio, summarize_samples, write_results
from repblocks.bench import median, time_interleaved
from repblocks.deploy.engines import openvino
from repblocks.deploy.engines.onnxruntime import onnx_session, quantize_qdq, session_runner
from repblocks.deploy.runners import RunnerSpec, build_runner
from repblocks.int8 import nncf_int8
from repblocks.numerics import randomize_bn_
from repblocks.profile import count_macs

REFERENCE = "train eager fp32"
GEMM_SIZE = 2048  # M = N = K: 17 GOP per multiply
GEMM_LAYERS = 4  # multiplies in the stack, a ReLU between them (fused into the int8 multiplies' output)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="repvgg_a0", help="a registered model (default repvgg_a0)")
    parser.add_argument(
        "--calibration-images", type=int, default=64, help="random images NNCF and onnxruntime calibrate on"
    )
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table to PATH")
    defaults = dict(batch_size=16, image_size=224, rounds=10, warmup=2)
    args = parse_benchmark_args(
        parser, argv, defaults=defaults, quick=dict(batch_size=2, image_size=32, rounds=2, warmup=1)
    )
    if args.quick:
        args.model, args.calibration_images = "repvgg_tiny", 8
    if args.model not in repblocks.list_models():
        parser.error(f"unknown model {args.model!r}; registered: {', '.join(repblocks.list_models())}")
    if openvino.missing():
        parser.error(openvino.missing())
    return args


def build_candidates(args: argparse.Namespace, workdir: Path) -> tuple[dict, int]:
    """``{name: runner}`` of every candidate, and the model's MACs per image at the timed size."""
    shape = (3, args.image_size, args.image_size)
    train = randomize_bn_(repblocks.create_model(args.model), seed=args.seed).eval()
    deploy = repblocks.switch_to_deploy(train)
    calibration = torch.randn(args.calibration_images, *shape, generator=torch.Generator().manual_seed(args.seed))
    runners = {}
    for form, model in (("train", train), ("deploy", deploy)):
        for backend in ("eager", "onnxruntime", "openvino", "openvino_throughput"):
            if form == "train" and backend != "eager":
                continue
            runners[f"{form} {backend} fp32"] = build_runner(
                model, RunnerSpec(form, backend, "fp32"), torch.device("cpu"), workdir, shape
            )
        quantized = nncf_int8(model, calibration)
        runners[f"{form} openvino int8"] = openvino.runner(quantized, mode="latency")
        if form == "deploy":
            runners[f"{form} openvino_throughput int8"] = openvino.runner(quantized, mode="throughput")
        folder = workdir / form
        folder.mkdir()
        _, qdq = quantize_qdq(model, calibration, folder)
        runners[f"{form} onnxruntime int8"] = session_runner(onnx_session(qdq))
    return runners, count_macs(deploy, (1, *shape))


def gemm_candidates() -> dict:
    """``GEMM_LAYERS`` ``GEMM_SIZE``-cubed matrix multiplies through OpenVINO in fp32, and NNCF-quantized to int8."""
    layers = [m for _ in range(GEMM_LAYERS) for m in (nn.Linear(GEMM_SIZE, GEMM_SIZE, bias=False), nn.ReLU())]
    linear = nn.Sequential(*layers).eval()
    example = torch.randn(GEMM_SIZE, GEMM_SIZE)
    import nncf

    fp32 = openvino.to_openvino(linear, example)
    int8 = nncf.quantize(fp32, nncf.Dataset([example.numpy()]), subset_size=1)
    return {
        "gemm fp32": openvino.runner(fp32, mode="latency"),
        "gemm int8": openvino.runner(int8, mode="latency"),
    }, example


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="repblocks-int8-speed-") as tmp:
        runners, macs = build_candidates(args, Path(tmp))
        gemm_runners, matrix = gemm_candidates()
        images = torch.randn(
            args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(args.seed)
        )
        candidates = {name: runner.timed(images) for name, runner in runners.items()}
        candidates |= {name: runner.timed(matrix) for name, runner in gemm_runners.items()}
        with OtherLoad() as load:
            samples = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup)
    results = _results(args, samples, macs, load)
    print(markdown(results))
    if load.warning():
        print(load.warning(), file=sys.stderr)
    write_results(results, markdown(results), json_path=args.json, markdown_path=args.markdown)
    return results


def _results(args, samples: dict, macs: int, load: OtherLoad) -> dict:
    gemm_ops = 2 * GEMM_SIZE**3 * GEMM_LAYERS
    rates = {name: gemm_ops / median(samples[name]) / 1e9 for name in ("gemm fp32", "gemm int8")}
    model_samples = {name: times for name, times in samples.items() if not name.startswith("gemm")}
    summary = summarize_samples(model_samples, args.batch_size)
    fp32_engines = [n for n in model_samples if n.startswith("deploy") and n.endswith("fp32") and "eager" not in n]
    best_fp32 = max(fp32_engines, key=lambda n: summary[n]["images_per_s"])
    rows = {}
    for name, stats in summary.items():
        gops = 2 * macs * stats["images_per_s"] / 1e9
        rate = rates["gemm int8" if name.endswith("int8") else "gemm fp32"]
        rows[name] = {
            "images_per_s": stats["images_per_s"],
            "ms_median": stats["ms_median"],
            "vs_train_eager": speed_ratio(model_samples[name], model_samples[REFERENCE]),
            "vs_best_fp32_engine": speed_ratio(model_samples[name], model_samples[best_fp32]),
            "gops": gops,
            "fraction_of_gemm_rate": gops / rate,
        }
    return {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "macs_per_image": macs,
        "gemm_gops": rates,
        "best_fp32_engine": best_fp32,
        "rows": rows,
        "other_load_cores": load.cores,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "versions": {
            "torch": torch.__version__,
            "openvino": _version("openvino"),
            "nncf": _version("nncf"),
            "onnxruntime": _version("onnxruntime"),
        },
    }


def markdown(results: dict) -> str:
    rates = results["gemm_gops"]
    lines = [
        f"{results['model']} at {results['image_size']}x{results['image_size']}, batch {results['batch_size']}, "
        f"{results['threads']} threads, {results['rounds']} interleaved rounds; measured GEMM rate "
        f"({GEMM_LAYERS} x {GEMM_SIZE}^3 through OpenVINO): fp32 {rates['gemm fp32']:.0f} GFLOP/s, int8 {rates['gemm int8']:.0f} GOP/s",
        "",
        "| candidate | img/s | ms/batch | x train eager fp32 (per-round range) | x fastest fp32 engine | GOP/s | of the GEMM rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["rows"].items():
        ref, best = row["vs_train_eager"], row["vs_best_fp32_engine"]
        lines.append(
            f"| {name} | {row['images_per_s']:.1f} | {row['ms_median']:.1f} | {ref['ratio']:.2f}x "
            f"({ref['per_round_min']:.2f}-{ref['per_round_max']:.2f}) | {best['ratio']:.2f}x | {row['gops']:.0f} | "
            f"{row['fraction_of_gemm_rate']:.0%} |"
        )
    lines += [
        "",
        f"Fastest fp32 engine: {results['best_fp32_engine']}. Other processes kept {results['other_load_cores'] or 0:.2f} cores busy.",
    ]
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
