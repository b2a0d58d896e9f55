"""Every fold checks itself: exact or a FoldError, never a silently wrong network; and switch_to_deploy changes no input.

Against the real classes: timm models built from ``BatchNormAct2d`` (whose forward also applies an
activation: folded as a plain BatchNorm it was lost, up to 1e2-1e3 relative error), torchvision's
``FrozenBatchNorm2d`` backbones, and every kind of input switch_to_deploy takes.
"""

import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d
from torch import nn

import repblocks
from repblocks.blocks import BRANCH_SETS, RepBlock
from repblocks.convert import reparameterize
from repblocks.errors import FoldError
from repblocks.expand import ExpandedRepBlock, Reason, expand
from repblocks.folds import VERIFY_ENV
from repblocks.norms import DropAct
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.online import OnlineRepBlock

# Relative error of a whole folded network against the original: rounding only, with room.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    "name",
    ["mobilenetv3_small_050", "regnetx_002", pytest.param("efficientnet_b0", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_timm_models_with_batch_norm_act_fold_exactly_and_keep_their_activations(name, dtype):
    model = randomize_bn_(timm.create_model(name, pretrained=False)).eval().to(dtype)
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    deployed = reparameterize(model)
    assert deployed.pairs > 0 and deployed.left == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.model.modules())
    assert any(isinstance(m, DropAct) and not isinstance(m.act, nn.Identity) for m in deployed.model.modules())
    assert max_errors(_outputs(model, x), _outputs(deployed.model, x))[1] < TOLERANCE[dtype]


def test_frozen_batch_norm_act_folds_and_keeps_its_activation():
    norm = FrozenBatchNormAct2d(8, act_layer=nn.SiLU)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded = repblocks.switch_to_deploy(model)
    assert isinstance(folded[1], DropAct) and isinstance(folded[1].act, nn.SiLU)
    assert max_errors(_outputs(model, x), _outputs(folded, x))[1] < TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_torchvision_backbone_with_frozen_batch_norm_folds_exactly(dtype):
    model = torchvision.models.resnet18(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    model = randomize_bn_(model).to(dtype)
    assert model.bn1.running_var.min() != 1  # randomize_bn_ reaches the frozen buffers
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    deployed = reparameterize(model)
    assert deployed.pairs == 20 and deployed.left == []
    assert max_errors(_outputs(model, x), _outputs(deployed.model, x))[1] < TOLERANCE[dtype]


class _NormThenReLU(nn.BatchNorm2d):
    """A BatchNorm subclass the fold does not know, whose forward does more than normalize."""

    def forward(self, x):
        return F.relu(super().forward(x))


def _with_unknown_norm() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _NormThenReLU(8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    return randomize_bn_(model).double().eval()


def test_unknown_batch_norm_subclass_is_left_unfused_and_reported(caplog):
    model = _with_unknown_norm()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="repblocks.convert"):
        deployed = reparameterize(model)
    assert deployed.pairs == 1 and [norm.name for norm in deployed.left] == ["1"]
    assert "_NormThenReLU is not a BatchNorm class the fold knows" in deployed.left[0].reason
    assert type(deployed.model[1]) is _NormThenReLU and isinstance(deployed.model[3], nn.Identity)
    assert len([r for r in caplog.records if "left unfused" in r.message]) == 1
    assert max_errors(_outputs(model, x), _outputs(deployed.model, x))[1] < TOLERANCE[torch.float64]


def test_expand_leaves_an_unknown_batch_norm_with_its_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _NormThenReLU(8))
    expansion = expand(randomize_bn_(model).eval())
    assert not expansion.taken
    assert [(conv.name, conv.reason) for conv in expansion.left] == [("0", Reason.UNKNOWN_BATCH_NORM)]


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
@pytest.mark.parametrize("norm", [BatchNormAct2d, FrozenBatchNormAct2d])
def test_expand_takes_batch_norm_act_and_gives_it_back_with_its_activation(norm, online):
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8, act_layer=nn.PReLU), nn.Conv2d(8, 4, 1))
    original = randomize_bn_(original).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expansion = expand(original, online=online)
    assert [conv.name for conv in expansion.taken] == ["0"]
    assert isinstance(expansion.model[1], DropAct) and isinstance(expansion.model[1].act, nn.PReLU)
    with torch.no_grad():
        expansion.model[1].act.weight.fill_(0.3)  # the activation trains while expanded, and comes back trained
    expected = _outputs(expansion.model, x)
    assert max_errors(_outputs(original, x), expected)[1] > 1e-3  # the PReLU changed: the comparison can fail
    plain = repblocks.switch_to_deploy(expansion)
    assert type(plain[1]) is norm and plain[1].act.weight.item() == 0.3
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8, act_layer=nn.PReLU), nn.Conv2d(8, 4, 1)).double()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert max_errors(expected, _outputs(fresh, x))[1] < TOLERANCE[torch.float64]


