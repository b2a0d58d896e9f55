"""NNCF's int8: post-training into OpenVINO, and trainable fake quantization of a torch module (for QAT).

One set of settings for both: deploy.py's int8 and the PTQ baseline of a QAT report are the same
model. Weights are quantized per output channel, activations per tensor (NNCF's CPU preset).

NNCF's torch quantizers run on its pure-torch reference functions (:func:`use_reference_quantizers`),
never on its C++ extension: that extension is compiled on first use, which took longer than
NNCF's 60 s limit on two cores and left a ``lock`` file that made every later run wait and fail.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from repblocks.int8.conversion import to_openvino

__all__ = ["NNCF_OPTIONS", "fake_quantize", "nncf_dataset", "nncf_int8", "use_reference_quantizers"]

log = logging.getLogger(__name__)

# Full bias correction rather than NNCF's fast one: it costs seconds, once, and on QARepVGG-A0
# trained on digits it halved the top-1 drop (0.56 -> 0.28 points, 360 images).
NNCF_OPTIONS = {"fast_bias_correction": False}


def nncf_dataset(images: Tensor, *, numpy: bool = True):
    """``images`` ``(N, C, H, W)`` as an ``nncf.Dataset`` of one image per item, so ``subset_size`` counts images."""
    import nncf

    return nncf.Dataset([image[None].numpy() if numpy else image[None] for image in images])


def nncf_int8(model: nn.Module, calibration: Tensor):
    """``model`` quantized by NNCF (post-training, :data:`NNCF_OPTIONS`) into an ``openvino.Model``.

    Height and width stay dynamic, so the model can be run at another size than it was calibrated at.
    """
    import nncf

    ov_model = to_openvino(model, calibration, dynamic_size=True)
    return nncf.quantize(ov_model, nncf_dataset(calibration), subset_size=len(calibration), **NNCF_OPTIONS)


def fake_quantize(model: nn.Module, calibration: Tensor) -> nn.Module:
    """``model`` (fp32, eval) with NNCF's fake quantizers, their ranges set on ``calibration`` (N, C, H, W): trainable."""
    import nncf

    use_reference_quantizers()
    dataset = nncf_dataset(calibration, numpy=False)
    return nncf.quantize(model.float().eval(), dataset, subset_size=len(calibration))


class _Reference:
    """NNCF's quantize forward and backward in plain torch, where NNCF would load its C++ extension."""

    def get(self, name: str):
        from nncf.torch.quantization.reference import torch_executor

        # The eager functions, not NNCF's torch.compile'd wrappers of them: nothing is compiled at all.
        return {"Quantize_forward": torch_executor.forward, "Quantize_backward": torch_executor.backward}[name]


def use_reference_quantizers() -> None:
    """Make NNCF's torch quantizers on the CPU compute in plain torch instead of its C++ extension.

    NNCF itself falls back on the same functions when its extension fails to compile; this makes it
    the only path, so QAT needs no compiler and writes nothing under ``TORCH_EXTENSIONS_DIR``.
    (CUDA tensors keep NNCF's CUDA extension.) Same formulas: the fake-quantized outputs match.
    """
    from nncf.torch.quantization import quantize_functions

    if not isinstance(quantize_functions.QuantizedFunctionsCPU, _Reference):
        log.debug("nncf: CPU quantizers on NNCF's pure-torch reference functions")
        quantize_functions.QuantizedFunctionsCPU = _Reference()
