"""RepGhostNet and GhostNetV3 against timm's classes and RepGhost's own code, both ways, train and deploy forms.

timm (installed) is the reference: random weights through timm's own classes (tiny tables of the same
groups, timm's 1280-channel head), in train form and after timm's ``reparameterize_model``, load exactly
into ours and go back to timm's keys; our deploy form equals timm's re-parameterized output. RepGhost's own
code (ChengpengChen/RepGhost) runs from the mirror where it is there (tests/upstream_repghost.py); its
committed bottleneck files keep the tests meaningful without it.
"""

import copy
import logging

import pytest
import timm
import torch
from timm.models.ghostnet import GhostNet
from timm.models.repghost import RepGhostNet as TimmRepGhostNet

import repblocks
from repblocks.blocks import RepBlock
from repblocks.errors import FoldError
from repblocks.layouts import GHOST_GROUPS_PER_STAGE, convert_layout, detect_layout
from repblocks.models import repghost
from repblocks.models.repghost import GHOSTNET_CONFIGS, GROUPS_PER_STAGE, ConvNorm, GhostBottleneck, RepGhostNet
from repblocks.numerics import max_errors, randomize_bn_

from .upstream_blocks import upstream_modules
from .upstream_repghost import BOTTLENECKS, read_fixture, upstream_bottleneck

FLOAT64 = 1e-12  # relative: float64 sums the same terms in another order
LAYOUT = {"repghost": "timm_repghost", "v3": "timm_ghostnetv3"}
TINY = {"repghost": "repghostnet_tiny", "v3": "ghostnetv3_tiny"}


def _rel(expected, actual) -> float:
    return max_errors(expected, actual)[1]


def _timm_cfgs(stages) -> list:
    """Our table as timm's ``cfgs``: a list of [k, expansion, channels, se_ratio, stride] rows per group."""
    return [
        [[r.kernel_size, r.expansion, r.channels, r.se_ratio, r.stride] for r in group] for s in stages for group in s
    ]


def _pair(version: str):
    """A tiny timm network (random BN statistics, float64) and ours of the same architecture (timm's 1280 head)."""
    cfg = GHOSTNET_CONFIGS[TINY[version]]
    cfg = repghost.GhostNetConfig(**{**cfg.__dict__, "head_channels": 1280})
    cfgs = _timm_cfgs(cfg.stages)
    if version == "v3":
        theirs = GhostNet(cfgs, num_classes=10, width=cfg.width, version="v3")
    else:
        theirs = TimmRepGhostNet(cfgs, num_classes=10, width=cfg.width)
    return randomize_bn_(theirs).double().eval(), RepGhostNet(cfg, num_classes=10).double()


def _fused_as_given(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """``model`` with exactly the RepBlocks fused whose fused conv ``state_dict`` (our layout) holds: timm's deploy form."""
    for name, module in model.named_modules():
        if isinstance(module, RepBlock) and f"{name}.reparam.weight" in state_dict:
            module.deploy_form()
    return model


@pytest.mark.parametrize("version", ["repghost", "v3"])
@torch.no_grad()
def test_timm_weights_load_exactly_both_ways_in_train_and_deploy_form(version, caplog):
    theirs, ours = _pair(version)
    side = 64 if version == "v3" else 32  # timm's GhostNetV3 pools its stride-32 maps once more: 2x2 at least
    x = torch.randn(1, 3, side, side, dtype=torch.float64)
    assert detect_layout(theirs.state_dict()) == LAYOUT[version]
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        repblocks.load_weights(ours, theirs.state_dict())
    assert f"{LAYOUT[version]} layout" in caplog.text
    assert _rel(theirs(x), ours.eval()(x)) < FLOAT64
    back = convert_layout(ours.state_dict(), LAYOUT[version])
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())

    fused = timm.utils.reparameterize_model(theirs)  # a copy: only the ghost modules (and V3's strided conv) fuse
    given = fused.state_dict()
    assert detect_layout(given) == LAYOUT[version]
    from repblocks.layouts import to_repblocks_layout

    partly = _fused_as_given(copy.deepcopy(ours), to_repblocks_layout(given, {"stem", "stages", "head"}))
    repblocks.load_weights(partly, given)
    assert _rel(fused(x), partly(x)) < FLOAT64
    assert convert_layout(partly.state_dict(), LAYOUT[version]).keys() == given.keys()
    deployed = repblocks.switch_to_deploy(ours)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    assert _rel(fused(x), deployed(x)) < 1e-10
    assert _rel(fused.float()(x.float()), repblocks.switch_to_deploy(ours.float())(x.float())) < 1e-5


@torch.no_grad()
def test_timm_reparameterized_repghost_loads_into_our_deploy_form_fusing_the_rest():
    """timm leaves the stem, strided and shortcut Conv+BN pairs unfused: they fuse on loading, as any RepBlock."""
    theirs, ours = _pair("repghost")
    fused = timm.utils.reparameterize_model(theirs)
    cfg = ours.cfg
    deployed = repblocks.load_weights(RepGhostNet(cfg, num_classes=10, deploy=True).double(), fused.state_dict()).eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert _rel(fused(x), deployed(x)) < FLOAT64


