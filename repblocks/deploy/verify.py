"""Does the deploy form compute what the train form computes? Checked on random and validation images, per dtype.

First, :func:`check_inputs` runs one image of every shape the run will use through the model: a
model that does not take a shape (a ViT at another image size) is one line, before any work.
float32 is compared against a tolerance (``VerifyConfig``), in full float32 precision even on GPUs
that would round convolutions to TF32. Each lower precision the benchmark runs (fp16, bf16) is
compared with the float32 train form: the deploy form must be no less accurate there than the
train form in the same dtype, since one fused conv rounds less often than three branches.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repblocks.datasets import build_data
from repblocks.deploy.config import VerifyConfig
from repblocks.deploy.engines.base import one_line
from repblocks.deploy.engines.pytorch import DTYPES
from repblocks.deploy.runners import applicable
from repblocks.deploy.sources import Network
from repblocks.errors import UserError
from repblocks.numerics import compare_forms, ieee_fp32, max_errors, within_tolerance

__all__ = ["Verification", "check_inputs", "not_compared", "verify"]

log = logging.getLogger(__name__)

# What a model raises for an input it cannot take: a shape mismatch or a failed size assert
# (torchvision's ViT), or too little memory for a very large image.
_INPUT_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError, MemoryError)


@dataclass(frozen=True)
class Verification:
    """What the verify stage found: the deploy form's largest errors against the train form, and on which images."""

    random_images: int  # random images compared in float32, over every shape
    image_shapes: list[list[int]]  # (C, H, W) of each
    max_abs_err: float | None  # largest error of the logits, random and validation images; None: not compared
    max_rel_err: float | None  # ... relative to the largest logit
    top1_agreement: float | None  # lowest share of images whose class both forms agree on
    atol: float  # the tolerance checked
    rtol: float
    real_images: dict | str  # errors and accuracies on validation images, or why they were skipped
    dtypes: dict[str, dict]  # per lower precision: both forms' errors relative to float32
    reason: str | None = None  # why nothing was compared (weights that came in deploy form)

    def as_dict(self) -> dict:
        """For ``report.json``: every field, ``reason`` only when there is one."""
        fields = dataclasses.asdict(self)
        if self.reason is None:
            del fields["reason"]
        return fields


@torch.inference_mode()
def check_inputs(network: Network, shapes: Sequence[tuple[int, int, int]], *, setting: str) -> None:
    """Run one image of each ``(C, H, W)`` in ``shapes`` through ``network.model``, each distinct shape once.

    Args:
        setting: The setting that chose a shape other than the model's own, for the message.

    Raises:
        UserError: The model fails on a shape; the message says what the model takes, when known.
    """
    for shape in dict.fromkeys(shapes):
        try:
            network.model(torch.zeros(1, *shape))  # (1, C, H, W)
        except _INPUT_ERRORS as err:
            message = f"{network.name} does not take {_shape(shape)} inputs ({one_line(err)})"
            if shape != network.input_shape:
                where = network.preprocessing["source"]["input_size"]
                message += (
                    f"; it takes {_shape(network.input_shape)} (input size from {where}): "
                    f"leave {setting} unset, or set it to {network.input_shape[-1]}"
                )
            raise UserError(message) from None


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


