"""The general block: every branch set (RepVGG, MobileOne, QARepVGG, QARepVGG v2, ACNet, DBB and any mix) fuses exactly.

Forward semantics are checked against explicit functional computations of each family's published block,
fusion against the block's own forward, with BatchNorm statistics randomized throughout.
"""

import copy
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repblocks
from repblocks import RepBlock, load_weights
from repblocks.blocks import BRANCH_SETS
from repblocks.fusion import equivalent_kernel_bias, fused_kernel_bias
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.sequences import AvgSequence, ConvSequence, IdentityConv1x1

QAREPVGG = dict(scale_branch="conv", identity_branch="plain", post_bn=True)
QAREPVGG_V2 = dict(QAREPVGG, avg_pool_branch=True)
MOBILEONE = dict(num_conv_branches=4)
ACNET, DBB = BRANCH_SETS["acnet"], BRANCH_SETS["dbb"]
EVERY_KIND = dict(asym_branches=True, seq_conv_branch=True, seq_avg_branch=True)  # beside RepVGG's three
EVERY_KIND_MODULES = ("conv_1xk", "conv_kx1", "conv_1x1_kxk", "conv_1x1_avg")


def _trained_like(block: nn.Module, dtype=torch.float64) -> nn.Module:
    """Random BN statistics and affine parameters, and a DBB identity-based 1x1 that is no longer the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, IdentityConv1x1):
                module.weight.copy_(0.3 * torch.randn(module.weight.shape, generator=generator))
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
        (ACNET, 1, {"conv_kxk", "conv_1xk", "conv_kx1"}, 3),
        (DBB, 1, {"conv_kxk", "conv_1x1", "conv_1x1_kxk", "conv_1x1_avg"}, 4),
        (DBB, 2, {"conv_kxk", "conv_1x1", "conv_1x1_kxk", "conv_1x1_avg"}, 4),  # sequences stride with the block
    ],
)
def test_branches_exist_as_asked_and_where_shapes_allow(kwargs, stride, has, summed):
    block = RepBlock(4, 4, stride=stride, **kwargs)
    names = ("conv_kxk", "conv_1x1", "identity", "avg_pool", "post_bn", *EVERY_KIND_MODULES)
    assert {name for name in names if getattr(block, name) is not None} == has
    assert len(block.branches()) == summed


def _random_block(rng: torch.Generator) -> tuple[RepBlock, tuple[int, ...]]:
    def pick(options):
        return options[torch.randint(len(options), (1,), generator=rng).item()]

    groups = pick([1, 1, 2, 3, 4])
    in_ch = groups * pick([1, 2, 3])
    out_ch = pick([in_ch, in_ch, groups * pick([1, 2, 4])])
    kernel_size = pick([1, 3, 3, 5])
    kwargs = dict(
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
    shape = (2, in_ch, pick([5, 7, 8]), pick([6, 9]))
    # ACNet's and DBB's kinds drawn last, so that the sets drawn before they existed stay as they were.
    kwargs.update({name: pick([False, True]) for name in EVERY_KIND})
    # Issue 26's kinds after those: smaller and dilated kernels that fit the block's, a 1x1 with a bias.
    fitting = {1: [((1, 1),)], 3: [((1, 1),), ((3, 1), (1, 1))], 5: [((3, 2),), ((3, 1), (1, 1), (3, 2)), "unireplk"]}
    kwargs["extra_kernels"] = pick([None, *fitting[kernel_size]])
    if kwargs["scale_branch"] == "conv" and pick([False, True]):
        kwargs["scale_branch"] = "conv_bias"
    return RepBlock(in_ch, out_ch, **kwargs), shape


@pytest.mark.parametrize("seed", range(80))
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


@pytest.mark.parametrize(
    "kwargs",
    [QAREPVGG, QAREPVGG_V2, MOBILEONE, ACNET, DBB],
    ids=["qarepvgg", "qarepvgg_v2", "mobileone", "acnet", "dbb"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_branch_sets_fuse_in_float64_and_round_once(kwargs, dtype):
    block = _trained_like(RepBlock(8, 8, **kwargs), dtype)
    wide = copy.deepcopy(block).double().switch_to_deploy()
    block.switch_to_deploy()
    assert block.reparam.weight.dtype == dtype
    assert torch.equal(block.reparam.weight, wide.reparam.weight.to(dtype))
    assert torch.equal(block.reparam.bias, wide.reparam.bias.to(dtype))


@pytest.mark.parametrize(
    "kwargs",
    [{}, QAREPVGG_V2, MOBILEONE, ACNET, DBB, dict(EVERY_KIND, groups=4)],
    ids=["repvgg", "qarepvgg_v2", "mobileone", "acnet", "dbb", "every_kind_depthwise"],
)
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
        (
            {"scale_branch": "gn"},
            "scale_branch must be one of bn, conv, conv_bias, bn_unless_depthwise or None, got 'gn'",
        ),
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


# ---- ACNet's and DBB's branches: borders, strides, groups, odd sizes, gradients, loading ----

# (in, out, stride, groups, kernel, input height, width): a kernel larger than the input, strides over odd
# sizes, grouped and depthwise (DBB then widens its middle and drops the 1x1 before the pool), 1x1 kernels.
SHAPES = [
    (4, 4, 1, 1, 3, 5, 5),
    (4, 8, 2, 1, 3, 7, 7),
    (6, 6, 2, 3, 5, 7, 5),
    (8, 8, 1, 8, 3, 5, 7),
    (8, 8, 2, 8, 7, 5, 5),
    (8, 16, 1, 8, 5, 9, 6),
    (6, 6, 1, 2, 1, 5, 5),
]


@pytest.mark.parametrize(("cin", "cout", "stride", "groups", "k", "h", "w"), SHAPES)
@pytest.mark.parametrize("kwargs", [ACNET, DBB, EVERY_KIND], ids=["acnet", "dbb", "every_kind"])
def test_new_branch_kinds_fuse_exactly_at_any_stride_groups_and_size(kwargs, cin, cout, stride, groups, k, h, w):
    block = RepBlock(cin, cout, stride=stride, groups=groups, kernel_size=k, **kwargs, act=None)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        train = _trained_like(copy.deepcopy(block), dtype)
        x = torch.randn(2, cin, h, w, dtype=dtype)
        expected = train(x)
        _, rel_err = max_errors(expected, copy.deepcopy(train).switch_to_deploy()(x))
        assert rel_err < tolerance, dtype


def test_a_sequence_pads_with_what_its_first_bn_gives_a_zero_input():
    """DBB's 1x1 -> 3x3 written out: the 3x3 sees the 1x1+BN of the zero-padded input, not zero-padded BN outputs."""
    block = _trained_like(RepBlock(4, 4, groups=2, **DBB, act=None))
    seq = block.conv_1x1_kxk
    x = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    padded_input = F.pad(x, [1, 1, 1, 1])
    middle = _bn(F.conv2d(padded_input, seq.conv1.kernel(), groups=2), seq.bn1)  # the 1x1 sees zeros at the border
    expected = _bn(F.conv2d(middle, seq.conv2.weight, groups=2), seq.bn2)
    assert max_errors(expected, seq(x))[1] < 1e-14
    zero_padded = _bn(
        F.conv2d(F.pad(_bn(F.conv2d(x, seq.conv1.kernel(), groups=2), seq.bn1), [1] * 4), seq.conv2.weight, groups=2),
        seq.bn2,
    )
    border_error = (zero_padded - expected).abs()
    assert (
        border_error[..., 1:-1, 1:-1].max() < 1e-14 and border_error.max() > 1e-3
    )  # what zero padding would get wrong
    deployed = copy.deepcopy(block).switch_to_deploy()
    assert max_errors(block(x), deployed(x))[1] < 1e-12