@pytest.mark.parametrize("name", ["repghostnet_100", "ghostnetv3_100"])
def test_registered_variants_have_timms_parameters_and_keys(name):
    ours, theirs = repblocks.create_model(name), timm.create_model(name)
    layout = LAYOUT["v3" if "v3" in name else "repghost"]
    assert convert_layout(ours.state_dict(), layout).keys() == theirs.state_dict().keys()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_groups_per_stage_are_the_layouts():
    assert GROUPS_PER_STAGE == GHOST_GROUPS_PER_STAGE
    for cfg in GHOSTNET_CONFIGS.values():  # the final conv is the last stage's last group
        assert tuple(len(stage) for stage in cfg.stages) == (*GROUPS_PER_STAGE[:-1], GROUPS_PER_STAGE[-1] - 1)


@torch.no_grad()
def test_ghostnetv3_runs_on_maps_too_small_for_timms_pool():
    """A 1-pixel side, where timm's 2x2 pool fails, is taken as it is (32x32 images reach 1x1 at stride 32)."""
    model = repblocks.create_model("ghostnetv3_tiny", num_classes=3).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_backbone_levels():
    model = repblocks.create_model("repghostnet_tiny", features_only=True)
    features = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [32, 16, 8, 4, 2]
    assert [f.shape[1] for f in features] == model.feature_info.channels()


@torch.no_grad()
def test_conv_norm_fold_checks_itself(monkeypatch):
    norm = randomize_bn_(ConvNorm(4, 4, (1, 5), groups=4)).eval()
    x = torch.randn(1, 4, 6, 7)
    expected = norm(x)
    assert norm.deploy_form().module is norm and norm.bn is None
    assert _rel(expected, norm(x)) < 1e-6
    assert norm.deploy_form().module is norm  # again: nothing to fold
    broken = randomize_bn_(ConvNorm(4, 4, (5, 1), groups=4))
    monkeypatch.setattr(repghost, "fuse_conv_bn", lambda conv, bn: (conv.weight, torch.zeros(4)))
    with pytest.raises(FoldError):
        broken.deploy_form()


def _our_bottleneck(name: str, *, deploy: bool) -> GhostBottleneck:
    case = BOTTLENECKS[name]
    return GhostBottleneck(case.in_channels, case.row, deploy=deploy).double().eval()


@pytest.mark.parametrize("name", BOTTLENECKS)
@torch.no_grad()
def test_upstream_repghost_bottleneck_loads_exactly_both_ways(name):
    fixture = read_fixture(name)
    x = fixture["input"]
    assert detect_layout(fixture["train"]) == "timm_repghost"  # RepGhost's own keys are timm's
    train = repblocks.load_weights(_our_bottleneck(name, deploy=False), fixture["train"])
    assert _rel(fixture["output.train"], train(x)) < FLOAT64
    fused_on_loading = repblocks.load_weights(_our_bottleneck(name, deploy=True), fixture["train"])
    assert _rel(fixture["output.train"], fused_on_loading(x)) < FLOAT64
    back = convert_layout(train.state_dict(), "timm_repghost")
    assert back.keys() == fixture["train"].keys()
    assert all(torch.equal(back[k], v) for k, v in fixture["train"].items())
    # Their deploy form fuses only the cheap operations: ours, with the same blocks fused, takes it exactly.
    from repblocks.layouts import to_repblocks_layout

    partly = _fused_as_given(_our_bottleneck(name, deploy=False), to_repblocks_layout(fixture["deploy"], {"ghost1"}))
    repblocks.load_weights(partly, fixture["deploy"])
    assert _rel(fixture["output.deploy"], partly(x)) < FLOAT64
    assert convert_layout(partly.state_dict(), "timm_repghost").keys() == fixture["deploy"].keys()
    assert _rel(fixture["output.deploy"], repblocks.switch_to_deploy(train)(x)) < FLOAT64


@pytest.mark.parametrize("name", BOTTLENECKS)
@torch.no_grad()
def test_upstream_code_still_computes_the_committed_outputs(name):
    fixture = read_fixture(name)
    theirs = upstream_bottleneck(name)  # skips, saying why, without the mirror
    theirs.load_state_dict(fixture["train"])
    assert _rel(fixture["output.train"], theirs(fixture["input"])) < FLOAT64


@torch.no_grad()
def test_upstream_repghost_network_loads_exactly_and_deploys_to_its_conversion():
    module = upstream_modules("repghost").repghost  # skips without the mirror
    cfg = repghost.GhostNetConfig(**{**GHOSTNET_CONFIGS["repghostnet_tiny"].__dict__, "head_channels": 1280})
    theirs = randomize_bn_(module.RepGhostNet(_timm_cfgs(cfg.stages), num_classes=10, width=cfg.width)).double().eval()
    ours = repblocks.load_weights(RepGhostNet(cfg, num_classes=10).double(), theirs.state_dict()).eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert _rel(theirs(x), ours(x)) < FLOAT64
    converted = module.repghost_model_convert(theirs)
    deployed = repblocks.load_weights(RepGhostNet(cfg, num_classes=10, deploy=True).double(), converted.state_dict())
    assert _rel(converted(x), deployed.eval()(x)) < FLOAT64
    assert _rel(converted(x), repblocks.switch_to_deploy(ours)(x)) < 1e-10
