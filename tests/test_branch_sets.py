"""The general block: every branch set (RepVGG, MobileOne, QARepVGG, QARepVGG v2 and any mix) fuses exactly.

Forward semantics are checked against explicit functional computations of each family's published block,
fusion against the block's own forward, with BatchNorm statistics randomized throughout.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repblocks
from repblocks import RepBlock, load_weights
from repblocks.numerics import max_errors, randomize_bn_

QAREPVGG = dict(scale_branch="conv", identity_branch="plain", post_bn=True)
QAREPVGG_V2 = dict(QAREPVGG, avg_pool_branch=True)
MOBILEONE = dict(num_conv_branches=4)


def _trained_like(block: nn.Module, dtype=torch.float64) -> nn.Module:
    return randomize_bn_(block).to(dtype).eval()


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


def test_qarepvgg_v2_block_is_yolov6s_sum_written_out():
    """YOLOv6's QARepVGGBlockV2: bn(bn3(conv3(x)) + conv1(x) + x + avgpool3(x)), then ReLU."""
    block = _trained_like(RepBlock(6, 6, **QAREPVGG_V2))
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    dense = _bn(F.conv2d(x, block.conv_kxk.conv.weight, padding=1), block.conv_kxk.bn)
    pooled = F.avg_pool2d(x, 3, stride=1, padding=1)  # count_include_pad=True, as nn.AvgPool2d's default
    expected = torch.relu(_bn(dense + F.conv2d(x, block.conv_1x1.weight) + x + pooled, block.post_bn))
    assert max_errors(expected, block(x))[1] < 1e-13
    block.switch_to_deploy()
    assert max_errors(expected, block(x))[1] < 1e-12


def test_mobileone_block_is_apples_sum_written_out():
    """apple's MobileOneBlock: k Conv+BN branches + 1x1 Conv+BN + identity BN, then ReLU; depthwise here."""
    block = _trained_like(RepBlock(8, 8, groups=8, **MOBILEONE))
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    out = _bn(F.conv2d(x, block.conv_1x1.conv.weight, groups=8), block.conv_1x1.bn) + _bn(x, block.identity)
    for branch in block.conv_kxk:
        out = out + _bn(F.conv2d(x, branch.conv.weight, padding=1, groups=8), branch.bn)
    assert len(block.conv_kxk) == 4
    assert max_errors(torch.relu(out), block(x))[1] < 1e-13
    block.switch_to_deploy()
    assert max_errors(torch.relu(out), block(x))[1] < 1e-12


@pytest.mark.parametrize(
    "kwargs,stride,has,summed",
    [
        (QAREPVGG_V2, 1, {"conv_kxk", "conv_1x1", "identity", "avg_pool", "post_bn"}, 4),
        (QAREPVGG_V2, 2, {"conv_kxk", "conv_1x1", "post_bn"}, 2),  # no identity or pool across a stride
        (dict(scale_branch=None, identity_branch=None), 1, {"conv_kxk"}, 1),
        (dict(num_conv_branches=3, scale_branch=None), 1, {"conv_kxk", "identity"}, 4),
    ],
)
def test_branches_exist_as_asked_and_where_shapes_allow(kwargs, stride, has, summed):
    block = RepBlock(4, 4, stride=stride, **kwargs)
    names = ("conv_kxk", "conv_1x1", "identity", "avg_pool", "post_bn")
    assert {name for name in names if getattr(block, name) is not None} == has
    assert len(block.branches()) == summed


def _random_block(rng: torch.Generator) -> tuple[RepBlock, tuple[int, ...]]:
    def pick(options):
        return options[torch.randint(len(options), (1,), generator=rng).item()]

    groups = pick([1, 1, 2, 3, 4])
    in_ch = groups * pick([1, 2, 3])
    out_ch = pick([in_ch, in_ch, groups * pick([1, 2, 4])])
    kernel_size = pick([1, 3, 3, 5])
    block = RepBlock(
        in_ch,
        out_ch,
        stride=pick([1, 1, 2]),
        groups=groups,
        kernel_size=kernel_size,
        num_conv_branches=pick([None, 1, 2, 4]),
        scale_branch=pick(["bn", "conv", None]),
        identity_branch=pick(["bn", "plain", None]),
        avg_pool_branch=pick([False, True]),
        post_bn=pick([False, True]),
        use_se=pick([False, True]),
    )
    return block, (2, in_ch, pick([5, 7, 8]), pick([6, 9]))


@pytest.mark.parametrize("seed", range(40))
def test_random_branch_sets_fuse_exactly(seed):
    """Branch sets nobody thought to list, at any stride, groups and kernel size, in float64 and float32."""
    block, shape = _random_block(torch.Generator().manual_seed(seed))
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        train = _trained_like(copy.deepcopy(block), dtype)
        x = torch.randn(shape, dtype=dtype)
        expected = train(x)
        kernel, bias = train.get_equivalent_kernel_bias()
        kept = copy.deepcopy(train).switch_to_deploy(keep_post_bn=True)
        deployed = copy.deepcopy(train).switch_to_deploy()
        assert max_errors(expected, deployed(x))[1] < tolerance, (dtype, block)
        assert max_errors(expected, kept(x))[1] < tolerance, (dtype, block)
        assert torch.allclose(kernel, deployed.reparam.weight) and torch.allclose(bias, deployed.reparam.bias)
        assert (kept.post_bn is not None) == block.branch_config["post_bn"] and deployed.post_bn is None
        kept.switch_to_deploy()  # a kept post-sum BN folds later, on request
        assert kept.post_bn is None and max_errors(expected, kept(x))[1] < tolerance


