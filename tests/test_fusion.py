"""The algebra under re-parameterization, checked against explicit multi-branch computations."""

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repblocks.fusion import (
    ConvBranch,
    IdentityBranch,
    average_linears,
    dilate_kernel,
    equivalent_kernel_bias,
    fold_bn,
    fold_bn_into_linear,
    fuse_conv_bn,
    fused_kernel_bias,
    identity_kernel,
    pad_kernel,
    scaled_sum,
)
from repblocks.numerics import max_errors, randomize_bn_


def test_three_convs_sum_to_one_fused_conv():
    """The seeds' experiment: conv3x3(x) + conv1x1(x) + x is one 3x3 conv."""
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    k3 = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    k1 = torch.randn(8, 8, 1, 1, dtype=torch.float64)
    branches = F.conv2d(x, k3, padding=1) + F.conv2d(x, k1) + x
    fused = k3 + pad_kernel(k1, 3) + identity_kernel(8, 3, dtype=torch.float64)
    assert torch.allclose(F.conv2d(x, fused, padding=1), branches, rtol=0, atol=1e-12)


def test_conv_bn_pair_is_one_conv_with_bias():
    """The seeds' experiment: Conv+BN in eval mode equals a conv with bias."""
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = randomize_bn_(nn.BatchNorm2d(6).double()).eval()
    x = torch.randn(3, 4, 10, 10, dtype=torch.float64)
    kernel, bias = fuse_conv_bn(conv, bn)
    assert torch.allclose(F.conv2d(x, kernel, bias, padding=1), bn(conv(x)), atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_identity_kernel_is_the_identity_for_any_groups(groups):
    x = torch.randn(2, 8, 7, 7)
    kernel = identity_kernel(8, 3, groups=groups)
    assert kernel.shape == (8, 8 // groups, 3, 3)
    assert torch.equal(F.conv2d(x, kernel, padding=1, groups=groups), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_identity_kernel_follows_requested_dtype(dtype):
    assert identity_kernel(4, 3, dtype=dtype).dtype == dtype


def test_identity_kernel_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="divisible"):
        identity_kernel(6, 3, groups=4)


def test_pad_kernel_centres_and_rejects_what_cannot_centre():
    padded = pad_kernel(torch.ones(2, 2, 1, 1), 5)
    assert padded.shape == (2, 2, 5, 5) and padded[..., 2, 2].eq(1).all() and padded.sum() == 4
    with pytest.raises(ValueError, match="cannot centre"):
        pad_kernel(torch.ones(1, 1, 2, 2), 3)


def _branches(out_ch, in_per_group, dtype=torch.float32):
    bns = [randomize_bn_(nn.BatchNorm2d(out_ch), seed=s).to(dtype).eval() for s in range(3)]
    k3 = torch.randn(out_ch, in_per_group, 3, 3, dtype=dtype)
    k1 = torch.randn(out_ch, in_per_group, 1, 1, dtype=dtype)
    return [(k3, bns[0]), (k1, bns[1])], bns[2]


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_equivalent_kernel_matches_explicit_dense_construction(groups):
    branches, identity_bn = _branches(8, 8 // groups, torch.float64)
    (k3, bn3), (k1, bn1) = branches
    dense = [
        fold_bn(k3, bn3),
        fold_bn(pad_kernel(k1, 3), bn1),
        fold_bn(identity_kernel(8, groups=groups, dtype=torch.float64), identity_bn),
    ]
    kernel, bias = equivalent_kernel_bias(branches, identity_bn, kernel_size=3)
    assert torch.allclose(kernel, sum(k for k, _ in dense), atol=1e-14)
    assert torch.allclose(bias, sum(b for _, b in dense), atol=1e-14)


def test_chunked_conversion_equals_differentiable_path_bit_for_bit():
    branches, identity_bn = _branches(70, 70)  # 70 rows: a partial last chunk
    reference = equivalent_kernel_bias(branches, identity_bn, kernel_size=3)
    chunked = fused_kernel_bias(branches, identity_bn, kernel_size=3, rows_per_chunk=16)
    assert torch.equal(reference[0], chunked[0]) and torch.equal(reference[1], chunked[1])


def test_equivalent_kernel_is_differentiable():
    branches, identity_bn = _branches(4, 4)
    params = [branches[0][0].requires_grad_(), branches[0][1].weight, identity_bn.weight]
    kernel, bias = equivalent_kernel_bias(branches, identity_bn, kernel_size=3)
    (kernel.square().sum() + bias.square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folds_as_accurately_as_its_dtype_allows(dtype):
    """Folding in float64 and rounding once gives the correctly rounded float64 result."""
    branches, identity_bn = _branches(16, 16, dtype)
    kernel, bias = equivalent_kernel_bias(branches, identity_bn, kernel_size=3)
    wide = [(k.double(), copy.deepcopy(bn).double()) for k, bn in branches]
    ref_kernel, ref_bias = equivalent_kernel_bias(wide, copy.deepcopy(identity_bn).double(), kernel_size=3)
    assert kernel.dtype == dtype
    assert torch.equal(kernel, ref_kernel.to(dtype)) and torch.equal(bias, ref_bias.to(dtype))
    # Folding in the half dtype itself, as naive code does, rounds at every step and loses accuracy.
    k3, bn3 = branches[0]
    naive = k3 * (bn3.weight / (bn3.running_var + bn3.eps).sqrt()).reshape(-1, 1, 1, 1)
    exact = fold_bn(k3, bn3)[0]
    assert max_errors(exact, naive)[0] > max_errors(exact, exact.to(dtype))[0]


# --- issue 26's algebra: dilated, scaled and signed branches, several identities, sums of fused convs, Linear folds


def _bn(channels: int, seed: int, dims: int = 2) -> nn.Module:
    bn = nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    return randomize_bn_(bn.double(), seed=seed).eval()


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2), (6, 1), (6, 2)])
def test_dilated_kernel_is_the_dense_kernel_at_dilation_one(dilation, groups, stride):
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    kernel = torch.randn(6, 6 // groups, 3, 3, dtype=torch.float64)
    dilated = F.conv2d(x, kernel, stride=stride, padding=dilation, dilation=dilation, groups=groups)
    dense = dilate_kernel(kernel, dilation)
    assert dense.shape[-2:] == (2 * dilation + 1,) * 2
    assert max_errors(dilated, F.conv2d(x, dense, stride=stride, padding=dilation, groups=groups))[0] < 1e-12


def test_dilate_kernel_refuses_a_bad_dilation():
    with pytest.raises(ValueError, match="dilation must be an integer >= 1, got 0"):
        dilate_kernel(torch.zeros(1, 1, 3, 3), 0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("groups,stride", [(1, 1), (8, 1), (8, 2), (2, 2)])
def test_dilated_signed_and_per_channel_scaled_branches_fuse_exactly(dtype, tolerance, groups, stride):
    """7x7 Conv+BN, a 3x3 at dilation 3 through its BN times a per-channel scale, a biased 1x1 times -1, identities."""
    x = torch.randn(2, 8, 12, 10, dtype=torch.float64)
    k7, k3 = (
        torch.randn(8, 8 // groups, 7, 7, dtype=torch.float64),
        torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64),
    )
    k1, bias1 = torch.randn(8, 8 // groups, 1, 1, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    bn7, bn3, bn_id = _bn(8, 1), _bn(8, 2), _bn(8, 3)
    layer_scale = torch.randn(8, 1, 1, dtype=torch.float64)  # timm's (C, 1, 1)
    conv = partial(F.conv2d, stride=stride, groups=groups)
    out = bn7(conv(x, k7, padding=3)) + layer_scale * bn3(conv(x, k3, padding=3, dilation=3)) - conv(x, k1, bias1)
    identities = []
    if stride == 1:
        out = out + 0.5 * bn_id(x) - layer_scale * x
        identities = [IdentityBranch(bn_id, 0.5), IdentityBranch(scale=-layer_scale)]
    branches = [
        (k7.to(dtype), bn7.to(dtype)),  # today's pairs beside ConvBranch
        ConvBranch(k3.to(dtype), bn3.to(dtype), dilation=3, scale=layer_scale.to(dtype)),
        ConvBranch(k1.to(dtype), bias=bias1.to(dtype), scale=-1.0),
    ]
    kernel, bias = equivalent_kernel_bias(branches, None, kernel_size=7, identities=identities)
    chunked = fused_kernel_bias(branches, None, kernel_size=7, identities=identities, rows_per_chunk=3)
    assert kernel.dtype == dtype and torch.equal(kernel, chunked[0]) and torch.equal(bias, chunked[1])
    fused = F.conv2d(x, kernel.double(), bias.double(), stride=stride, padding=3, groups=groups)
    assert max_errors(out, fused)[1] < tolerance


def test_scaled_identity_as_the_identity_argument():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    kernel = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    bn = _bn(4, 4)
    fused = equivalent_kernel_bias([(kernel, None)], IdentityBranch(bn, scale=-1), kernel_size=3)
    assert max_errors(F.conv2d(x, kernel, padding=1) - bn(x), F.conv2d(x, *fused, padding=1))[0] < 1e-12


def test_scaled_sum_composes_fused_convs():
    """RepMixer's shape: x + ls * (mixer(x) - norm(x)), each already one conv with a bias."""
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    mixer, mixer_bias = torch.randn(6, 1, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    norm, norm_bias = torch.randn(6, 1, 1, 1, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ls = torch.randn(6, 1, 1, dtype=torch.float64)
    conv = partial(F.conv2d, groups=6)
    expected = x + ls * (conv(x, mixer, mixer_bias, padding=1) - conv(x, norm, norm_bias))
    terms = [(1.0, identity_kernel(6, 1, groups=6, dtype=torch.float64), None), (ls, mixer, mixer_bias)]
    kernel, bias = scaled_sum([*terms, (-ls, norm, norm_bias)], kernel_size=3)
    assert max_errors(expected, conv(x, kernel, bias, padding=1))[0] < 1e-12
    with pytest.raises(ValueError, match="one value per output channel"):
        scaled_sum([(torch.ones(5), mixer, None)], kernel_size=3)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_bn_then_linear_is_one_linear(dtype, tolerance):
    """RepViT's BN_Linear (BatchNorm1d -> Linear), and a BatchNorm2d before pooling or flattening."""
    linear = nn.Linear(12, 5).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    bn = _bn(12, 5, dims=1)
    weight, bias = fold_bn_into_linear(bn.to(dtype), linear.to(dtype))
    assert weight.dtype == dtype
    assert max_errors(linear.double()(bn.double()(x)), F.linear(x, weight.double(), bias.double()))[1] < tolerance
    bn2d, images = _bn(3, 6), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    flat = nn.Linear(12, 4, bias=False).double()  # flatten of (3, 2, 2): channel-major
    weight, bias = fold_bn_into_linear(bn2d, flat)
    assert max_errors(flat(bn2d(images).flatten(1)), F.linear(images.flatten(1), weight, bias))[0] < 1e-12
    pooled = nn.Linear(3, 4).double()
    weight, bias = fold_bn_into_linear(bn2d, pooled)
    assert max_errors(pooled(bn2d(images).mean((2, 3))), F.linear(images.mean((2, 3)), weight, bias))[0] < 1e-12
    with pytest.raises(ValueError, match="BatchNorm of 5 channels cannot precede a Linear of 12"):
        fold_bn_into_linear(_bn(5, 0, dims=1), linear)


def test_averaged_heads_are_one_linear():
    """The distillation head at eval: (head(x) + head_dist(x)) / 2, BN -> Linear folds averaged too."""
    head, head_dist = nn.Linear(8, 3).double(), nn.Linear(8, 3).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    weight, bias = average_linears([head, head_dist])
    assert max_errors((head(x) + head_dist(x)) / 2, F.linear(x, weight, bias))[0] < 1e-12
    bn, bn_dist = _bn(8, 1, dims=1), _bn(8, 2, dims=1)
    weight, bias = average_linears([fold_bn_into_linear(bn, head), fold_bn_into_linear(bn_dist, head_dist)])
    assert max_errors((head(bn(x)) + head_dist(bn_dist(x))) / 2, F.linear(x, weight, bias))[0] < 1e-12
    with pytest.raises(ValueError, match="one weight shape"):
        average_linears([head, nn.Linear(8, 2)])


def test_new_algebra_is_differentiable():
    """gradcheck through dilation, per-channel scales, scaled identities, scaled sums and the Linear folds."""
    kernel = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fused(kernel, scale, bias):
        branches = [ConvBranch(kernel, bias=bias, dilation=2, scale=scale), ConvBranch(kernel, scale=-scale)]
        return equivalent_kernel_bias(branches, IdentityBranch(scale=scale), kernel_size=5)

    assert torch.autograd.gradcheck(fused, (kernel, scale, bias))
    assert torch.autograd.gradcheck(
        lambda k, s: scaled_sum([(s, k, None), (1.0, k, s)], kernel_size=3), (kernel, scale)
    )
    bn = _bn(2, 0, dims=1)
    weight = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(2, dtype=torch.float64, requires_grad=True)

    def folded(weight, gamma):  # modules as plain namespaces, so the graph reaches the inputs
        norm = SimpleNamespace(
            running_mean=bn.running_mean, running_var=bn.running_var, eps=bn.eps, weight=gamma, bias=bias
        )
        linear = SimpleNamespace(weight=weight, bias=None)
        return (
            *fold_bn_into_linear(norm, linear),
            average_linears([(weight, bias[:1].expand(3)), (weight * 2, None)])[0],
        )

    assert torch.autograd.gradcheck(folded, (weight, gamma))
