"""int8 accuracy side by side: the deploy form against the train form (quantized before fusion), and model against model.

For each train.py run given, on its own data: top-1 of fp32, then of int8 through each quantizer
(NNCF into OpenVINO; onnxruntime QDQ with per-channel weights; onnxruntime with one weight scale
per layer, the setting where RepVGG's fused kernels are known to break), quantizing the deploy
form and quantizing the train form as it is (every branch and BN its own layer, summed after).
Calibration and validation images are those of ``deploy.py quantize=int8`` (the run's training
images without augmentation, and its validation images).

    python train.py model=repvgg_a0 hydra.run.dir=runs/a0
    python train.py model=qarepvgg_a0 hydra.run.dir=runs/qa0
    python -m benchmarks.int8_accuracy runs/a0 runs/qa0 --markdown int8_accuracy.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import write_results
from repblocks.deploy.config import QuantizeConfig
from repblocks.deploy.convert import convert
from repblocks.deploy.engines.base import Int8Artifact
from repblocks.deploy.engines.onnxruntime import onnx_session, quantize_qdq, session_runner
from repblocks.deploy.quantize import Gate, gate_images, int8_runner
from repblocks.deploy.sources import load_network
from repblocks.errors import UserError

QUANTIZERS = {  # name: (engine, options)
    "NNCF/OpenVINO, per-channel": ("openvino", {}),
    "onnxruntime QDQ, per-channel": ("onnxruntime", {"per_channel": True}),
    "onnxruntime QDQ, per-tensor": ("onnxruntime", {"per_channel": False}),
}


def _int8_run(engine: str, model, calibration, workdir: Path, options: dict):
    """``model`` quantized by ``engine``; onnxruntime's QDQ with ``options`` (per-channel or per-tensor weights)."""
    if engine == "onnxruntime":
        _, path = quantize_qdq(model, calibration, workdir, **options)
        return session_runner(onnx_session(path.read_bytes())).run
    return int8_runner(engine, model, calibration)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run folders or checkpoints")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table to PATH")
    return parser.parse_args(argv)


def compare(run: Path, *, calibration_images: int, seed: int) -> list[dict]:
    """One row per form and quantizer for the run at ``run``."""
    network = load_network(ckpt=str(run))
    plain = convert(network).plain
    settings = QuantizeConfig(precision="int8", calibration_images=calibration_images)
    images = gate_images(network, settings, seed=seed)
    calibration, batches = images.calibration, images.batches
    gate = Gate.of(torch.inference_mode()(plain), batches, max_drop=settings.max_drop)
    rows = []
    with tempfile.TemporaryDirectory(prefix="repblocks-int8-accuracy-") as tmp:
        for form, model in (("deploy", plain), ("train (before fusion)", network.model)):
            for name, (engine, options) in QUANTIZERS.items():
                workdir = Path(tmp) / f"{len(rows)}"
                workdir.mkdir()
                run_int8 = _int8_run(engine, model, calibration, workdir, options)
                result = gate.judge(engine, Int8Artifact(name, None, run_int8))
                rows.append(
                    {
                        "model": network.name,
                        "run": str(run),
                        "form": form,
                        "quantizer": name,
                        "fp32_top1": gate.fp32_top1,
                        "int8_top1": result.top1,
                        "drop": result.drop,
                        "agreement": result.agreement,
                        "images": len(gate.labels),
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | quantized | quantizer | fp32 top-1 | int8 top-1 | drop (points) | agreement with fp32 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['form']} | {row['quantizer']} | {row['fp32_top1']:.2f}% | "
            f"{row['int8_top1']:.2f}% | {row['drop']:+.2f} | {row['agreement']:.1%} |"
        )
    return "\n".join(lines) + f"\n\n{rows[0]['images']} validation images per run."


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    try:
        for run in args.runs:
            rows += compare(run, calibration_images=args.calibration_images, seed=args.seed)
    except UserError as err:
        sys.exit(f"error: {err}")
    print(markdown(rows))
    write_results(rows, markdown(rows), json_path=args.json, markdown_path=args.markdown)
    return rows


if __name__ == "__main__":
    main()