# --- a wrong fold is an error that names the module ---


def _sabotaged_fuse(conv, bn):
    kernel, bias = repblocks.fusion.fuse_conv_bn(conv, bn)
    return kernel, bias + 0.1


def test_sabotaged_conv_bn_fold_raises_naming_the_pair(monkeypatch):
    monkeypatch.setattr(repblocks.convert, "fuse_conv_bn", _sabotaged_fuse)
    model = randomize_bn_(torchvision.models.resnet18(weights=None)).eval()
    with pytest.raises(FoldError, match=r"^folding conv1 \+ bn1 \(Conv2d \+ BatchNorm2d\) changed its output") as info:
        repblocks.switch_to_deploy(model)
    assert info.value.error > info.value.tolerance
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the input is untouched


def test_sabotaged_block_fold_raises_naming_its_path_and_class(monkeypatch):
    real = repblocks.blocks.fused_kernel_bias

    def sabotaged(conv_branches, identity, **options):
        return real(conv_branches[:1], identity, **options)  # drops the 1x1 branch

    monkeypatch.setattr(repblocks.blocks, "fused_kernel_bias", sabotaged)
    model = nn.Sequential(nn.Identity(), nn.Sequential(RepBlock(4, 4), RepBlock(4, 4)))
    with pytest.raises(FoldError, match=r"^folding 1\.0 \(RepBlock\) changed its output: relative error"):
        repblocks.switch_to_deploy(model)


def test_sabotaged_collapse_of_an_expansion_raises_naming_the_block(monkeypatch):
    monkeypatch.setattr(
        importlib.import_module("repblocks.expand"), "_unit_variance", lambda eps, dtype: torch.tensor(0.5, dtype=dtype)
    )
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))).eval()
    with pytest.raises(FoldError, match=r"^folding 0 \(ExpandedRepBlock\)"):
        repblocks.switch_to_deploy(expand(model))


def test_sabotaged_online_fold_raises(monkeypatch):
    monkeypatch.setattr(repblocks.online, "bn_scale_shift", lambda bn: (bn.weight.double() * 2, bn.bias.double()))
    with pytest.raises(FoldError, match=r"^folding OnlineRepBlock changed its output"):
        repblocks.switch_to_deploy(randomize_bn_(OnlineRepBlock(4, 4)))


def test_kill_switch_skips_the_check_by_argument_and_by_environment(monkeypatch):
    monkeypatch.setattr(repblocks.convert, "fuse_conv_bn", _sabotaged_fuse)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))).eval()
    assert isinstance(repblocks.switch_to_deploy(model, verify=False)[1], nn.Identity)
    monkeypatch.setenv(VERIFY_ENV, "0")
    assert isinstance(repblocks.switch_to_deploy(model)[1], nn.Identity)
    with pytest.raises(FoldError):
        repblocks.switch_to_deploy(model, verify=True)  # the argument wins over the environment


