"""repblocks.online: the OREPA-style online block against its branches computed one by one, and its deploy form."""

import copy

import pytest
import torch
from torch import nn

import repblocks
from repblocks.blocks import BRANCH_SETS, ConvBN, RepBlock
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.online import (
    BLOCK_MODES,
    ONLINE_BRANCH_SETS,
    OnlineRepBlock,
    online_block_from_conv,
    resolve_block_mode,
    resolve_online_branch_set,
)
from repblocks.sequences import IdentityConv1x1
from repblocks.train.losses import rep_l2, rep_l2_parameters

# (in_channels, out_channels, stride, groups, kernel_size, branch kwargs)
SHAPES = [
    pytest.param(8, 8, 1, 1, 3, {}, id="repvgg-identity"),
    pytest.param(8, 16, 2, 1, 3, {}, id="repvgg-stride2"),
    pytest.param(8, 8, 1, 2, 3, {"avg_pool_branch": True}, id="groups2-avgpool"),
    pytest.param(8, 8, 2, 8, 3, {"num_conv_branches": 3}, id="depthwise-stride2-k3branches"),
    pytest.param(6, 6, 1, 3, 5, {"avg_pool_branch": True, "num_conv_branches": 2}, id="k5-groups3"),
    pytest.param(8, 12, 1, 4, 1, {"scale_branch": None, "num_conv_branches": 2}, id="pointwise-mobileone"),
    pytest.param(8, 8, 1, 1, 3, {"scale_branch": "conv", "identity_branch": "plain", "post_bn": True}, id="qarepvgg"),
    pytest.param(8, 8, 1, 1, 3, {"identity_branch": None}, id="no-identity"),
    pytest.param(8, 8, 1, 1, 3, BRANCH_SETS["acnet"], id="acnet"),
    pytest.param(8, 16, 2, 2, 5, BRANCH_SETS["acnet"], id="acnet-k5-stride2-groups2"),
    pytest.param(8, 8, 1, 1, 3, BRANCH_SETS["dbb"], id="dbb"),
    pytest.param(8, 16, 2, 2, 3, BRANCH_SETS["dbb"], id="dbb-stride2-groups2"),
    pytest.param(8, 8, 2, 8, 3, BRANCH_SETS["dbb"], id="dbb-depthwise-stride2"),
    pytest.param(6, 6, 1, 1, 5, BRANCH_SETS["dbb"], id="dbb-k5"),
    pytest.param(8, 8, 1, 8, 3, BRANCH_SETS["repghost"], id="repghost-depthwise"),
    pytest.param(8, 8, 1, 1, 3, ONLINE_BRANCH_SETS["orepa"], id="orepa"),
    pytest.param(8, 16, 2, 2, 3, ONLINE_BRANCH_SETS["orepa"], id="orepa-stride2-groups2"),
    pytest.param(8, 8, 1, 8, 3, ONLINE_BRANCH_SETS["orepa"], id="orepa-groups8-wide-middle"),
    pytest.param(6, 6, 1, 1, 5, ONLINE_BRANCH_SETS["orepa"], id="orepa-k5"),
    pytest.param(
        8, 8, 1, 2, 3, {"prior_branch": True, "dw_sep_branch": True, "seq_conv_branch": True}, id="dbb-seq-prior"
    ),
]


