"""Conversion on CUDA, in the dtypes people deploy in. Skipped on machines without a GPU."""

import pytest
import torch

import repblocks
from repblocks.numerics import ieee_fp32, max_errors, randomize_bn_

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@torch.no_grad()
@ieee_fp32()  # TF32's own ~1e-3 rounding (Ampere+ default for fp32 convs) would hide the conversion's error
def test_conversion_on_cuda_in_every_dtype(dtype, tolerance):
    model = randomize_bn_(repblocks.create_model("repvgg_tiny_g2se", num_classes=10)).eval()
    x = torch.randn(4, 3, 32, 32)
    reference = model.double()(x.double())  # the exact answer, on the CPU in float64
    model = model.to("cuda", dtype)
    deployed = repblocks.switch_to_deploy(model)
    assert deployed.stem.reparam.weight.device.type == "cuda" and deployed.stem.reparam.weight.dtype == dtype
    train_err = max_errors(reference, model(x.to("cuda", dtype)).cpu())[1]
    deploy_err = max_errors(reference, deployed(x.to("cuda", dtype)).cpu())[1]
    assert deploy_err < tolerance
    # The fused model is no less accurate than the multi-branch one it replaces (one conv rounds less).
    assert deploy_err <= 2 * train_err + 1e-6
