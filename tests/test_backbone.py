"""The backbone surface, as timm's: feature_info that follows out_indices, forward_intermediates, pruning,
train vs deploy form of every backbone (generated from the registry), and a detector built on one."""

import runpy
from pathlib import Path

import pytest
import torch

import repblocks
from repblocks.features import FeatureInfo
from repblocks.numerics import max_errors, randomize_bn_

from .conftest import LARGE_MODELS, TINY_MODELS

TINY_THEN_SLOW = TINY_MODELS + [pytest.param(name, marks=pytest.mark.slow) for name in LARGE_MODELS]
ROOT = Path(__file__).resolve().parents[1]
SIDE = 64  # every level down to stride 32 is 2x2


def _backbone(name, **kwargs):
    return randomize_bn_(repblocks.create_model(name, features_only=True, **kwargs)).eval()


@pytest.mark.parametrize("name", TINY_THEN_SLOW)
@torch.no_grad()
def test_features_match_feature_info_for_the_chosen_levels(name):
    x = torch.randn(1, 3, SIDE, SIDE)
    for out_indices in [None, (1, 3), (0, -1), 2]:
        model = _backbone(name, out_indices=out_indices)
        info = model.feature_info
        features = model(x)
        assert len(features) == len(info.channels()) == len(info.out_indices)
        shapes = [
            (1, level["num_chs"], SIDE // level["reduction"], SIDE // level["reduction"]) for level in info.get_dicts()
        ]
        assert [tuple(f.shape) for f in features] == shapes, f"{name} out_indices={out_indices}"


def test_out_indices_forms_resolve_as_timm_and_stay_in_network_order():
    def levels(out_indices):
        return repblocks.create_model(
            "repvgg_tiny", features_only=True, out_indices=out_indices
        ).feature_info.out_indices

    assert levels(None) == (0, 1, 2, 3, 4)
    assert levels((1, 3)) == (1, 3)
    assert levels((-2, -1)) == (3, 4)
    assert levels(2) == (3, 4)  # an int: the last n levels


@pytest.mark.parametrize("out_indices", [(1, 5), (-6,), (3, 1), (2, 2), (), 0, 6, (1.0,)])
def test_out_indices_that_do_not_name_levels_in_order_are_refused(out_indices):
    with pytest.raises(ValueError, match=r"out_indices") as err:
        repblocks.create_model("repvgg_tiny", features_only=True, out_indices=out_indices)
    assert "\n" not in str(err.value)


def test_out_indices_without_features_only_is_refused():
    with pytest.raises(ValueError, match="features_only=True"):
        repblocks.create_model("repvgg_tiny", out_indices=(1, 2))


def test_a_classifier_describes_every_level_and_a_backbone_only_its_own():
    classifier = repblocks.create_model("repvgg_tiny")
    backbone = repblocks.create_model("repvgg_tiny", features_only=True, out_indices=(1, 3))
    assert classifier.feature_info.out_indices == (0, 1, 2, 3, 4)
    assert backbone.feature_info.channels() == [classifier.feature_info.channels(i) for i in (1, 3)]
    assert backbone.feature_info.reduction() == [4, 16]
    assert backbone.feature_info.module_name() == ["stages.0", "stages.2"]
    # As timm: len() and [i] address every level, whatever out_indices chose.
    assert len(backbone.feature_info) == 5 and backbone.feature_info[0]["module"] == "stem"
    assert backbone.feature_info.get_dicts(keys=["num_chs"]) == [
        {"num_chs": c} for c in backbone.feature_info.channels()
    ]
    assert backbone.feature_info.channels([0, 4]) == classifier.feature_info.channels([0, 4])


def test_feature_info_names_modules_that_produce_those_features():
    model = repblocks.create_model("repvgg_tiny").eval()
    x = torch.randn(1, 3, SIDE, SIDE)
    outputs = {}
    for level in model.feature_info.get_dicts():
        module = model.get_submodule(level["module"])
        module.register_forward_hook(lambda _m, _i, out, key=level["module"]: outputs.setdefault(key, out))
    with torch.no_grad():
        _, intermediates = model.forward_intermediates(x)
    hooked = [outputs[name] for name in model.feature_info.module_name()]
    assert all(torch.equal(a, b) for a, b in zip(hooked, intermediates, strict=True))


def test_a_backbone_stops_at_its_last_level():
    full = repblocks.create_model("repvgg_tiny", features_only=True)
    short = repblocks.create_model("repvgg_tiny", features_only=True, out_indices=(1, 2))
    assert len(full.stages) == 4 and len(short.stages) == 2
    assert short.head is None and short.num_classes == 0
    short(torch.randn(1, 3, 32, 32))[-1].sum().backward()
    assert all(p.grad is not None for p in short.parameters()), "a backbone holds no unused parameters"


@pytest.mark.parametrize("timm_indices", [(1, 3), (0, 1, 2, 3, 4), (-2, -1)])
def test_channels_and_reductions_equal_timms(timm_indices):
    timm = pytest.importorskip("timm")
    ours = repblocks.create_model("repvgg_a0", features_only=True, out_indices=timm_indices).feature_info
    theirs = timm.create_model("repvgg_a0", features_only=True, out_indices=timm_indices).feature_info
    assert ours.channels() == theirs.channels() and ours.reduction() == theirs.reduction()


@torch.no_grad()
def test_forward_intermediates_as_timm():
    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    final, intermediates = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert [f.shape[1] for f in intermediates] == model.feature_info.channels()
    assert torch.equal(model.forward_head(final), model(x))
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:], strict=True))
    picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert torch.equal(picked[0], intermediates[0]) and torch.equal(picked[1], intermediates[4])
    early_final, early = model.forward_intermediates(x, indices=[1, 2], stop_early=True)
    assert torch.equal(early_final, intermediates[2]) and torch.equal(early[1], intermediates[2])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match=r"levels in 0\.\.4"):
        model.forward_intermediates(x, indices=[5])


