"""The upstream re-creations used as fixtures (apple's MobileOne, YOLOv6's blocks, the QARepVGG authors' network) agree with themselves.

Before another implementation is checked against these fixtures, each fixture's own fusion must
keep its outputs in float64 with randomized BN statistics, and its deploy form must have the
key set its fusion produces.
"""

import pytest
import torch

from repblocks.numerics import max_errors, randomize_bn_

from . import qarepvgg_layout as authors
from .apple_mobileone_layout import PARAMS, AppleMobileOne, mobileone, reparameterize_model
from .yolov6_layout import QARepVGGBlock, QARepVGGBlockV2, RepVGGBlock, deploy, network

# Widths chosen so every SE block has at least 16 channels (apple's hidden width is int(c / 16)).
TINY_APPLE = {"num_blocks_per_stage": (1, 2, 2, 1), "width_multipliers": (0.25, 0.25, 0.125, 0.125)}
PUBLISHED_MILLIONS = {"s0": 2.1, "s1": 4.8, "s2": 7.8, "s3": 10.1, "s4": 14.8}  # MobileOne paper, Table 9


def _shapes(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("branches", [1, 3])
def test_apple_reparameterize_model_keeps_outputs_in_float64(branches):
    model = AppleMobileOne(num_classes=5, use_se=True, num_conv_branches=branches, **TINY_APPLE).double().eval()
    randomize_bn_(model, seed=branches)
    inputs = torch.randn(2, 3, 32, 48, dtype=torch.float64)  # not square: SE must pool over h and w
    fused = reparameterize_model(model)
    with torch.no_grad():
        _, rel_err = max_errors(model(inputs), fused(inputs))
        twice = reparameterize_model(fused)  # fusing a fused model changes nothing
        assert torch.equal(twice(inputs), fused(inputs))
    assert rel_err < 1e-12
    assert all(".rbr_" not in key for key in fused.state_dict())


def test_apple_inference_mode_matches_what_reparameterize_model_produces():
    train = AppleMobileOne(num_classes=5, use_se=True, num_conv_branches=2, **TINY_APPLE)
    inference = AppleMobileOne(num_classes=5, use_se=True, num_conv_branches=2, inference_mode=True, **TINY_APPLE)
    assert _shapes(reparameterize_model(train)) == _shapes(inference)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(PARAMS))
def test_apple_variants_fuse_to_their_inference_form_with_the_published_size(variant):
    inference = mobileone(variant=variant, inference_mode=True)
    assert _shapes(reparameterize_model(mobileone(variant=variant))) == _shapes(inference)
    millions = sum(parameter.numel() for parameter in inference.parameters()) / 1e6
    assert round(millions, 1) == PUBLISHED_MILLIONS[variant]


BLOCK_SHAPES = [  # (in, out, stride, groups): identity (and average pool) present, absent by stride, grouped
    (8, 8, 1, 1),
    (8, 16, 2, 1),
    (8, 8, 1, 2),
    (6, 12, 1, 3),
]


@pytest.mark.parametrize("block_cls", [RepVGGBlock, QARepVGGBlock, QARepVGGBlockV2])
@pytest.mark.parametrize(("cin", "cout", "stride", "groups"), BLOCK_SHAPES)
def test_yolov6_deploy_keeps_outputs_in_float64(block_cls, cin, cout, stride, groups):
    block = block_cls(cin, cout, stride=stride, groups=groups).double().eval()
    randomize_bn_(block, seed=cin + stride)
    inputs = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        reference = block(inputs)
        deploy(block)
        _, rel_err = max_errors(reference, block(inputs))
    assert rel_err < 1e-12
    kept = {key.split(".")[0] for key in block.state_dict()}
    assert kept == ({"rbr_reparam"} if block_cls is RepVGGBlock else {"rbr_reparam", "bn"})


def test_yolov6_average_pool_branch_exists_exactly_with_the_identity():
    assert QARepVGGBlockV2(8, 8).rbr_avg is not None
    assert QARepVGGBlockV2(8, 8, stride=2).rbr_avg is None
    assert QARepVGGBlockV2(8, 16).rbr_avg is None


@pytest.mark.parametrize("block_cls", [QARepVGGBlock, QARepVGGBlockV2])
def test_yolov6_post_bn_folds_into_the_fused_conv(block_cls):
    block = block_cls(8, 8).double().eval()
    randomize_bn_(block, seed=3)
    inputs = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        reference = block(inputs)
        deploy(block)
        kernel, bias = block.fold_post_bn(block.rbr_reparam.weight, block.rbr_reparam.bias)
        folded = torch.relu(torch.nn.functional.conv2d(inputs, kernel, bias, padding=1))
    _, rel_err = max_errors(reference, folded)
    assert rel_err < 1e-12


def test_yolov6_qa_block_built_in_deploy_form_has_no_post_bn_like_upstream():
    assert set(QARepVGGBlock(8, 8, deploy=True).state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}
    with pytest.raises(NotImplementedError):
        RepVGGBlock(8, 8, use_se=True)


def test_yolov6_network_has_every_batchnorm_at_eps_1e_3_as_initialize_weights_sets():
    model = network(RepVGGBlock(8, 8), QARepVGGBlock(8, 8), QARepVGGBlockV2(8, 16, stride=2))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 7 and {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.03)}


@torch.no_grad()
def test_qarepvgg_authors_conversion_keeps_outputs_in_float64_and_drops_the_post_bn():
    model = authors.RepVGG(num_blocks=[2, 2, 2, 1], width_multiplier=[0.25] * 4, num_classes=5).double().eval()
    randomize_bn_(model, seed=4)
    inputs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused = authors.repvgg_model_convert(model)
    assert max_errors(model(inputs), fused(inputs))[1] < 1e-12
    assert {key.split(".")[-2] for key in fused.state_dict() if key.startswith("stage")} == {"rbr_reparam"}
    deploy_form = authors.RepVGG(num_blocks=[2, 2, 2, 1], width_multiplier=[0.25] * 4, num_classes=5, deploy=True)
    assert _shapes(deploy_form) == _shapes(fused)
