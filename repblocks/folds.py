"""Every fold checks itself: the folded module against the modules it replaces, on a small float64 probe.

A fold (a Conv+BN pair, a ``RepBlock``, an online block, a collapsed expansion, a third-party block's
own ``reparameterize()``) is exact algebra, so its result must compute what it replaced. That is
checked where the fold happens, not on the whole network: the module's own input channels, a few
pixels (enough for every tap of its kernel to see the border and the interior), one image, all in
float64 with the weights as they are (the folded ones rounded to the model's dtype). A mismatch
raises :class:`~repblocks.errors.FoldError`, naming the module and the error.

The check costs two small forwards per fold. Users who know better turn it off with
``switch_to_deploy(model, verify=False)`` or the environment variable ``REPBLOCKS_VERIFY_FOLDS=0``.

This module also holds what the folds have in common: :class:`DeployForm`, what a re-parameterizable
module says it becomes (the fold protocol, walked by :func:`repblocks.convert.reparameterize`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from repblocks.errors import FoldError
from repblocks.fusion import wide_dtype
from repblocks.threads import use_threads

__all__ = [
    "VERIFY_ENV",
    "DeployForm",
    "Reparameterizable",
    "checked_fold",
    "conv_probe",
    "fold_tolerance",
    "probe_for",
    "verify_default",
]

log = logging.getLogger(__name__)

VERIFY_ENV = "REPBLOCKS_VERIFY_FOLDS"


@dataclass(frozen=True)
class DeployForm:
    """What a re-parameterizable module becomes in deploy form, said by the module itself (its ``deploy_form()``).

    The fold protocol (:class:`Reparameterizable`): a module's ``deploy_form()`` folds it (checked, see
    :func:`checked_fold`) and returns this; the one walker (:func:`repblocks.convert.reparameterize`)
    puts the modules in place.
    """

    module: nn.Module  # takes the module's own place (the module itself when it fused in place)
    # Modules that take the place of siblings in the same parent, by attribute name (an expanded block's BatchNorm).
    siblings: Mapping[str, nn.Module] = field(default_factory=dict)
    # The result is the architecture repblocks.expand() was given: no other Conv+BN pair is folded.
    restores_architecture: bool = False


@runtime_checkable
class Reparameterizable(Protocol):
    """A module that says how it folds: RepBlock, the online block, the blocks repblocks.expand makes.

    ``deploy_form()`` folds the module (in place where it stays itself), checks the fold unless
    ``verify`` is False, and returns what takes its place. Calling it again folds nothing more.
    """

    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm: ...


def verify_default() -> bool:
    """Whether folds are checked when the caller does not say: yes, unless ``REPBLOCKS_VERIFY_FOLDS=0``."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def fold_tolerance(dtype: torch.dtype) -> float:
    """Largest relative error a fold may show when its weights are held in ``dtype``: half the digits of ``dtype``.

    Rounding the fused weights once to ``dtype`` costs a few units of its last place; a wrong fold
    (a lost activation, a branch off by one pixel, a wrong eps) costs far more than the square root
    of that: 1.5e-8 in float64, 3.5e-4 in float32, 3e-2 in float16, 9e-2 in bfloat16.
    """
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def probe_for(module: nn.Module) -> Tensor | None:
    """A random float64 input for ``module``, shaped for its first conv (:func:`conv_probe`); None if it has no conv."""
    conv = next((m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return None
    return conv_probe(conv.in_channels, conv.kernel_size, conv.stride, conv.dilation, device=conv.weight.device)


def conv_probe(
    in_channels: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int] | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """A random float64 input of one image for a conv: ``in_channels``, and a few pixels per side.

    Each side is (kernel - 1) * dilation + stride pixels: the smallest input on which every tap of the
    kernel is tested, and padded borders too (a 3x3 conv, stride 1, padded by 1: 3 outputs per side, two
    of them reading the padding). The check costs as much as the block's forward on this input, so it
    is kept that small. The same probe every time, so a failure can be rerun.
    """
    dilation = dilation or [1] * len(kernel_size)
    sides = [(k - 1) * d + s for k, d, s in zip(kernel_size, dilation, stride, strict=True)]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, in_channels, *sides, generator=generator, dtype=torch.float64)
    return probe.to(device=device, dtype=wide_dtype(torch.device(device or "cpu")))  # MPS has no float64


@contextlib.contextmanager
def checked_fold(
    module: nn.Module,
    *,
    verify: bool | None = None,
    after: Callable[[], nn.Module] | None = None,
    probe: Tensor | None = None,
) -> Iterator[None]:
    """Check that the fold run inside this block leaves ``after()`` (by default ``module``) computing what ``module`` did.

    Both sides run in eval mode (BatchNorms use their running statistics, as a fold assumes) on
    ``probe`` (by default :func:`probe_for`), with every parameter and buffer taken to float64; no
    module is changed (training flags are put back, running statistics are not updated).

    Raises:
        FoldError: The outputs differ by more than :func:`fold_tolerance` of the folded weights' dtype,
            or the folded module fails on an input the original took. The path is ""; a walker adds it.
    """
    if verify is None:
        verify = verify_default()
    probe = probe if probe is not None or not verify else probe_for(module)
    expected = None
    if verify and probe is not None:
        try:
            expected = _run_wide(module, probe)
        except Exception as err:  # a third-party module that takes other inputs: nothing to compare with
            log.info(
                "fold of %s not checked: it does not run on a %s probe (%s)",
                type(module).__name__,
                tuple(probe.shape),
                err,
            )
    yield
    if expected is None:
        return
    folded = after() if after is not None else module
    try:
        got = _run_wide(folded, probe)
    except Exception as err:  # the original ran on this input: failing now is the fold's fault
        raise FoldError(
            "", type(module).__name__, math.inf, 0.0, f"the folded module fails on its input ({err})"
        ) from err
    error = _relative_error(got, expected)
    tolerance = fold_tolerance(_weight_dtype(folded))
    if not error <= tolerance:  # a NaN fails too
        raise FoldError("", type(module).__name__, error, tolerance)


def _run_wide(module: nn.Module, probe: Tensor) -> Tensor:
    """``module(probe)`` with every floating parameter and buffer in float64, in eval mode, changing nothing."""
    wide = {
        name: tensor.to(probe.dtype) if tensor.is_floating_point() else tensor.clone()
        for name, tensor in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
    }
    # A few pixels are less work than waking a thread pool: on a shared CPU, more threads cost 100x more here.
    threads = 1 if probe.device.type == "cpu" else None
    with torch.no_grad(), _eval_mode(module), use_threads(threads):
        out = torch.func.functional_call(module, wide, (probe,), tie_weights=False)
    if not isinstance(out, Tensor):
        raise TypeError(f"{type(module).__name__} returns {type(out).__name__}, not one tensor")
    return out


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's training flag as it was."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _relative_error(got: Tensor, expected: Tensor) -> float:
    if got.shape != expected.shape:
        return math.inf
    scale = expected.abs().max().item()
    return (got - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The narrowest floating dtype among the module's parameters and buffers (float64 if it has none)."""
    dtypes = [t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float64)
