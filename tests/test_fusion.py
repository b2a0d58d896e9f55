"""The algebra under re-parameterization, checked against explicit multi-branch computations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repblocks.fusion import (
    equivalent_kernel_bias,
    fold_bn,
    fuse_conv_bn,
    fused_kernel_bias,
    identity_kernel,
    pad_kernel,
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