def _randomize_(block: OnlineRepBlock, seed: int = 0) -> OnlineRepBlock:
    """Random kernels and branch scales (not the init's ones and zeros) and random BN statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if not name.startswith(("post_bn", "se")):
                param.copy_(torch.rand(param.shape, generator=generator, dtype=torch.float64) * 2 - 1)
    return randomize_bn_(block, seed=seed)


# Squeeze-excitation after the BN changes nothing the branches do: three shapes with it are enough.
WITH_SE = [
    *(pytest.param(*param.values, False, id=param.id) for param in SHAPES),
    *(
        pytest.param(*param.values, True, id=f"se-{param.id}")
        for param in SHAPES
        if param.id in ("qarepvgg", "dbb", "orepa")
    ),
]


@pytest.mark.parametrize("in_channels,out_channels,stride,groups,kernel_size,branches,use_se", WITH_SE)
def test_online_block_forward_and_gradients_equal_its_branches_one_by_one(
    in_channels, out_channels, stride, groups, kernel_size, branches, use_se
):
    """The claim of online re-parameterization: one conv of the summed kernel trains as the branches would, in fp64."""
    block = OnlineRepBlock(
        in_channels, out_channels, stride=stride, groups=groups, kernel_size=kernel_size, use_se=use_se, **branches
    ).double()
    _randomize_(block).train()
    x = torch.randn(3, in_channels, 9, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, out_channels, *block(x).shape[-2:], dtype=torch.float64)
    state = {k: v.clone() for k, v in block.state_dict().items()}  # BN running stats move on every train forward

    results = []
    for forward in (block, block.forward_branches):  # one conv of the summed kernel; every branch's own stages
        block.load_state_dict(state)
        block.zero_grad()
        x.grad = None
        out = forward(x)
        (out * target).sum().backward()
        grads = {name: param.grad.clone() for name, param in block.named_parameters()}
        results.append((out.detach(), grads, x.grad.clone(), block.post_bn.running_var.clone()))
    (online_out, online_grads, online_x_grad, online_var), (ref_out, ref_grads, ref_x_grad, ref_var) = results
    assert max_errors(ref_out, online_out)[1] < 1e-12
    assert max_errors(ref_x_grad, online_x_grad)[1] < 1e-12
    assert max_errors(ref_var, online_var)[1] < 1e-12
    assert online_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        # (SE's single hidden unit at 8 channels may be a dead ReLU on these few samples: no gradient there.)
        assert name.startswith("se.") or grad.abs().max() > 0, f"{name} got no gradient: it proves nothing"
        assert max_errors(grad, online_grads[name])[1] < 1e-12, name


@pytest.mark.parametrize("in_channels,out_channels,stride,groups,kernel_size,branches", SHAPES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@torch.no_grad()
def test_online_block_deploys_exactly_into_repblocks_deploy_form(
    in_channels, out_channels, stride, groups, kernel_size, branches, dtype, tolerance
):
    kwargs = dict(stride=stride, groups=groups, kernel_size=kernel_size, **branches)
    block = _randomize_(OnlineRepBlock(in_channels, out_channels, **kwargs).double()).eval()
    x = torch.randn(2, in_channels, 9, 9, dtype=torch.float64)
    expected = block.forward_branches(x)  # the float64 truth, computed branch by branch
    model = nn.Sequential(block).to(dtype)
    deployed = repblocks.switch_to_deploy(model)
    assert max_errors(expected, deployed(x.to(dtype)))[1] < tolerance
    offline_kwargs = {
        key: value for key, value in kwargs.items() if key not in ("prior_branch", "dw_sep_branch", "layout")
    }
    plain = RepBlock(in_channels, out_channels, **offline_kwargs, deploy=True)
    assert deployed[0].state_dict().keys() == plain.state_dict().keys()
    assert model[0].conv_kxk is not None, "switch_to_deploy copies by default"


@torch.no_grad()
def test_switch_to_deploy_is_idempotent_and_kept_post_bn_folds_later():
    block = _randomize_(OnlineRepBlock(8, 8, avg_pool_branch=True)).eval()
    x = torch.randn(2, 8, 6, 6)
    expected = block(x)
    kept = block.switch_to_deploy(keep_post_bn=True)
    assert kept is block and block.deploy and block.post_bn is not None
    assert max_errors(expected, block(x))[1] < 1e-5
    weight = block.reparam.weight
    block.switch_to_deploy(keep_post_bn=True)
    assert block.reparam.weight is weight, "a second call must change nothing"
    block.switch_to_deploy()
    assert block.post_bn is None and max_errors(expected, block(x))[1] < 1e-5


def test_equivalent_kernel_is_differentiable_and_equals_the_deploy_kernel():
    block = _randomize_(OnlineRepBlock(8, 8, groups=2, avg_pool_branch=True).double()).eval()
    kernel, bias = block.get_equivalent_kernel_bias()
    kernel.pow(2).sum().backward()
    assert all(param.grad is not None for param in block.kernel_parameters())
    deployed = repblocks.switch_to_deploy(nn.Sequential(block))[0]
    assert torch.allclose(kernel, deployed.reparam.weight) and torch.allclose(bias, deployed.reparam.bias)


def test_rep_l2_covers_the_online_branches_and_their_scales():
    model = repblocks.create_model("repvgg_tiny", num_classes=10, block_mode="online")
    penalty = rep_l2(model)
    penalty.backward()
    skipped = rep_l2_parameters(model)
    scales = [p for name, p in model.named_parameters() if name.endswith(".scale")]
    assert scales and all(id(p) in skipped and p.grad is not None for p in scales)


@pytest.mark.parametrize("name", ["repvgg_tiny", "qarepvgg_v2_tiny", "mobileone_tiny"])
def test_zoo_builds_online_blocks_whose_deploy_form_is_the_offline_ones(name):
    online = repblocks.create_model(name, num_classes=10, block_mode="online")
    blocks = [m for m in online.modules() if isinstance(m, RepBlock)]
    assert blocks and all(isinstance(m, OnlineRepBlock) for m in blocks)
    assert not any(isinstance(m, nn.BatchNorm2d) for block in blocks for m in block.branches())
    deployed = repblocks.switch_to_deploy(online)
    plain = repblocks.create_model(name, num_classes=10, deploy=True)
    assert deployed.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(deployed.state_dict())  # the deploy weights load into the offline deploy model as they are


@torch.no_grad()
def test_online_train_weights_fuse_into_a_deploy_model_on_loading():
    online = randomize_bn_(repblocks.create_model("qarepvgg_v2_tiny", num_classes=10, block_mode="online")).eval()
    deploy = repblocks.create_model("qarepvgg_v2_tiny", num_classes=10, block_mode="online", deploy=True)
    repblocks.load_weights(deploy, online.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert max_errors(online(x), deploy.eval()(x))[1] < 1e-5
    offline = repblocks.create_model("qarepvgg_v2_tiny", num_classes=10, deploy=True)
    with pytest.raises(ValueError, match="online-mode weights.*block_mode='online'"):
        repblocks.load_weights(offline, online.state_dict())


def test_unknown_block_mode_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown block_mode 'onlin'; known block modes: offline, online"):
        repblocks.create_model("repvgg_tiny", block_mode="onlin")
    assert resolve_block_mode("online") is OnlineRepBlock and set(BLOCK_MODES) == {"offline", "online"}


@pytest.mark.parametrize("with_bn", [True, False], ids=["conv-bn", "conv-bias"])
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 4)])
def test_online_block_from_conv_starts_as_the_conv_it_replaces(with_bn, stride, groups):
    conv = nn.Conv2d(8, 8, 3, stride=stride, padding=1, groups=groups, bias=not with_bn).double()
    bn = randomize_bn_(nn.BatchNorm2d(8)).double() if with_bn else None
    original = nn.Sequential(conv, bn) if with_bn else conv
    block = online_block_from_conv(conv, bn, {"avg_pool_branch": True})
    x = torch.randn(4, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert max_errors(original.eval()(x), block.eval()(x))[1] < 1e-12
    if with_bn:  # in training mode too: the same kernel, the same batch statistics
        assert max_errors(original.train()(x), block.train()(x))[1] < 1e-12
    scales = {name: p for name, p in block.named_parameters() if name.endswith("scale")}
    assert scales["conv_kxk.scale"].eq(1).all()
    assert all(p.eq(0).all() for name, p in scales.items() if name != "conv_kxk.scale")
    deployed = repblocks.switch_to_deploy(nn.Sequential(block))[0]
    assert max_errors(original.eval()(x), deployed(x))[1] < 1e-12


def test_online_block_from_conv_refuses_what_it_cannot_stand_for():
    with pytest.raises(ValueError, match="square odd conv padded by k // 2"):
        online_block_from_conv(nn.Conv2d(4, 4, 3, padding=1, dilation=2), None)
    with pytest.raises(ValueError, match="unknown branch set keys asym"):
        online_block_from_conv(nn.Conv2d(4, 4, 3, padding=1), None, {"asym": True})
    with pytest.raises(ValueError, match="layout must be one of dbb, orepa, got 'acb'"):
        online_block_from_conv(nn.Conv2d(4, 4, 3, padding=1), None, {"layout": "acb"})


@pytest.mark.parametrize(
    "branches,kind",
    [
        ("repvggdw", "extra_kernels"),
        ("unireplk", "extra_kernels"),
        ("repvit_dw", "scale_branch=conv_bias"),
        (dict(extra_kernels=((3, 2),)), "extra_kernels"),
    ],
)
def test_branch_kinds_without_an_online_form_are_refused_by_name(branches, kind):
    """Issue 26's dilated/extra kernels and biased 1x1 have no online form: one line naming the kind, never dropped."""
    message = f"the online block cannot train branch kind {kind}: .*use RepBlock"
    with pytest.raises(ValueError, match=message) as err:
        resolve_online_branch_set(branches)
    assert "\n" not in str(err.value)
    kwargs = BRANCH_SETS[branches] if isinstance(branches, str) else branches
    with pytest.raises(ValueError, match=message):
        OnlineRepBlock(8, 8, groups=8, kernel_size=7, **kwargs)
    with pytest.raises(ValueError, match=message):
        repblocks.expand(
            nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.BatchNorm2d(8)), branches, online=True
        )