@torch.inference_mode()
def verify(
    network: Network,
    plain: nn.Module,
    *,
    device: torch.device,
    image_shapes: Sequence[tuple[int, int, int]],
    dtypes: tuple[str, ...],
    settings: VerifyConfig,
    seed: int = 0,
) -> Verification:
    """Compare the deploy form ``plain`` with ``network.model`` on ``device``; raise :class:`UserError` when they differ.

    Random images of each distinct shape of ``image_shapes`` are compared in float32; lower
    precisions at the first shape.

    Returns:
        The largest errors over the random images (and the validation images, when there are any),
        the validation images' errors and accuracies (or why they were skipped), and the relative
        errors of both forms in each lower precision.
    """
    train, deploy = _on(network.model, device), _on(plain, device)
    generator = torch.Generator().manual_seed(seed)
    shapes = list(dict.fromkeys(image_shapes))
    batches = [torch.randn(settings.batch_size, *shape, generator=generator).to(device) for shape in shapes]
    with ieee_fp32():
        outputs = [(train(images), deploy(images)) for images in batches]  # (B, C, H, W) -> (B, classes)
        real = _verify_real_images(network, train, deploy, device, settings.real_batches)
    errors = [max_errors(reference, output) for reference, output in outputs]
    abs_err, rel_err = max(err[0] for err in errors), max(err[1] for err in errors)
    images, reference = batches[0], outputs[0][0]  # lower precisions are checked at the first shape
    if isinstance(real, dict):
        abs_err, rel_err = max(abs_err, real["max_abs_err"]), max(rel_err, real["max_rel_err"])
    if not within_tolerance(abs_err, rel_err, atol=settings.atol, rtol=settings.rtol):
        raise UserError(
            f"the deploy form of {network.name} differs from the train form: max error {abs_err:.2e} abs, "
            f"{rel_err:.2e} rel (tolerance verify.atol={settings.atol:g}, verify.rtol={settings.rtol:g}); "
            "nothing was exported"
        )
    log.info("verified %s: %.1e abs, %.1e rel", network.name, abs_err, rel_err)
    return Verification(
        random_images=settings.batch_size * len(shapes),
        image_shapes=[list(shape) for shape in shapes],
        max_abs_err=abs_err,
        max_rel_err=rel_err,
        top1_agreement=min(_agreement(reference, output) for reference, output in outputs),
        atol=settings.atol,
        rtol=settings.rtol,
        real_images=real,
        dtypes=_verify_dtypes(train, deploy, images, reference, dtypes, device, settings.rtol, network.name),
    )


def not_compared(reason: str, settings: VerifyConfig) -> Verification:
    """What :func:`verify` returns, for a network with no train form to compare (``reason`` says why)."""
    return Verification(
        random_images=0,
        image_shapes=[],
        max_abs_err=None,
        max_rel_err=None,
        top1_agreement=None,
        atol=settings.atol,
        rtol=settings.rtol,
        real_images="skipped (no train form to compare)",
        dtypes={},
        reason=f"not compared: {reason}",
    )


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    if device.type == "cpu" and dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(device, dtype)  # nn.Module.to works in place; the caller's stays as it is


def _agreement(reference: Tensor, other: Tensor) -> float:
    return (reference.argmax(dim=1) == other.argmax(dim=1)).float().mean().item()


def _verify_real_images(
    network: Network, train: nn.Module, deploy: nn.Module, device: torch.device, max_batches: int | None
) -> dict | str:
    """Errors and accuracies on validation images (all of them, or the first ``max_batches`` batches), or why skipped.

    The result says how many validation images there are (``validation_images``) beside how many
    were compared (``images``): the same set, and the same count, as training's.
    """
    if network.data is None or max_batches == 0:
        return (
            "skipped (no data config in the checkpoint)" if network.data is None else "skipped (verify.real_batches=0)"
        )
    # Never downloads: the config comes from a file, and a file must not make us fetch data into a path it names.
    never = "; data named by a checkpoint is never downloaded" if network.data.get("download") else ""
    try:
        data = build_data(network.data)
        data.setup("validate")
        loader = data.val_dataloader()
    except Exception as err:
        return _skipped(err, never)
    try:
        # Read as compared, a batch at a time: a whole validation set (ImageNet's) does not fit in memory.
        compared = compare_forms(train, deploy, _reading(itertools.islice(loader, max_batches)), device)
    except _ReadError as err:
        return _skipped(err.__cause__, never)
    if not compared:
        return "skipped (the validation loader yielded no images)"
    return {**compared, "validation_images": len(data.val_set), "real_batches": max_batches}


def _skipped(err: BaseException, never: str) -> str:
    if isinstance(err, FileNotFoundError | ValueError | ImportError):  # the data is not there, or not as expected
        return f"skipped ({err}{never})"
    # corrupt files on disk: this check is optional, the run goes on without it
    return f"skipped (cannot read the validation images: {one_line(err)}{never})"


class _ReadError(Exception):
    """Reading a validation batch failed (the cause says why), as opposed to running the model on it."""


def _reading(batches):
    """``batches``, with an error while reading one raised as :class:`_ReadError`: told apart from the model's."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as err:
            raise _ReadError(one_line(err)) from err
        yield batch


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