@pytest.mark.parametrize("kwargs", [QAREPVGG, QAREPVGG_V2, MOBILEONE], ids=["qarepvgg", "qarepvgg_v2", "mobileone"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_branch_sets_fuse_in_float64_and_round_once(kwargs, dtype):
    block = _trained_like(RepBlock(8, 8, **kwargs), dtype)
    wide = copy.deepcopy(block).double().switch_to_deploy()
    block.switch_to_deploy()
    assert block.reparam.weight.dtype == dtype
    assert torch.equal(block.reparam.weight, wide.reparam.weight.to(dtype))
    assert torch.equal(block.reparam.bias, wide.reparam.bias.to(dtype))


@pytest.mark.parametrize("kwargs", [{}, QAREPVGG_V2, MOBILEONE], ids=["repvgg", "qarepvgg_v2", "mobileone"])
def test_kernel_parameters_are_exactly_those_the_equivalent_kernel_depends_on(kwargs):
    """The RepVGG L2 penalty decays kernel_parameters(): they must be what the fused kernel moves with."""
    block = _trained_like(RepBlock(4, 4, **kwargs), torch.float32)
    kernel, _ = block.get_equivalent_kernel_bias()
    kernel.square().sum().backward()
    moved = {id(p) for p in block.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {id(p) for p in block.kernel_parameters()}
    assert len(moved) >= 3


def test_a_model_keeps_only_its_post_sum_batchnorms_for_quantization_aware_training():
    model = _trained_like(repblocks.create_model("qarepvgg_tiny", num_classes=10))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    kept = repblocks.switch_to_deploy(model, keep_post_bn=True)
    blocks = [m for m in kept.modules() if isinstance(m, RepBlock)]
    batch_norms = [m for m in kept.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batch_norms) == len(blocks) and all(b.post_bn is not None and b.deploy for b in blocks)
    assert max_errors(model(x), kept(x))[1] < 1e-12
    folded = repblocks.switch_to_deploy(kept)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert max_errors(model(x), folded(x))[1] < 1e-12


@pytest.mark.parametrize("keep_post_bn", [False, True], ids=["folded", "kept"])
def test_every_form_of_a_qarepvgg_block_loads_into_every_deploy_form(keep_post_bn):
    """Train form, or deploy form with the post-sum BN kept (YOLOv6's), into a fused block that folds or keeps it."""
    train = _trained_like(RepBlock(8, 8, **QAREPVGG_V2))
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    sources = {"train": train.state_dict(), "kept": copy.deepcopy(train).switch_to_deploy(keep_post_bn=True)}
    sources["kept"] = sources["kept"].state_dict()
    assert set(sources["kept"]) > {"reparam.weight", "post_bn.running_var"}
    for form, weights in sources.items():
        target = RepBlock(8, 8, **QAREPVGG_V2, deploy=True, keep_post_bn=keep_post_bn).double().eval()
        load_weights(target, weights)
        assert (target.post_bn is not None) == keep_post_bn
        assert max_errors(train(x), target(x))[1] < 1e-12, form


def test_a_missing_branch_of_a_new_kind_is_named_not_filled():
    weights = _trained_like(RepBlock(8, 8, **QAREPVGG)).state_dict()
    del weights["conv_1x1.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(conv_1x1\.weight\)"):
        load_weights(RepBlock(8, 8, **QAREPVGG, deploy=True).double(), weights)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scale_branch": "gn"}, "scale_branch must be one of bn, conv or None, got 'gn'"),
        ({"identity_branch": True}, "identity_branch must be one of bn, plain or None, got True"),
        ({"num_conv_branches": 0}, "num_conv_branches must be an integer >= 1, got 0"),
    ],
)
def test_bad_branch_arguments_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        RepBlock(8, 8, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # builds and converts two B0s: seconds on 2 cores
def test_qarepvgg_b0_has_the_authors_parameter_count_and_repvggs_deploy_form():
    """15,808,616 train-form parameters: the QARepVGG authors' B0 training log (cxxgtxy/QARepVGG, B0_log.txt)."""
    from repblocks.profile import count_params

    qa, plain = repblocks.create_model("qarepvgg_b0"), repblocks.create_model("repvgg_b0")
    assert count_params(qa) == 15_808_616
    deployed = [repblocks.switch_to_deploy(model) for model in (qa, plain)]
    assert {k: v.shape for k, v in deployed[0].state_dict().items()} == {
        k: v.shape for k, v in deployed[1].state_dict().items()
    }