def test_online_branch_sets_resolve_by_name_and_refuse_unknown_ones():
    assert resolve_online_branch_set("dbb") == BRANCH_SETS["dbb"]
    assert resolve_online_branch_set("orepa")["prior_branch"] is True
    with pytest.raises(ValueError, match="unknown branch set 'orep'; known branch sets: .*dbb, .*orepa"):
        resolve_online_branch_set("orep")
    with pytest.raises(ValueError, match="dw_sep_branch must be True or False"):
        resolve_online_branch_set({"dw_sep_branch": "yes"})


# --- the online form of each branch set deploys to the conv its offline block fuses to ---


def _unit_bn_(bn: nn.BatchNorm2d, scale: torch.Tensor) -> None:
    """A BN that multiplies by ``scale`` in eval mode, exactly: mean 0, variance 1, eps 0, bias 0."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1)
    bn.eps = 0.0
    bn.weight.copy_(scale)
    bn.bias.zero_()


def _offline_twin(block: OnlineRepBlock) -> RepBlock:
    """The offline RepBlock of ``block``'s branch set holding ``block``'s kernels, each scale as a BN weight.

    Written from the offline block's own modules, so the fusion it deploys through is RepBlock's, not ours.
    """
    config = {k: v for k, v in block.branch_config.items() if k not in ("prior_branch", "dw_sep_branch", "layout")}
    geometry = dict(stride=block.stride, groups=block.groups, kernel_size=block.kernel_size)
    offline = RepBlock(block.in_channels, block.out_channels, **geometry, **config, act=None).double().eval()
    for name in ("conv_kxk", "conv_1x1", "conv_1xk", "conv_kx1"):
        ours, theirs = getattr(block, name), getattr(offline, name)
        pairs = zip(ours, theirs, strict=True) if isinstance(ours, nn.ModuleList) else [(ours, theirs)]
        for branch, target in pairs if ours is not None else []:
            if isinstance(target, ConvBN):
                target.conv.weight.copy_(branch.weight)
                _unit_bn_(target.bn, branch.scale)
            else:  # QARepVGG's plain 1x1 conv: no BN to carry the scale
                target.weight.copy_(branch.weight * branch.scale.reshape(-1, 1, 1, 1))
    if isinstance(offline.identity, nn.BatchNorm2d):
        _unit_bn_(offline.identity, block.identity.scale)
    if block.conv_1x1_kxk is not None:
        sequence, branch = offline.conv_1x1_kxk, block.conv_1x1_kxk
        assert isinstance(sequence.conv1, IdentityConv1x1) == branch.identity_based
        sequence.conv1.weight.copy_(branch.weight_1x1)
        _unit_bn_(sequence.bn1, torch.ones_like(sequence.bn1.weight))
        sequence.conv2.weight.copy_(branch.weight_kxk)
        _unit_bn_(sequence.bn2, branch.scale)
    if block.conv_1x1_avg is not None:
        sequence, branch = offline.conv_1x1_avg, block.conv_1x1_avg
        assert (sequence.conv is None) == (branch.weight is None)
        if sequence.conv is not None:
            sequence.conv.weight.copy_(branch.weight)
            _unit_bn_(sequence.bn, torch.ones_like(sequence.bn.weight))
        _unit_bn_(sequence.avgbn, branch.scale)
    offline.post_bn.load_state_dict(block.post_bn.state_dict())
    offline.post_bn.eps = block.post_bn.eps
    return offline


OFFLINE_SETS = [
    param for param in SHAPES if "prior_branch" not in param.values[-1] and "layout" not in param.values[-1]
]


@pytest.mark.parametrize("in_channels,out_channels,stride,groups,kernel_size,branches", OFFLINE_SETS)
@torch.no_grad()
def test_online_block_deploys_to_the_conv_its_offline_block_fuses_to(
    in_channels, out_channels, stride, groups, kernel_size, branches
):
    """Every branch set: the online kernels in the offline block's modules fuse, through RepBlock's algebra, as ours do."""
    kwargs = dict(stride=stride, groups=groups, kernel_size=kernel_size, **branches)
    block = _randomize_(OnlineRepBlock(in_channels, out_channels, **kwargs, act=None).double()).eval()
    if branches.get("identity_branch") == "plain" or block.avg_pool is not None:
        for branch in (block.identity, block.avg_pool):  # modules without a weight: only a scale of 1 has a twin
            if branch is not None:
                branch.scale.fill_(1)
    offline = _offline_twin(block)
    x = torch.randn(2, in_channels, 9, 9, dtype=torch.float64)
    assert max_errors(offline(x), block.forward_branches(x))[1] < 1e-12  # the twin is the same function
    ours, theirs = block.switch_to_deploy().reparam, offline.switch_to_deploy().reparam
    assert max_errors(theirs.weight, ours.weight)[1] < 1e-12
    assert max_errors(theirs.bias, ours.bias)[1] < 1e-12


# --- what the online block keeps for backward ---


def _saved_maps(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps autograd keeps from a forward of ``module`` (tensors at least half ``x``'s size), and its output."""
    saved = []

    def pack(tensor):
        if tensor.numel() * 2 >= x.numel():
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = module(x)
    return saved, out