def _kernel_inputs(block: RepBlock) -> dict[str, torch.Tensor]:
    """Every parameter of the block, as leaves that autograd may perturb."""
    return {name: param.detach().clone().requires_grad_() for name, param in block.named_parameters()}


@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_the_equivalent_kernel_of_every_kind_has_exact_gradients(groups):
    """gradcheck: get_equivalent_kernel_bias() is differentiable through sequences, asymmetric kernels and BNs."""
    block = _trained_like(RepBlock(4, 4, groups=groups, **EVERY_KIND, post_bn=True))
    params = _kernel_inputs(block)
    names = list(params)

    def kernel_bias(*values):
        with torch.nn.utils.stateless._reparametrize_module(block, dict(zip(names, values, strict=True))):
            return block.get_equivalent_kernel_bias()

    assert torch.autograd.gradcheck(kernel_bias, tuple(params.values()), fast_mode=True)


def test_the_train_form_has_the_gradients_of_its_fused_conv():
    """In eval mode the train form (DBB's shifted padding included) and conv2d(x, K(θ), b(θ)) are one function of θ."""
    block = _trained_like(RepBlock(6, 6, stride=2, groups=3, kernel_size=5, **EVERY_KIND, act=None))
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    weights = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    (block(x) * weights).sum().backward()
    through_branches = {name: param.grad.clone() for name, param in block.named_parameters()}
    block.zero_grad()
    kernel, bias = block.get_equivalent_kernel_bias()
    (F.conv2d(x, kernel, bias, stride=2, padding=2, groups=3) * weights).sum().backward()
    for name, param in block.named_parameters():
        assert max_errors(through_branches[name], param.grad)[1] < 1e-12, name


