"""ACNet's and DBB's blocks as published (their code, read from a mirror: tests/upstream_blocks.py) against our RepBlock.

Their weights, renamed by :func:`repblocks.layouts.to_repblocks_layout`, load into a RepBlock built from
the ``"acnet"`` / ``"dbb"`` branch set, depthwise included: the train forms must compute the same
function, in eval mode and in training mode (batch statistics), and their own deploy conversion must
give our fused kernel and bias. BN statistics and the identity-based 1x1 are randomized, BN biases
included, so that a border padded with zeros instead of the BN's shift shows. Skipped without the
mirror; tests/test_upstream_blocks.py checks committed files made by the same code.
"""

import copy

import pytest
import torch

from repblocks import RepBlock, load_weights
from repblocks.blocks import BRANCH_SETS
from repblocks.layouts import to_repblocks_layout
from repblocks.numerics import max_errors, randomize_bn_

from .upstream_blocks import upstream_modules

# (in, out, stride, groups, kernel, input height, width): dense, strided, grouped, depthwise, 5x5 kernels, odd sizes.
SHAPES = [
    (4, 4, 1, 1, 3, 7, 7),
    (4, 8, 2, 1, 3, 7, 6),
    (6, 6, 1, 2, 3, 5, 5),
    (6, 12, 2, 3, 5, 9, 7),
    (8, 8, 1, 8, 3, 7, 5),
    (8, 8, 2, 8, 5, 7, 7),
]
DBB_AVG_FLOAT32 = 1e-7
IDS = [f"{cin}-{cout}-s{stride}-g{groups}-k{k}-{h}x{w}" for cin, cout, stride, groups, k, h, w in SHAPES]


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    module = randomize_bn_(module.double(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("idconv1.weight", "conv1.weight")):  # zero at init: make the grouped layout matter
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return module


def _check_same_function(theirs, ours, shape):
    x = torch.randn(shape, dtype=torch.float64)
    worst = 0.0
    for training in (False, True):  # eval: running statistics; training: batch statistics, padding as DBB's
        theirs.train(training), ours.train(training)
        with torch.no_grad():
            expected = theirs(x)
            worst = max(worst, max_errors(expected, ours(x))[1])
    theirs.eval(), ours.eval()
    return x, worst


@pytest.mark.parametrize(("cin", "cout", "stride", "groups", "k", "h", "w"), SHAPES, ids=IDS)
def test_dbb_train_form_and_its_deploy_conversion_are_ours(cin, cout, stride, groups, k, h, w):
    dbb = upstream_modules("dbb").diversebranchblock
    theirs = _randomized(dbb.DiverseBranchBlock(cin, cout, k, stride, padding=k // 2, groups=groups), seed=cin)
    ours = RepBlock(cin, cout, stride=stride, groups=groups, kernel_size=k, **BRANCH_SETS["dbb"], act=None).double()
    ours.load_state_dict(to_repblocks_layout(theirs.state_dict()))  # strict: DBB's branches are ours, depthwise too
    x, worst = _check_same_function(theirs, ours, (2, cin, h, w))
    assert worst < 1e-12
    with torch.no_grad():
        reference = theirs(x)
        theirs.switch_to_deploy()
        ours.switch_to_deploy()
        assert max_errors(reference, ours(x))[1] < 1e-12
        # DBB builds its average kernel in float32 (transV_avg) whatever the model's dtype: its fused conv is
        # off from its own train form by ~1e-9 in float64, ours is not (above).
        assert max_errors(theirs(x), ours(x))[1] < DBB_AVG_FLOAT32
    assert max_errors(theirs.dbb_reparam.weight, ours.reparam.weight)[1] < DBB_AVG_FLOAT32
    assert max_errors(theirs.dbb_reparam.bias, ours.reparam.bias)[1] < DBB_AVG_FLOAT32


@pytest.mark.parametrize(("cin", "cout", "stride", "groups", "k", "h", "w"), SHAPES, ids=IDS)
def test_acnet_train_form_and_its_deploy_conversion_are_ours(cin, cout, stride, groups, k, h, w):
    acb = upstream_modules("acnet").acb
    theirs = _randomized(acb.ACBlock(cin, cout, k, stride, padding=k // 2, groups=groups), seed=cin)
    ours = RepBlock(cin, cout, stride=stride, groups=groups, kernel_size=k, **BRANCH_SETS["acnet"], act=None).double()
    ours.load_state_dict(to_repblocks_layout(theirs.state_dict()))
    x, worst = _check_same_function(theirs, ours, (2, cin, h, w))
    assert worst < 1e-12
    with torch.no_grad():
        theirs.switch_to_deploy()
        ours.switch_to_deploy()
        assert max_errors(theirs(x), ours(x))[1] < 1e-12
    assert max_errors(theirs.fused_conv.weight, ours.reparam.weight)[1] < 1e-13
    assert max_errors(theirs.fused_conv.bias, ours.reparam.bias)[1] < 1e-13


@pytest.mark.parametrize("family", ["dbb", "acnet"])
def test_upstream_train_form_weights_load_into_our_deploy_form(family):
    """A deploy-form RepBlock fuses DBB's / ACNet's train-form weights on loading, as its own."""
    modules = upstream_modules(family)
    build = modules.diversebranchblock.DiverseBranchBlock if family == "dbb" else modules.acb.ACBlock
    theirs = _randomized(build(6, 12, 3, 2, padding=1, groups=3), seed=5).eval()
    deployed = RepBlock(6, 12, stride=2, groups=3, **BRANCH_SETS[family], act=None, deploy=True).double().eval()
    load_weights(deployed, theirs.state_dict())  # their own keys
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        assert max_errors(theirs(x), deployed(x))[1] < 1e-12
        reference = copy.deepcopy(theirs)
        reference.switch_to_deploy()
        assert max_errors(reference(x), deployed(x))[1] < (DBB_AVG_FLOAT32 if family == "dbb" else 1e-12)