@pytest.mark.parametrize("branches", ["repvgg", "dbb", "orepa"])
def test_training_online_block_keeps_only_its_input_and_its_output_for_backward(branches):
    """The conv output is recomputed in backward (repblocks.online_step): no feature map of the block's own is kept."""
    kwargs = resolve_online_branch_set(branches)
    online = OnlineRepBlock(8, 8, **kwargs).train()
    x = torch.randn(2, 8, 16, 16, requires_grad=True)  # (kernels are smaller than half of it)
    saved, out = _saved_maps(online, x)
    storages = {tensor.untyped_storage().data_ptr() for tensor in saved}
    assert storages <= {x.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()}
    offline_kwargs = {k: v for k, v in kwargs.items() if k not in ("prior_branch", "dw_sep_branch", "layout")}
    offline_saved, _ = _saved_maps(RepBlock(8, 8, **offline_kwargs).train(), x)
    assert len({t.untyped_storage().data_ptr() for t in offline_saved}) > 2  # what the test tells apart


def test_recomputed_step_updates_running_statistics_as_batch_norm_does():
    block = OnlineRepBlock(8, 8, **resolve_online_branch_set("dbb")).double().train()
    block.post_bn.momentum = None  # the cumulative average: the step count enters the update
    reference = copy.deepcopy(block)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    for _ in range(2):
        block(x).sum().backward()
        with torch.no_grad():
            reference.forward_branches(x)
    for key, value in reference.post_bn.state_dict().items():
        assert torch.allclose(value, block.post_bn.state_dict()[key], rtol=0, atol=1e-12), key


