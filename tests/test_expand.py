"""expand(): any network's kxk Conv+BN become training blocks that start as the original, and collapse back to it.

Every branch set that expand takes is tested (ACNet's and DBB's too, once they exist). Collapse is
checked the way a user would: the deploy form's state dict loads with ``strict=True`` into a fresh
instance of the original class, after training steps (so the new branches are non-zero) and with
random BN statistics, and its outputs equal the expanded model's.
"""

import sys

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import repblocks
from repblocks.blocks import RepBlock
from repblocks.expand import Reason, branch_set_names, expand
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.online import OnlineRepBlock

BRANCH_SETS = branch_set_names()
# Relative error of the collapsed model's outputs: float64 and float32 rounding, with room.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


class Mixed(nn.Module):
    """One conv of every kind expand meets, each named for what it is."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=4, bias=True)  # bias + BN: taken
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)  # what RepGhost's and UniRepLK's sets take
        self.bn_depthwise = nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_pointwise = nn.BatchNorm2d(8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.bn_dilated = nn.BatchNorm2d(8)
        self.even = nn.Conv2d(8, 8, 2, padding=1, bias=False)
        self.bn_even = nn.BatchNorm2d(8)
        self.unpadded = nn.Conv2d(8, 8, 3, bias=False)
        self.bn_unpadded = nn.BatchNorm2d(8)
        self.no_bn = nn.Conv2d(8, 8, 3, padding=1)
        self.no_stats = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_no_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.rep = RepBlock(8, 8)  # its own kxk conv is already re-parameterizable

    def forward(self, x):
        x = self.bn1(self.conv1(self.seq(x)))
        x = self.bn_depthwise(self.depthwise(x))
        x = self.bn_pointwise(self.pointwise(x))
        x = self.bn_dilated(self.dilated(x))
        x = self.bn_even(self.even(x))[..., 1:, 1:]
        x = nn.functional.pad(self.bn_unpadded(self.unpadded(x)), [1, 1, 1, 1])
        x = self.bn_no_stats(self.no_stats(self.no_bn(x)))
        return self.rep(x)


def _trained(model: nn.Module, inputs: torch.Tensor, steps: int = 2) -> nn.Module:
    """A few SGD steps, so that every new branch holds weights of its own (and BN statistics move)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        output = model(inputs)
        outputs = output.values() if isinstance(output, dict) else [output]
        loss = sum(out.mean() for out in outputs)  # bounded gradients: a squared loss diverges in two steps
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(param.isfinite().all() for param in model.parameters()), "training diverged: the test tests nothing"
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x)
    return list(out.values()) if isinstance(out, dict) else [out]


