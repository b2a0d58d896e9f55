"""What a plain runtime user gets from each deploy file, fp32, bf16 and int8: max logit error and speed, side by side.

RepVGG-A0 (random weights, randomized BN statistics), deploy form, at 224x224. Each file is written
as deploy.py writes it and loaded back by its runtime with the runtime's defaults (OpenVINO:
``Core().compile_model(path, "CPU")`` with only the thread count set; onnxruntime: an
``InferenceSession`` with only the thread count set), beside OpenVINO compiled at the precision the
file records (what predict.py runs). Errors are against the eager fp32 deploy form on the same
images; speeds come from one interleaved run at each batch size.

    python -m benchmarks.precision_speed                 # A0, 224x224, batch 1 and 16, 2 threads
    python -m benchmarks.precision_speed --quick         # smoke test

Needs the ``[openvino]`` extra.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import repblocks
from benchmarks.common import OtherLoad, summarize_samples
from repblocks.bench import time_interleaved
from repblocks.deploy.engines import engine, openvino
from repblocks.deploy.engines.base import Check
from repblocks.numerics import randomize_bn_


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="repvgg_tiny at 32x32, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.rounds, args.calibration_images = "repvgg_tiny", 32, 2, 8
    return args


def build(args: argparse.Namespace, workdir: Path) -> tuple[dict, torch.nn.Module]:
    """``{name: images -> logits}`` for every file as its runtime loads it, and the fp32 deploy form."""
    import onnxruntime

    shape = (3, args.image_size, args.image_size)
    torch.manual_seed(0)
    plain = repblocks.switch_to_deploy(randomize_bn_(repblocks.create_model(args.model), seed=0).eval())
    calibration = torch.randn(args.calibration_images, *shape, generator=torch.Generator().manual_seed(1))
    threads = {"INFERENCE_NUM_THREADS": args.threads}
    ov_engine, ort_engine = engine("openvino"), engine("onnxruntime")
    files = {
        "fp32": openvino.to_openvino(plain, calibration),
        "int8": ov_engine.int8(plain, calibration, metadata={}).model,
    }
    if not ov_engine.float_missing("bf16"):
        files["bf16"] = ov_engine.low_precision(plain, calibration, "bf16").model
    runs = {}
    for precision, ov_model in files.items():
        openvino.record_precision(ov_model, "bf16" if precision == "bf16" else "f32")
        path = workdir / f"{precision}.xml"
        openvino.save(ov_model, path)
        # The runtime's defaults but threads, on the process's one Core (a Core per compile leaves a freed signal stack).
        plain_compiled = openvino.core().compile_model(str(path), "CPU", threads)
        runs[f"openvino {precision} file, plain compile ({_precision(plain_compiled)})"] = plain_compiled
        recorded = openvino.compile_model(openvino.load(path), threads=args.threads)
        runs[f"openvino {precision} file, as recorded ({_precision(recorded)})"] = recorded
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    ort_engine.export(plain, workdir / "fp32.onnx", calibration[:2], {}, check=Check(1e-3, 1e-3))
    qdq = ort_engine.int8(plain, calibration, metadata={}).model  # the QDQ file's bytes
    for precision, model in (("fp32", str(workdir / "fp32.onnx")), ("int8", qdq)):
        runs[f"onnxruntime {precision}"] = onnxruntime.InferenceSession(
            model, options, providers=["CPUExecutionProvider"]
        )
    return runs, plain


def _precision(compiled) -> str:
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def _call(run):
    if hasattr(run, "create_infer_request"):
        request = run.create_infer_request()
        return lambda images: np.array(request.infer({0: images})[0])
    name = run.get_inputs()[0].name
    return lambda images: run.run(None, {name: images})[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="repblocks-precision-") as tmp:
        runs, plain = build(args, Path(tmp))
        calls = {name: _call(run) for name, run in runs.items()}
        images = torch.randn(16, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            reference = plain(images).numpy()
        errors = {name: float(np.abs(call(images.numpy()) - reference).max()) for name, call in calls.items()}
        print(f"{args.model} deploy form, {args.image_size}x{args.image_size}, {args.threads} threads")
        for batch_size in args.batch_sizes:
            batch = images[:batch_size].numpy() if batch_size <= 16 else np.repeat(images.numpy(), batch_size // 16, 0)
            candidates = {name: (lambda c=call, b=batch: c(b)) for name, call in calls.items()}
            with OtherLoad() as load:
                summary = summarize_samples(time_interleaved(candidates, rounds=args.rounds, warmup=2), batch_size)
            print(f"\nbatch {batch_size} (other processes kept {load.cores:.2f} cores busy while timing)")
            print("| file, runtime | max logit error vs fp32 eager | img/s |\n|---|---:|---:|")
            for name in calls:
                print(f"| {name} | {errors[name]:.1e} | {summary[name]['images_per_s']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