# --- switch_to_deploy changes no input ---


def _snapshot(model: nn.Module) -> tuple:
    state = {key: value.clone() for key, value in model.state_dict().items()}
    return state, [(name, m.training) for name, m in model.named_modules()], [type(m) for m in model.modules()]


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, flags, types = _snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[key], before[0][key]) for key in state)
    assert flags == before[1] and types == before[2]


def _inputs():
    """Every kind of input, in training mode, with statistics that are not the defaults."""
    x = torch.randn(2, 4, 8, 8)
    for name in BRANCH_SETS:
        yield f"block-{name}", RepBlock(4, 4, kernel_size=5, **BRANCH_SETS[name])  # unireplk: k >= 5
    yield "block-strided", RepBlock(4, 8, stride=2)
    yield "online-block", OnlineRepBlock(4, 4, avg_pool_branch=True)
    yield "network", nn.Sequential(RepBlock(4, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), RepBlock(8, 8))
    expansion = expand(randomize_bn_(plain).eval(), "dbb")
    expansion.model(x)  # non-zero-start statistics for the new branches' BatchNorms
    yield "expanded-model", expansion.model
    yield "expansion", expansion
    yield "online-expansion", expand(randomize_bn_(plain).eval(), online=True).model


@pytest.mark.parametrize("name,model", list(_inputs()), ids=[name for name, _ in _inputs()])
def test_switch_to_deploy_changes_no_input_and_fuses_a_bare_block(name, model):
    module = model.model if name == "expansion" else model
    randomize_bn_(module).train()
    before = _snapshot(module)
    deployed = repblocks.switch_to_deploy(model)
    _assert_unchanged(module, before)
    assert deployed is not module and not deployed.training
    if isinstance(module, RepBlock):
        assert deployed.deploy and deployed.reparam is not None  # a bare block comes back fused
    assert not any(isinstance(m, RepBlock) and not m.deploy for m in deployed.modules())
    assert not any(isinstance(m, ExpandedRepBlock) for m in deployed.modules())
    x = torch.randn(2, 4, 8, 8)
    assert max_errors(_outputs(module, x), _outputs(deployed, x))[1] < 1e-5
    _assert_unchanged(module.train(), before)  # after the eval-mode forward above, flags put back


def test_inplace_converts_the_bare_block_itself():
    block = randomize_bn_(RepBlock(4, 4, **BRANCH_SETS["dbb"]))
    assert repblocks.switch_to_deploy(block, inplace=True) is block and block.deploy


def test_third_party_block_fusing_itself_is_checked(monkeypatch):
    from timm.models.byobnet import MobileOneBlock

    real = MobileOneBlock.reparameterize

    def sabotaged(self):
        real(self)
        with torch.no_grad():
            self.reparam_conv.bias.add_(0.1)

    monkeypatch.setattr(MobileOneBlock, "reparameterize", sabotaged)
    model = randomize_bn_(nn.Sequential(nn.Identity(), MobileOneBlock(4, 4, num_conv_branches=2))).eval()
    with pytest.raises(FoldError, match=r"^folding 1 \(MobileOneBlock\) changed its output"):
        repblocks.switch_to_deploy(model)
    assert isinstance(repblocks.switch_to_deploy(model, verify=False)[1].reparam_conv, nn.Conv2d)


class _Backbone(nn.Module):
    """A container with a switch_to_deploy of its own (a detector's backbone): its blocks fold, it is not run whole."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(RepBlock(4, 4), RepBlock(4, 4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.blocks(x)

    def switch_to_deploy(self):
        for block in self.blocks:
            block.switch_to_deploy()


def test_a_container_that_fuses_itself_is_not_run_whole():
    deployed = repblocks.switch_to_deploy(nn.Sequential(randomize_bn_(_Backbone())))
    assert deployed[0].calls == 0 and all(block.deploy for block in deployed[0].blocks)
