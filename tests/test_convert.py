"""switch_to_deploy on networks that are not ours: torchvision, timm, custom and untraceable code."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import repblocks
from repblocks.numerics import compare_forms, max_errors, randomize_bn_

from .mmpretrain_layout import MMImageClassifier


def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    "builder,size", [("resnet18", 64), ("mobilenet_v2", 64), pytest.param("resnet50", 64, marks=pytest.mark.slow)]
)
@torch.no_grad()
def test_torchvision_models_fold_every_conv_bn_pair(builder, size):
    model = randomize_bn_(getattr(torchvision.models, builder)(weights=None)).eval()
    x = torch.randn(2, 3, size, size)
    expected = model(x)
    folded = repblocks.switch_to_deploy(model)
    assert _bn_count(model) > 0 and _bn_count(folded) == 0
    assert type(folded) is type(model) and not folded.training
    assert max_errors(expected, folded(x))[1] < 1e-5


@torch.no_grad()
def test_input_untouched_by_default_and_converted_with_inplace():
    model = randomize_bn_(torchvision.models.resnet18(weights=None)).train()
    folded = repblocks.switch_to_deploy(model)
    assert folded is not model and model.training and isinstance(model.bn1, nn.BatchNorm2d)
    same = repblocks.switch_to_deploy(model, inplace=True)
    assert same is model and isinstance(model.bn1, nn.Identity) and not model.training


class _ResidualOnPreBN(nn.Module):
    """The conv's output feeds the BN and a residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _SharedConv(nn.Module):
    """One conv used twice, once before a BN: folding it would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class _BNThenConv(nn.Sequential):
    """A BN before a conv is not a Conv->BN pair."""

    def __init__(self):
        super().__init__(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))


@pytest.mark.parametrize("module_cls", [_ResidualOnPreBN, _SharedConv, _BNThenConv])
@torch.no_grad()
def test_pairs_whose_folding_would_change_outputs_are_left_alone(module_cls):
    model = randomize_bn_(module_cls()).eval()
    x = torch.randn(2, 4, 8, 8)
    expected = model(x)
    converted = repblocks.switch_to_deploy(model)
    assert _bn_count(converted) == 1
    assert max_errors(expected, converted(x))[1] < 1e-6


class _Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx; Sequential pairs are still folded."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.side_conv = nn.Conv2d(8, 8, 1)
        self.side_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # fx cannot trace this
            y = y * 2
        return self.side_bn(self.side_conv(y))


@torch.no_grad()
def test_untraceable_models_fold_sequential_pairs_only():
    model = randomize_bn_(_Untraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    converted = repblocks.switch_to_deploy(model)
    assert isinstance(converted.body[1], nn.Identity)
    assert isinstance(converted.side_bn, nn.BatchNorm2d)  # not provably a pair without a graph
    assert max_errors(expected, converted(x))[1] < 1e-6


@torch.no_grad()
def test_custom_backbone_mixing_repblocks_and_conv_bn():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        repblocks.RepBlock(8, 8, groups=8),
        repblocks.RepBlock(8, 16, stride=2, groups=2),
        repblocks.ConvBN(16, 16, 3),
    )
    model = randomize_bn_(model).eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    converted = repblocks.switch_to_deploy(model)
    assert _bn_count(converted) == 0 and converted[3].deploy
    assert max_errors(expected, converted(x))[1] < 1e-5


@torch.no_grad()
def test_timm_repvgg_blocks_reparameterize_themselves():
    model = randomize_bn_(timm.create_model("repvgg_a0", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    converted = repblocks.switch_to_deploy(model)
    assert _bn_count(converted) == 0
    assert max_errors(expected, converted(x))[1] < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@torch.no_grad()
def test_folding_keeps_dtype(dtype):
    model = randomize_bn_(torchvision.models.resnet18(weights=None)).to(dtype).eval()
    folded = repblocks.switch_to_deploy(model)
    assert folded.conv1.weight.dtype == dtype and folded.conv1.bias.dtype == dtype


@torch.no_grad()
def test_fold_conv_bn_leaves_training_mode_batch_norms_alone():
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    assert repblocks.fold_conv_bn(model) == 0 and isinstance(model[1], nn.BatchNorm2d)
    assert repblocks.fold_conv_bn(model.eval()) == 1 and isinstance(model[1], nn.Identity)


@torch.no_grad()
def test_torchvision_frozen_batch_norm_is_folded():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4))
    model[1].running_var.uniform_(0.5, 2)
    model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    converted = repblocks.switch_to_deploy(model)
    assert isinstance(converted[1], nn.Identity)
    assert max_errors(expected, converted(x))[1] < 1e-6


def test_compare_forms_counts_agreement_accuracy_and_error():

    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=4)).eval()
    plain = repblocks.switch_to_deploy(model)
    batches = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])), (torch.randn(2, 3, 32, 32), torch.tensor([3, 0]))]
    result = compare_forms(model, plain, batches, torch.device("cpu"))
    assert result["images"] == 5 and result["top1_agreement"] == 1.0
    assert result["train_accuracy"] == result["deploy_accuracy"] and result["max_rel_err"] < 1e-5
    assert compare_forms(model, plain, [], torch.device("cpu")) == {}


class _TinyVAE(nn.Module):
    """A VAE's ``reparameterize(mu, logvar)`` samples; it is no fusion and must not be called by the converter."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.mu = nn.Conv2d(8, 4, 1)
        self.logvar = nn.Conv2d(8, 4, 1)

    def reparameterize(self, mu, logvar):
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu

    def forward(self, x):
        hidden = self.encoder(x)
        return self.reparameterize(self.mu(hidden), self.logvar(hidden))


@torch.no_grad()
def test_a_vae_reparameterize_is_not_mistaken_for_a_fusion():
    model = randomize_bn_(nn.Sequential(_TinyVAE())).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    converted = repblocks.switch_to_deploy(model)
    assert _bn_count(converted) == 0
    assert max_errors(expected, converted(x))[1] < 1e-6


@torch.no_grad()
def test_mmpretrain_blocks_are_switched_not_asked_for_their_kernel():
    """mmpretrain's blocks have switch_to_deploy() and a reparameterize() that only returns the fused kernel."""
    model = randomize_bn_(MMImageClassifier(num_blocks=(2, 2, 2, 1), widths=(0.25,) * 4)).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    converted = repblocks.switch_to_deploy(model)
    assert _bn_count(converted) == 0 and all(
        hasattr(block, "branch_reparam") and not hasattr(block, "branch_3x3")
        for block in converted.modules()
        if hasattr(block, "reparameterize")
    )
    assert max_errors(expected, converted(x))[1] < 1e-5