@torch.no_grad()
def test_online_weights_of_every_branch_set_fuse_into_a_deploy_block_on_loading():
    for name in ["acnet", "dbb", "orepa"]:
        kwargs = resolve_online_branch_set(name)
        trained = _randomize_(OnlineRepBlock(8, 8, groups=2, **kwargs).double()).eval()
        deploy = nn.Sequential(OnlineRepBlock(8, 8, groups=2, **kwargs, deploy=True).double())
        repblocks.load_weights(deploy, nn.Sequential(trained).state_dict())
        x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
        assert max_errors(trained(x), deploy.eval()(x))[1] < 1e-12, name


@pytest.mark.parametrize("branches", ["dbb", "orepa"])
def test_torchvision_model_expanded_online_trains_and_deploys_to_its_own_class(branches):
    """`model.expand=dbb model.online=true` (tv_* configs): depthwise convs included, back to torchvision's class."""
    torchvision = pytest.importorskip("torchvision")
    model = repblocks.create_model("tv_mobilenet_v3_small", num_classes=10, expand=branches, online=True).train()
    assert any(isinstance(module, OnlineRepBlock) for module in model.modules())
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(1).sum().backward()
    model.eval()
    plain = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    plain.load_state_dict(repblocks.switch_to_deploy(model).state_dict(), strict=True)
    with torch.no_grad():
        assert max_errors(model(x), plain(x))[1] < 1e-5


def test_keeping_the_conv_output_instead_of_recomputing_it_changes_no_gradient():
    block = _randomize_(OnlineRepBlock(8, 8, groups=2, **resolve_online_branch_set("orepa")).double()).train()
    x = torch.randn(3, 8, 7, 7, dtype=torch.float64, requires_grad=True)
    state = copy.deepcopy(block.state_dict())
    results = []
    for recompute in (True, False):
        block.load_state_dict(state)
        block.recompute = recompute
        outputs = block(x)
        results.append((outputs, *torch.autograd.grad(outputs.square().sum(), [x, *block.parameters()])))
    for recomputed, kept in zip(*results, strict=True):
        assert max_errors(kept, recomputed)[1] < 1e-12
