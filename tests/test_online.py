"""repblocks.online: the OREPA-style online block against its branches computed one by one, and its deploy form."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repblocks
from repblocks.blocks import RepBlock
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.online import BLOCK_MODES, OnlineRepBlock, online_block_from_conv, resolve_block_mode
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
]


def _randomize_(block: OnlineRepBlock, seed: int = 0) -> OnlineRepBlock:
    """Random kernels and branch scales (not the init's ones and zeros) and random BN statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if not name.startswith(("post_bn", "se")):
                param.copy_(torch.rand(param.shape, generator=generator, dtype=torch.float64) * 2 - 1)
    return randomize_bn_(block, seed=seed)


def _branches_one_by_one(block: OnlineRepBlock, x: torch.Tensor) -> torch.Tensor:
    """What the online block stands for, computed as a multi-branch block: each branch's own conv, scaled, summed."""
    convs = list(block.conv_kxk) if isinstance(block.conv_kxk, nn.ModuleList) else [block.conv_kxk]
    if block.conv_1x1 is not None:
        convs.append(block.conv_1x1)
    out = 0
    for conv in convs:
        size = conv.weight.shape[-1]
        y = F.conv2d(x, conv.weight, None, block.stride, size // 2, 1, block.groups)
        out = out + y * conv.scale.reshape(1, -1, 1, 1)
    if block.identity is not None:
        out = out + x * block.identity.scale.reshape(1, -1, 1, 1)
    if block.avg_pool is not None:
        pooled = F.avg_pool2d(x, block.kernel_size, 1, block.kernel_size // 2)
        out = out + pooled * block.avg_pool.scale.reshape(1, -1, 1, 1)
    return block.act(block.se(block.post_bn(out)))


@pytest.mark.parametrize("in_channels,out_channels,stride,groups,kernel_size,branches", SHAPES)
@pytest.mark.parametrize("use_se", [False, True], ids=["", "se"])
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
    for forward in (block, lambda inputs: _branches_one_by_one(block, inputs)):
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
    expected = _branches_one_by_one(block, x)  # the float64 truth, computed branch by branch
    model = nn.Sequential(block).to(dtype)
    deployed = repblocks.switch_to_deploy(model)
    assert max_errors(expected, deployed(x.to(dtype)))[1] < tolerance
    plain = RepBlock(in_channels, out_channels, **kwargs, deploy=True)
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
    with pytest.raises(ValueError, match="does not support asym_branches"):
        online_block_from_conv(nn.Conv2d(4, 4, 3, padding=1), None, {"asym_branches": True})
