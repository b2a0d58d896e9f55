"""int8 quantization, one path for deployment (``deploy.py quantize=int8``) and QAT (``train.py +experiment=qat``).

Both sides quantize the same way, so the PTQ baseline in a QAT report is the int8 model
``deploy.py`` would ship:

* :mod:`repblocks.int8.conversion`: the torch -> OpenVINO conversion (``torch.export``; NNCF's
  fake-quantized models through the TorchScript trace, the only path on which NNCF writes
  ``FakeQuantize``), compiled for the CPU in float32;
* :mod:`repblocks.int8.quantizers`: NNCF's settings (full bias correction), post-training int8 into
  OpenVINO, and trainable fake quantization of a torch module on NNCF's pure-torch quantizers;
* :mod:`repblocks.int8.accuracy`: logits a batch at a time, and top-1 in percent.

Calibration images are drawn by :func:`repblocks.datasets.sample_images` on both sides.

This package belongs to the ``[openvino]`` extra: training and deployment may import it, the core
may not, and it imports neither of them. OpenVINO and NNCF are imported inside the functions that
use them, so ``import repblocks.int8`` works without them.
"""

from repblocks.int8.accuracy import agreement, chance_top1, near_chance, predict, predict_batches, top1
from repblocks.int8.conversion import (
    INSTALL,
    compile_model,
    core,
    dynamic_axes,
    example_batch,
    infer,
    missing,
    require,
    to_openvino,
)
from repblocks.int8.quantizers import NNCF_OPTIONS, fake_quantize, nncf_dataset, nncf_int8, use_reference_quantizers

__all__ = [
    "INSTALL",
    "NNCF_OPTIONS",
    "agreement",
    "chance_top1",
    "compile_model",
    "core",
    "dynamic_axes",
    "example_batch",
    "fake_quantize",
    "infer",
    "missing",
    "near_chance",
    "nncf_dataset",
    "nncf_int8",
    "predict",
    "predict_batches",
    "require",
    "to_openvino",
    "top1",
    "use_reference_quantizers",
]