def _randomize_frozen_bn_(model: nn.Module, seed: int) -> nn.Module:
    """randomize_bn_ for torchvision's FrozenBatchNorm2d too (detection backbones), same ranges."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                for name, (low, high) in dict(
                    running_mean=(-0.5, 0.5), running_var=(0.5, 2), weight=(0.5, 1.5), bias=(-0.5, 0.5)
                ).items():
                    tensor = getattr(module, name)
                    tensor.copy_(
                        torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * (high - low) + low
                    )
    return randomize_bn_(model, seed=seed)


def _detection_backbone() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)  # FrozenBatchNorm2d


TORCHVISION_CASES = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),
    "resnet18_fpn_backbone": _detection_backbone,
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
}
FAST_CASES = {("resnet18", torch.float32)}  # the rest take 20-60 s each on a busy 2-core CPU


def _case_params():
    for name in TORCHVISION_CASES:
        for dtype in (torch.float64, torch.float32):
            marks = [] if (name, dtype) in FAST_CASES else [pytest.mark.slow]
            yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}", marks=marks)


# --- what is taken and what is left ---


def test_expand_takes_eligible_conv_bn_pairs_and_says_why_it_left_the_rest():
    expansion = expand(Mixed())
    assert [conv.name for conv in expansion.taken] == ["seq.0", "conv1", "depthwise"]
    assert [conv.batch_norm for conv in expansion.taken] == ["seq.1", "bn1", "bn_depthwise"]
    left = {conv.name: conv.reason for conv in expansion.left}
    assert left == {
        "pointwise": Reason.ONE_BY_ONE,
        "dilated": Reason.DILATED,
        "even": Reason.KERNEL,
        "unpadded": Reason.PADDING,
        "no_bn": Reason.NO_BATCH_NORM,
        "no_stats": Reason.BATCH_NORM_KIND,
        "rep.conv_kxk.conv": Reason.INSIDE_BLOCK,
        "rep.conv_1x1.conv": Reason.INSIDE_BLOCK,
    }
    model = expansion.model
    assert isinstance(model.seq[0], RepBlock) and isinstance(model.seq[1], nn.Identity)
    assert isinstance(model.conv1, RepBlock) and model.conv1.stride == 2 and model.conv1.groups == 4
    assert "left 1: dilated" in expansion.summary()


def test_expand_copies_by_default_and_takes_a_model_as_is_in_place():
    model = Mixed()
    expanded = expand(model).model
    assert type(model.conv1) is nn.Conv2d and isinstance(expanded.conv1, RepBlock)
    assert expand(model, inplace=True).model is model and isinstance(model.conv1, RepBlock)


def test_unknown_or_unusable_branch_sets_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"unknown branch set 'nope'; known: repvgg"):
        expand(Mixed(), "nope")
    with pytest.raises(ValueError, match="plain identity branch has no weight to start at zero"):
        expand(Mixed(), dict(scale_branch="conv", identity_branch="plain"))
    with pytest.raises(ValueError, match="act are set by expand"):
        expand(Mixed(), dict(act="relu"))


# --- the expanded model starts as the original ---


@pytest.mark.parametrize("branches", BRANCH_SETS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_expanded_model_computes_the_original_function(branches, mode):
    model = randomize_bn_(Mixed()).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    expanded = expand(model, branches).model
    model.train(mode == "train")
    expanded.train(mode == "train")
    with torch.no_grad():
        expected, got = model(x), expanded(x)
    assert max_errors(expected, got)[1] < 1e-13
    if mode == "train" and isinstance(expanded.conv1, RepBlock):  # the original BN sits in the kxk branch: its
        # running statistics move the same way
        assert torch.allclose(model.bn1.running_mean, expanded.conv1.conv_kxk.bn.running_mean + model.conv1.bias)


@pytest.mark.parametrize("branches", BRANCH_SETS)
def test_new_branches_start_at_zero_and_learn(branches):
    expansion = expand(Mixed(), branches)
    model = expansion.model
    block = model.get_submodule(expansion.taken[0].name)
    new = [branch for branch in block.branches() if branch is not block.conv_kxk]
    assert new, "a branch set with nothing but the kxk branch tests nothing"
    _trained(model, torch.randn(4, 3, 16, 16), steps=1)
    for branch in new:
        last_bn = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        assert last_bn.weight.abs().sum() > 0, f"{type(branch).__name__} stayed at zero after a step"


# --- collapse gives back the original architecture ---


@pytest.mark.parametrize("branches", BRANCH_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_collapse_restores_the_modules_expand_replaced(branches, dtype):
    original = Mixed().to(dtype)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    expanded = randomize_bn_(_trained(expand(original, branches).model, x), seed=1)
    plain = repblocks.switch_to_deploy(expanded)
    assert type(plain.conv1) is nn.Conv2d and plain.conv1.bias is not None  # the conv had a bias: it keeps one
    assert type(plain.seq[0]) is nn.Conv2d and plain.seq[0].bias is None
    assert type(plain.bn1) is nn.BatchNorm2d and plain.bn1.eps == original.bn1.eps
    assert isinstance(plain.rep, RepBlock) and plain.rep.deploy  # the network's own blocks fuse as always
    fresh = Mixed().to(dtype)
    fresh.rep.switch_to_deploy()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert max_errors(_outputs(expanded, x)[0], _outputs(fresh, x)[0])[1] < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_collapsed_batch_norm_adds_the_fused_bias_and_nothing_else(dtype):
    expanded = randomize_bn_(expand(Mixed()).model.to(dtype), seed=1)
    bn = repblocks.switch_to_deploy(expanded).seq[1]
    z = torch.randn(2, 8, 5, 5, dtype=dtype) * 100
    with torch.no_grad():
        assert torch.equal(bn(z), z + bn.bias.reshape(-1, 1, 1))  # var + eps is exactly 1 in this dtype


@pytest.mark.parametrize("name,dtype", list(_case_params()))
def test_expanded_torchvision_model_collapses_into_its_original_class(name, dtype):
    build = TORCHVISION_CASES[name]
    # 64x64 keeps the last stage above 1x1: training-mode BN over 2 values per channel makes the weights diverge.
    size = 32 if (name, dtype) in FAST_CASES else 64
    x = torch.randn(2, 3, size, size, dtype=dtype)
    original = _randomize_frozen_bn_(build(), seed=0).to(dtype)
    expansion = expand(original)
    assert expansion.taken and all(conv.kernel_size >= 3 for conv in expansion.taken)
    for expected, got in zip(_outputs(original, x), _outputs(expansion.model, x), strict=True):
        assert max_errors(expected, got)[1] < TOLERANCE[dtype]
    expanded = _randomize_frozen_bn_(_trained(expansion.model, x), seed=1)
    plain = repblocks.switch_to_deploy(expanded)
    fresh = build().to(dtype)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    for expected, got in zip(_outputs(expanded, x), _outputs(fresh, x), strict=True):
        assert max_errors(expected, got)[1] < TOLERANCE[dtype]


# --- torchvision models in the registry ---


def test_registered_torchvision_model_deploys_to_torchvisions_own_class():
    model = repblocks.create_model("tv_resnet18", num_classes=10, expand="repvgg")
    assert isinstance(model.layer1[0].conv1, RepBlock) and model.num_classes == 10
    plain = repblocks.switch_to_deploy(model)
    rebuilt = repblocks.create_model("tv_resnet18", num_classes=10, expand="repvgg", deploy=True)
    assert type(rebuilt) is torchvision.models.ResNet
    rebuilt.load_state_dict(plain.state_dict(), strict=True)
    # Without expand, the deploy form folds every Conv+BN pair, as for any plain network.
    folded = repblocks.create_model("tv_resnet18", num_classes=10, deploy=True)
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None


def test_registered_torchvision_model_starts_from_torchvisions_weights_when_expanded(tmp_path):
    pretrained = randomize_bn_(torchvision.models.resnet18(num_classes=10)).eval()
    torch.save(pretrained.state_dict(), tmp_path / "resnet18.pth")
    model = repblocks.create_model(
        "tv_resnet18", num_classes=10, expand="repvgg", weights=str(tmp_path / "resnet18.pth")
    )
    x = torch.randn(2, 3, 32, 32)
    assert max_errors(_outputs(pretrained, x)[0], _outputs(model, x)[0])[1] < 1e-6


def test_registered_torchvision_model_without_torchvision_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    with pytest.raises(ValueError, match=r"^tv_resnet18 needs torchvision: pip install torchvision$"):
        repblocks.create_model("tv_resnet18", num_classes=10)


def test_detection_backbone_keeps_frozen_batch_norm_in_its_kxk_branch():
    backbone = expand(_detection_backbone()).model
    block = backbone.body.layer1[0].conv1
    assert isinstance(block.conv_kxk.bn, FrozenBatchNorm2d)
    assert isinstance(block.conv_1x1.bn, nn.BatchNorm2d)  # new branches train: a frozen one would stay at zero
    plain = repblocks.switch_to_deploy(backbone)
    assert isinstance(plain.body.layer1[0].bn1, FrozenBatchNorm2d)
    _detection_backbone().load_state_dict(plain.state_dict(), strict=True)


# --- online: OREPA's blocks in place of the convs ---


ONLINE_SETS = branch_set_names(online=True)


@pytest.mark.parametrize("branches", ONLINE_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_online_expansion_starts_as_the_original_and_collapses_into_its_class(branches, dtype):
    original = randomize_bn_(Mixed()).to(dtype).eval()
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    expanded = expand(original, branches, online=True).model.eval()
    assert any(isinstance(module, OnlineRepBlock) for module in expanded.modules())
    with torch.no_grad():
        assert max_errors(original(x), expanded(x))[1] < TOLERANCE[dtype]
        assert max_errors(original.train()(x), expanded.train()(x))[1] < TOLERANCE[dtype]  # batch statistics too
    original.eval()
    trained = randomize_bn_(_trained(expanded, x), seed=1)
    plain = repblocks.switch_to_deploy(trained)
    fresh = Mixed().to(dtype)
    fresh.rep.switch_to_deploy()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert max_errors(_outputs(trained, x)[0], _outputs(fresh, x)[0])[1] < TOLERANCE[dtype]


def test_online_expansion_takes_every_branch_set_and_orepa_only_online():
    assert {"repvgg", "acnet", "dbb", "orepa"} <= set(ONLINE_SETS)
    assert "orepa" not in BRANCH_SETS
    with pytest.raises(ValueError, match="unknown branch set 'orepa'"):
        expand(Mixed(), "orepa")
    block = expand(Mixed(), "orepa", online=True).model.seq[0]
    assert block.conv_prior is not None and block.conv_dw_sep is not None
