"""What switch_to_deploy gives on networks that are not ours, and what checking every fold costs.

For each network (random BN statistics, eval mode): the largest relative error of the deploy form
against the original, in float64 and float32, on 2x3x64x64 inputs; then the conversion time with
the fold checks on and off (``verify=``), interleaved, the fastest of ``--repeats`` runs each.
Run it against another checkout (``PYTHONPATH=/path/to/other``) to compare: a checkout without
``verify=`` is timed once per run, as it is.

    OMP_NUM_THREADS=1 python -m benchmarks.fold_checks            # about a minute on 2 idle cores
    OMP_NUM_THREADS=1 python -m benchmarks.fold_checks --repeats 1 --only regnetx_002
"""

from __future__ import annotations

import argparse
import inspect
import time

import timm
import torch
import torchvision

import repblocks
from repblocks.numerics import max_errors, randomize_bn_

CASES = {
    "timm efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm regnetx_002": lambda: timm.create_model("regnetx_002"),
    "timm mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050"),
    "tv resnet18 FrozenBatchNorm2d": lambda: torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d),
    "repvgg_b3": lambda: repblocks.create_model("repvgg_b3"),
    "mobileone_s0": lambda: repblocks.create_model("mobileone_s0"),
}


def _frozen_stats_(model: torch.nn.Module) -> torch.nn.Module:
    """randomize_bn_ of a checkout that does not reach frozen BatchNorms: the same ranges, by hand."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torchvision.ops.FrozenBatchNorm2d):
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 1.5 + 0.5)
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
    return model


def _seconds(model: torch.nn.Module, **kwargs) -> float:
    start = time.perf_counter()
    repblocks.switch_to_deploy(model, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="one case, by a word of its name")
    args = parser.parse_args()
    can_verify = "verify" in inspect.signature(repblocks.switch_to_deploy).parameters
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    print(f"{'network':32} {'fp64 rel err':>12} {'fp32 rel err':>12} {'checked s':>10} {'unchecked s':>11}")
    for name, build in CASES.items():
        if args.only and args.only not in name:
            continue
        model = _frozen_stats_(randomize_bn_(build())).eval()
        errors = []
        for dtype in (torch.float64, torch.float32):
            model = model.to(dtype)
            with torch.no_grad():
                errors.append(max_errors(model(x.to(dtype)), repblocks.switch_to_deploy(model)(x.to(dtype)))[1])
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (True, False) if can_verify else (True,):
                times[verify].append(_seconds(model, **({"verify": verify} if can_verify else {})))
        unchecked = f"{min(times[False]):11.2f}" if can_verify else f"{'-':>11}"
        print(f"{name:32} {errors[0]:12.2e} {errors[1]:12.2e} {min(times[True]):10.2f} {unchecked}", flush=True)


if __name__ == "__main__":
    main()
