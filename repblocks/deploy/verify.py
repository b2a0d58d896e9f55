"""Does the deploy form compute what the train form computes? Checked on random and validation images, per dtype.

float32 is compared against a tolerance (``VerifyConfig``), in full float32 precision even on GPUs
that would round convolutions to TF32. Each lower precision the benchmark runs (fp16, bf16) is
compared with the float32 train form: the deploy form must be no less accurate there than the
train form in the same dtype, since one fused conv rounds less often than three branches.
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
from torch import Tensor, nn

from repblocks.datasets import build_data
from repblocks.deploy.config import VerifyConfig
from repblocks.deploy.engines import DTYPES, applicable
from repblocks.deploy.sources import Network
from repblocks.errors import UserError
from repblocks.numerics import compare_forms, ieee_fp32, max_errors, within_tolerance

__all__ = ["verify"]

log = logging.getLogger(__name__)


@torch.inference_mode()
def verify(
    network: Network,
    plain: nn.Module,
    *,
    device: torch.device,
    image_shape: tuple[int, int, int],
    dtypes: tuple[str, ...],
    settings: VerifyConfig,
    seed: int = 0,
) -> dict:
    """Compare the deploy form ``plain`` with ``network.model`` on ``device``; raise :class:`UserError` when they differ.

    Returns:
        ``max_abs_err``, ``max_rel_err`` and ``top1_agreement`` over the random images (and the
        validation images, when there are any), ``real_images`` (their errors and accuracies, or
        why they were skipped), and ``dtypes``: the relative errors of both forms in each lower precision.
    """
    train, deploy = _on(network.model, device), _on(plain, device)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(settings.batch_size, *image_shape, generator=generator).to(device)  # (B, C, H, W)
    with ieee_fp32():
        reference, output = train(images), deploy(images)
        real = _verify_real_images(network, train, deploy, device, settings.real_batches)
    abs_err, rel_err = max_errors(reference, output)
    if isinstance(real, dict):
        abs_err, rel_err = max(abs_err, real["max_abs_err"]), max(rel_err, real["max_rel_err"])
    if not within_tolerance(abs_err, rel_err, atol=settings.atol, rtol=settings.rtol):
        raise UserError(
            f"the deploy form of {network.name} differs from the train form: max error {abs_err:.2e} abs, "
            f"{rel_err:.2e} rel (tolerance verify.atol={settings.atol:g}, verify.rtol={settings.rtol:g}); "
            "nothing was exported"
        )
    log.info("verified %s: %.1e abs, %.1e rel", network.name, abs_err, rel_err)
    return {
        "random_images": settings.batch_size,
        "max_abs_err": abs_err,
        "max_rel_err": rel_err,
        "top1_agreement": _agreement(reference, output),
        "atol": settings.atol,
        "rtol": settings.rtol,
        "real_images": real,
        "dtypes": _verify_dtypes(train, deploy, images, reference, dtypes, device, settings.rtol, network.name),
    }


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    if device.type == "cpu" and dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(device, dtype)  # nn.Module.to works in place; the caller's stays as it is


def _agreement(reference: Tensor, other: Tensor) -> float:
    return (reference.argmax(dim=1) == other.argmax(dim=1)).float().mean().item()


def _verify_real_images(
    network: Network, train: nn.Module, deploy: nn.Module, device: torch.device, max_batches: int
) -> dict | str:
    """Errors and accuracies on validation images, or why they were skipped."""
    if network.data is None or max_batches < 1:
        return (
            "skipped (no data config in the checkpoint)" if network.data is None else "skipped (verify.real_batches=0)"
        )
    try:
        data = build_data(network.data)  # never downloads: the config comes from a file
        data.setup("validate")
        batches = list(itertools.islice(data.val_dataloader(), max_batches))
    except (FileNotFoundError, ValueError, ImportError) as err:
        return f"skipped ({err})"
    compared = compare_forms(train, deploy, batches, device)
    return compared or "skipped (the validation loader yielded no images)"


def _verify_dtypes(
    train: nn.Module,
    deploy: nn.Module,
    images: Tensor,
    reference: Tensor,
    dtypes: tuple[str, ...],
    device: torch.device,
    rtol: float,
    name: str,
) -> dict:
    results = {}
    for dtype_name in dtypes:
        if dtype_name == "fp32" or applicable("eager", dtype_name, device) is not None:
            continue
        dtype = DTYPES[dtype_name]
        batch = images.to(dtype)
        train_rel = max_errors(reference, _on(train, device, dtype)(batch).float())[1]
        deploy_rel = max_errors(reference, _on(deploy, device, dtype)(batch).float())[1]
        results[dtype_name] = {"train_rel_err": train_rel, "deploy_rel_err": deploy_rel}
        if not deploy_rel <= 2 * train_rel + rtol:
            raise UserError(
                f"in {dtype_name}, the deploy form of {name} is less accurate than the train form: "
                f"{deploy_rel:.2e} vs {train_rel:.2e} relative to float32; nothing was exported"
            )
    return results