@torch.no_grad()
def test_prune_intermediate_layers_keeps_the_features_it_is_asked_for():
    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    _, before = model.forward_intermediates(x)
    assert model.prune_intermediate_layers(indices=(1, 2)) == [1, 2]
    assert len(model.stages) == 2 and model.num_classes == 0
    after = model.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    assert torch.equal(after[0], before[1]) and torch.equal(after[1], before[2])
    assert model(x).shape == (2, model.feature_info.channels(2)) == (2, model.num_features)


@pytest.mark.parametrize("name", TINY_THEN_SLOW)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@torch.no_grad()
def test_deploy_form_of_a_backbone_gives_the_same_features(name, dtype, tolerance):
    backbone = _backbone(name, out_indices=(0, 2, 4)).to(dtype)
    x = torch.randn(2, 3, SIDE, SIDE, dtype=dtype)
    expected = backbone(x)
    deployed = repblocks.switch_to_deploy(backbone)
    assert all(block.deploy for block in deployed.modules() if isinstance(block, repblocks.RepBlock))
    for level, want, got in zip(backbone.feature_info.out_indices, expected, deployed(x), strict=True):
        assert max_errors(want, got)[1] < tolerance, f"{name} level {level}"


@pytest.mark.parametrize("name", TINY_THEN_SLOW)
@torch.no_grad()
def test_deploy_form_gives_the_same_intermediates(name):
    model = randomize_bn_(repblocks.create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    final, expected = model.forward_intermediates(x)
    deployed_final, actual = repblocks.switch_to_deploy(model).forward_intermediates(x)
    for level, (want, got) in enumerate(zip([*expected, final], [*actual, deployed_final], strict=True)):
        assert max_errors(want, got)[1] < 1e-5, f"{name} level {level}"


def test_feature_info_can_be_built_for_other_models():
    info = FeatureInfo([dict(num_chs=8, reduction=2, module="a"), dict(num_chs=16, reduction=4, module="b")], [-1])
    assert info.out_indices == (1,) and info.channels() == [16] and info.module_name(0) == "a"


def test_a_backbone_inside_faster_rcnn_deploys_with_the_same_detections():
    """examples/detection_backbone.py: one training step, switch_to_deploy of the whole detector, same detections."""
    pytest.importorskip("torchvision")
    example = runpy.run_path(str(ROOT / "examples" / "detection_backbone.py"))  # exits non-zero on a mismatch
    expected, actual = example["expected"], example["actual"]
    assert all(len(detections["boxes"]) > 0 for detections in expected), "nothing detected: nothing compared"
    for want, got in zip(expected, actual, strict=True):
        assert torch.equal(want["labels"], got["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-9)
        torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-9)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in example["deployed"].modules())
