"""RepBlock: branch structure, exact fusion for any stride/groups, idempotence, reuse in custom code."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repblocks import RepBlock
from repblocks.blocks import ACTIVATIONS, ConvBN, resolve_act
from repblocks.numerics import max_errors, randomize_bn_

# (in, out, stride, groups): dense, strided, channel change, grouped, depthwise, depthwise strided
CASES = [(8, 8, 1, 1), (8, 8, 2, 1), (8, 16, 1, 1), (8, 8, 1, 2), (8, 8, 1, 8), (8, 8, 2, 8), (16, 32, 2, 4)]


def _trained_like(block: nn.Module, dtype=torch.float32) -> nn.Module:
    return randomize_bn_(block).to(dtype).eval()


@pytest.mark.parametrize("in_ch,out_ch,stride,groups", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fused_block_equals_branches(in_ch, out_ch, stride, groups, dtype, tol):
    block = _trained_like(RepBlock(in_ch, out_ch, stride=stride, groups=groups), dtype)
    x = torch.randn(2, in_ch, 9, 9, dtype=dtype)
    expected = block(x)
    block.switch_to_deploy()
    assert block.deploy and block.conv_kxk is None and block.identity is None
    assert block.reparam.groups == groups and block.reparam.stride == (stride, stride)
    assert max_errors(expected, block(x))[1] < tol


@pytest.mark.parametrize("in_ch,out_ch,stride,expected", [(8, 8, 1, True), (8, 8, 2, False), (8, 16, 1, False)])
def test_identity_branch_only_when_shapes_allow(in_ch, out_ch, stride, expected):
    block = RepBlock(in_ch, out_ch, stride=stride)
    assert block.has_identity is expected
    assert (block.identity is not None) is expected


def test_switch_to_deploy_twice_is_harmless():
    block = _trained_like(RepBlock(8, 8))
    block.switch_to_deploy()
    weights = copy.deepcopy(block.state_dict())
    block.switch_to_deploy()
    assert all(torch.equal(weights[k], v) for k, v in block.state_dict().items())


def test_deploy_flag_builds_only_the_fused_conv():
    block = RepBlock(8, 8, deploy=True)
    assert set(block.state_dict()) == {"reparam.weight", "reparam.bias"}


def test_equivalent_kernel_includes_identity_and_matches_the_fused_conv():
    block = _trained_like(RepBlock(4, 4), torch.float64)
    kernel, bias = block.get_equivalent_kernel_bias()
    without_identity = copy.deepcopy(block)
    without_identity.identity = None
    assert not torch.allclose(kernel, without_identity.get_equivalent_kernel_bias()[0])
    block.switch_to_deploy()
    assert torch.allclose(kernel, block.reparam.weight) and torch.allclose(bias, block.reparam.bias)


def test_equivalent_kernel_is_differentiable_for_the_l2_penalty():
    block = RepBlock(4, 4)
    kernel, bias = block.get_equivalent_kernel_bias()
    kernel.square().sum().backward()
    assert block.conv_kxk.conv.weight.grad is not None and block.identity.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_block_converts_and_keeps_dtype(dtype):
    block = _trained_like(RepBlock(8, 8, groups=2), dtype)
    reference = copy.deepcopy(block).double()
    block.switch_to_deploy()
    reference.switch_to_deploy()
    assert block.reparam.weight.dtype == dtype
    assert torch.equal(block.reparam.weight, reference.reparam.weight.to(dtype))


def test_squeeze_excite_survives_deployment():
    block = _trained_like(RepBlock(8, 8, use_se=True))
    x = torch.randn(2, 8, 6, 6)
    expected = block(x)
    block.switch_to_deploy()
    assert hasattr(block.se, "down")
    assert max_errors(expected, block(x))[1] < 1e-5


def test_custom_activation_and_kernel_size():
    block = _trained_like(RepBlock(6, 6, kernel_size=5, act=nn.SiLU))
    x = torch.randn(1, 6, 8, 8)
    expected = block(x)
    block.switch_to_deploy()
    assert block.reparam.kernel_size == (5, 5) and isinstance(block.act, nn.SiLU)
    assert max_errors(expected, block(x))[1] < 1e-5


BAD_ARGUMENTS = [
    ({"kernel_size": 4}, "kernel_size must be odd"),
    ({"kernel_size": 0}, "kernel_size must be an integer >= 1, got 0"),
    ({"groups": 3}, "divisible by groups"),
    ({"groups": 0}, "groups must be an integer >= 1, got 0"),
    ({"groups": -2}, "groups must be an integer >= 1, got -2"),
    ({"stride": 0}, "stride must be an integer >= 1, got 0"),
    ({"stride": 1.5}, "stride must be an integer >= 1, got 1.5"),
    ({"in_channels": 0}, "in_channels must be an integer >= 1, got 0"),
    ({"out_channels": -8}, "out_channels must be an integer >= 1, got -8"),
    ({"act": "swishy"}, r"unknown activation 'swishy'; known activations: relu, .*gelu"),
    ({"act": nn.ReLU()}, "act must be an activation name .* or a factory such as nn.GELU"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ARGUMENTS, ids=[str(kwargs) for kwargs, _ in BAD_ARGUMENTS])
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    """No assert, no ZeroDivisionError: one line that says what was wrong (and what exists)."""
    arguments = {"in_channels": 8, "out_channels": 8, **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        RepBlock(arguments.pop("in_channels"), arguments.pop("out_channels"), **arguments)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_by_name_apply_after_the_fused_sum(name):
    """``act="gelu"`` (a config's ``+model.act=gelu``) gives the same block as the factory, in both forms."""
    block = _trained_like(RepBlock(4, 4, act=name), torch.float64)
    without = copy.deepcopy(block)
    without.act = nn.Identity()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = block(x)
    assert torch.equal(expected, ACTIVATIONS[name]().double()(without(x)))
    block.switch_to_deploy()
    assert max_errors(expected, block(x))[1] < 1e-12


def test_act_none_means_no_activation():
    block = _trained_like(RepBlock(4, 4, act=None))
    assert isinstance(block.act, nn.Identity) and resolve_act(None) is None


def test_blocks_train_inside_a_custom_backbone():
    backbone = nn.Sequential(RepBlock(3, 8, stride=2), RepBlock(8, 8, groups=8), RepBlock(8, 16, stride=2))
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        backbone(torch.randn(4, 3, 16, 16)).mean().backward()
        optimizer.step()
    backbone.eval()
    x = torch.randn(2, 3, 16, 16)
    expected = backbone(x)
    for block in backbone:
        block.switch_to_deploy()
    assert max_errors(expected, backbone(x))[1] < 1e-5


def test_channels_last_weights_stay_channels_last():
    block = _trained_like(RepBlock(8, 8)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    expected = block(x)
    block.switch_to_deploy()
    assert block.reparam.weight.is_contiguous(memory_format=torch.channels_last)
    assert max_errors(expected, block(x))[1] < 1e-5


@pytest.mark.parametrize("seed", range(24))
def test_random_block_configurations_fuse_exactly(seed):
    """A sweep over shapes nobody thought to list: channels, groups, stride, kernel size, SE, odd input sizes."""
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=rng).item()]

    groups = pick([1, 1, 2, 3, 4])
    in_ch = groups * pick([1, 2, 3, 5])
    out_ch = pick([in_ch, in_ch, groups * pick([1, 2, 4])])
    block = RepBlock(
        in_ch, out_ch, stride=pick([1, 1, 2]), groups=groups, kernel_size=pick([3, 3, 5]), use_se=pick([False, True])
    )
    block = _trained_like(block, torch.float64)
    x = torch.randn(2, in_ch, pick([5, 7, 8]), pick([6, 9]), dtype=torch.float64)
    expected = block(x)
    block.switch_to_deploy()
    assert max_errors(expected, block(x))[1] < 1e-12, block