@pytest.mark.parametrize("family", ["acnet", "dbb"])
def test_a_model_of_new_branches_loads_its_train_form_into_its_deploy_form(family):
    from dataclasses import replace

    from repblocks.models.repvgg import REPVGG_CONFIGS, RepVGG

    cfg = replace(REPVGG_CONFIGS["repvgg_tiny_g2se"], block=family)
    train = _trained_like(RepVGG(cfg, num_classes=5))
    deployed = load_weights(RepVGG(cfg, num_classes=5, deploy=True).double().eval(), train.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert max_errors(train(x), deployed(x))[1] < 1e-12


@pytest.mark.parametrize(
    "key",
    ["conv_1x1_kxk.bn1.running_mean", "conv_1x1_kxk.conv1.weight", "conv_1x1_avg.avgbn.bias", "conv_kx1.conv.weight"],
)
def test_a_missing_acnet_or_dbb_branch_is_named_not_filled(key):
    weights = _trained_like(RepBlock(8, 8, **EVERY_KIND)).state_dict()
    del weights[key]
    with pytest.raises(ValueError, match=rf"missing keys \({re.escape(key)}\)"):
        load_weights(RepBlock(8, 8, **EVERY_KIND, deploy=True).double(), weights)


def test_branch_sets_resolve_from_names_and_dicts():
    assert repblocks.blocks.resolve_branch_set("dbb") == DBB
    assert repblocks.blocks.resolve_branch_set("dbb") is not DBB  # a copy: changing it changes no preset
    assert repblocks.blocks.resolve_branch_set(dict(asym_branches=True)) == dict(asym_branches=True)
    assert set(repblocks.blocks.BRANCH_SETS) == {
        *("repvgg", "qarepvgg", "qarepvgg_v2", "acnet", "dbb"),
        *("repghost", "repvggdw", "yolo_repconv", "repvit_dw", "unireplk"),
    }


@pytest.mark.parametrize(
    "branches,match",
    [
        ("dbbb", "unknown branch set 'dbbb'; known branch sets: repvgg, qarepvgg, qarepvgg_v2, acnet, dbb"),
        ({"asym": True, "seq": 1}, "unknown branch set keys asym, seq; a branch set may hold num_conv_branches, "),
        ({"seq_avg_branch": "yes"}, "seq_avg_branch must be True or False, got 'yes'"),
        (
            {"scale_branch": "gn"},
            "scale_branch must be one of bn, conv, conv_bias, bn_unless_depthwise or None, got 'gn'",
        ),
        (3, "a branch set is a name"),
    ],
)
def test_bad_branch_sets_are_one_line(branches, match):
    with pytest.raises(ValueError, match=match) as err:
        repblocks.blocks.resolve_branch_set(branches)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sequence_cls", [ConvSequence, AvgSequence])
def test_a_sequence_alone_is_one_conv_whatever_its_bn_epsilon(sequence_cls):
    """The fusion API takes a sequence beside any conv branch (here a zero one); every BN's eps is ``bn_eps``."""
    seq = _trained_like(sequence_cls(6, 12, 5, stride=2, groups=3, bn_eps=0.1))
    assert {module.eps for module in seq.modules() if isinstance(module, nn.BatchNorm2d)} == {0.1}
    zero = torch.zeros(12, 2, 5, 5, dtype=torch.float64)
    kernel, bias = equivalent_kernel_bias([(zero, None)], None, kernel_size=5, sequences=[seq.fusion_part()])
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    assert max_errors(seq(x), F.conv2d(x, kernel, bias, stride=2, padding=2, groups=3))[1] < 1e-12


@pytest.mark.parametrize("groups", [1, 3, 12], ids=["dense", "grouped", "depthwise"])
def test_conversion_chunks_rows_of_sequences_as_the_differentiable_kernel_does(groups):
    """fused_kernel_bias works through output channels a chunk at a time: chunks that split groups included."""
    block = _trained_like(RepBlock(12, 12, groups=groups, **EVERY_KIND, post_bn=True))
    conv_branches, identity, options = block._fusion_args(fold_post_bn=True)
    kernel, bias = equivalent_kernel_bias(conv_branches, identity, **options)
    chunked = fused_kernel_bias(conv_branches, identity, **options, rows_per_chunk=5)
    assert max_errors(kernel, chunked[0])[1] < 1e-15 and max_errors(bias, chunked[1])[1] < 1e-15


# ---- issue 26's branch sets: RepGhost, YOLOv10's RepVGGDW, YOLO's RepConv, RepViT's RepVggDw, UniRepLKNet ----


def test_repvggdw_block_is_yolov10s_sum_written_out():
    """YOLOv10's RepVGGDW: SiLU(bn(dw7x7(x)) + bn1(dw3x3(x))), no 1x1, no identity."""
    block = _trained_like(RepBlock(6, 6, groups=6, kernel_size=7, **BRANCH_SETS["repvggdw"], act="silu"))
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    (small,) = block.conv_extra
    expected = _bn(F.conv2d(x, block.conv_kxk.conv.weight, padding=3, groups=6), block.conv_kxk.bn)
    expected = F.silu(expected + _bn(F.conv2d(x, small.conv.weight, padding=1, groups=6), small.bn))
    assert {name for name, _ in block.named_children()} >= {"conv_kxk", "conv_extra"} and len(block.branches()) == 2
    assert max_errors(expected, block(x))[1] < 1e-13
    block.deploy_form()
    assert max_errors(expected, block(x))[1] < 1e-12


@pytest.mark.parametrize("kernel_size", [5, 7, 9, 11, 13, 15, 17])
@pytest.mark.parametrize("stride", [1, 2])
def test_unireplk_block_is_the_dilated_reparam_blocks_sum_written_out(kernel_size, stride):
    """UniRepLKNet's DilatedReparamBlock: origin_bn(lk_origin(x)) + sum of dil_bn(dil_conv(x)), depthwise."""
    block = _trained_like(RepBlock(4, 4, groups=4, kernel_size=kernel_size, stride=stride, **BRANCH_SETS["unireplk"]))
    x = torch.randn(1, 4, 19, 18, dtype=torch.float64)
    conv = partial(F.conv2d, stride=stride, groups=4)
    out = _bn(conv(x, block.conv_kxk.conv.weight, padding=kernel_size // 2), block.conv_kxk.bn)
    pairs = repblocks.blocks.UNIREPLK_EXTRA_KERNELS[kernel_size]
    assert [(b.conv.kernel_size[0], b.conv.dilation[0]) for b in block.conv_extra] == list(pairs)
    for (k, d), branch in zip(pairs, block.conv_extra, strict=True):
        out = out + _bn(conv(x, branch.conv.weight, padding=d * (k - 1) // 2, dilation=d), branch.bn)
    assert max_errors(torch.relu(out), block(x))[1] < 1e-13
    block.deploy_form()
    assert max_errors(torch.relu(out), block(x))[1] < 1e-12


@pytest.mark.parametrize("stride", [1, 2])
def test_repvit_dw_block_is_repvits_sum_written_out(stride):
    """RepViT's RepVggDw: bn(Conv2d_BN 3x3 dw (x) + Conv2d 1x1 dw with bias (x) + x); no identity across a stride."""
    block = _trained_like(RepBlock(6, 6, groups=6, stride=stride, **BRANCH_SETS["repvit_dw"], act=None))
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    out = _bn(F.conv2d(x, block.conv_kxk.conv.weight, padding=1, stride=stride, groups=6), block.conv_kxk.bn)
    out = out + F.conv2d(x, block.conv_1x1.weight, block.conv_1x1.bias, stride=stride, groups=6)
    expected = _bn(out + x if stride == 1 else out, block.post_bn)
    assert block.conv_1x1.bias is not None and block.conv_1x1.bias.abs().sum() > 0
    assert max_errors(expected, block(x))[1] < 1e-13
    block.deploy_form()
    assert max_errors(expected, block(x))[1] < 1e-12


def test_repghost_block_is_the_cheap_op_and_its_fusion_bn():
    """RepGhost's cheap op: bn(dw3x3(x)) + fusion_bn(x); yolo_repconv is RepVGG's set."""
    block = _trained_like(RepBlock(6, 6, groups=6, **BRANCH_SETS["repghost"], act=None))
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    expected = _bn(F.conv2d(x, block.conv_kxk.conv.weight, padding=1, groups=6), block.conv_kxk.bn) + _bn(
        x, block.identity
    )
    assert len(block.branches()) == 2 and max_errors(expected, block(x))[1] < 1e-13
    block.deploy_form()
    assert max_errors(expected, block(x))[1] < 1e-12
    assert RepBlock(4, 4, **BRANCH_SETS["yolo_repconv"]).branch_config == RepBlock(4, 4).branch_config


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(extra_kernels=((5, 2),)),
            r"extra_kernels \(5, 2\) must be an odd kernel and a dilation >= 1 spanning at most kernel_size 7",
        ),
        (dict(extra_kernels=((4, 1),)), r"extra_kernels \(4, 1\) must be an odd kernel"),
        (dict(extra_kernels="replk"), "extra_kernels must be .* or one of unireplk, got 'replk'"),
        (dict(extra_kernels=3), "extra_kernels must be \\(kernel, dilation\\) pairs"),
        (
            dict(extra_kernels="unireplk", kernel_size=3),
            "extra_kernels='unireplk' has branches for kernel_size 5, 7, 9",
        ),
    ],
)
def test_bad_extra_kernels_are_one_line_and_name_what_exists(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        RepBlock(4, 4, **{"kernel_size": 7, **kwargs})
    assert "\n" not in str(err.value)


def test_extra_kernels_from_a_config_list_are_kept_as_pairs_and_reload():
    block = _trained_like(RepBlock(4, 4, groups=4, kernel_size=7, extra_kernels=[[3, 1], [3, 3]]))
    assert block.branch_config["extra_kernels"] == ((3, 1), (3, 3))
    deployed = RepBlock(4, 4, groups=4, kernel_size=7, extra_kernels=[[3, 1], [3, 3]], deploy=True).double().eval()
    load_weights(deployed, block.state_dict())
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    assert max_errors(block(x), deployed(x))[1] < 1e-12