@pytest.mark.parametrize("dilation,stride", [(1, 1), (2, 1), (3, 2)])
def test_dilated_conv_bn_keeps_the_size_and_is_torchs_dilated_conv(dilation, stride):
    block = _trained_like(ConvBN(4, 6, 3, stride=stride, groups=2, dilation=dilation), torch.float64)
    assert block.conv.dilation == (dilation, dilation) and block.conv.padding == (dilation, dilation)
    x = torch.randn(1, 4, 11, 10, dtype=torch.float64)
    expected = F.conv2d(x, block.conv.weight, stride=stride, padding=dilation, dilation=dilation, groups=2)
    assert block(x).shape[-2:] == RepBlock(4, 6, stride=stride, groups=2)(x.float()).shape[-2:]
    assert max_errors(block.bn(expected), block(x))[0] < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_a_large_depthwise_kernel_with_dilated_branches_deploys_through_its_checked_fold(dtype, tol):
    """UniRepLKNet's 13x13 with its five branches (dilation up to 5): the fold check's probe covers every tap."""
    block = _trained_like(RepBlock(8, 8, groups=8, kernel_size=13, extra_kernels="unireplk", act=None), dtype)
    assert [branch.conv.dilation[0] for branch in block.conv_extra] == [1, 2, 3, 4, 5]
    x = torch.randn(2, 8, 17, 15, dtype=dtype)
    expected = block(x)
    kernel, bias = block.get_equivalent_kernel_bias()
    form = block.deploy_form(verify=True)
    assert form.module is block and block.deploy and block.conv_extra is None
    assert torch.equal(kernel, block.reparam.weight) and torch.equal(bias, block.reparam.bias)
    assert max_errors(expected, block(x))[1] < tol


def test_a_wrong_outer_tap_of_a_dilated_branch_is_caught_by_the_fold_check(monkeypatch):
    """The probe covers the dilated receptive field: an error in the corner tap only the dilation reaches is a FoldError."""
    import repblocks.blocks
    from repblocks.errors import FoldError

    real = repblocks.blocks.fused_kernel_bias

    def corner_off(*args, **kwargs):
        kernel, bias = real(*args, **kwargs)
        kernel[..., 0, 0] += 1e-3  # (C, 1, 7, 7): the 3x3 at dilation 3's corner tap
        return kernel, bias

    block = _trained_like(RepBlock(4, 4, groups=4, kernel_size=7, extra_kernels=((3, 3),), act=None), torch.float64)
    copy.deepcopy(block).deploy_form(verify=True)  # the true fold passes
    monkeypatch.setattr(repblocks.blocks, "fused_kernel_bias", corner_off)
    with pytest.raises(FoldError):
        block.deploy_form(verify=True)
