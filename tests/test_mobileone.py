"""MobileOne: the shapes of apple's network, parameter counts as apple publishes and timm builds them.

Key sets and shapes are compared with apple's code (tests/apple_mobileone_layout.py, a re-creation
of apple/ml-mobileone) and with timm's ``mobileone_*``; outputs across code bases are in
test_layouts_upstream.py, train vs deploy form of every registered model in test_models.py.
"""

from pathlib import Path

import pytest
import torch
import yaml

import repblocks
from repblocks.layouts import convert_layout
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.profile import count_params

from .apple_mobileone_layout import mobileone

VARIANTS = ["s0"] + [pytest.param(variant, marks=pytest.mark.slow) for variant in ("s1", "s2", "s3", "s4")]
# Parameters in deploy form, millions, as the MobileOne paper (arXiv 2206.04040) publishes them.
PUBLISHED_MILLIONS = {"s0": 2.1, "s1": 4.8, "s2": 7.8, "s3": 10.1, "s4": 14.8}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def _shapes(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_equal_apples_and_parameter_counts_equal_apples_and_timms(variant):
    timm = pytest.importorskip("timm")
    name = f"mobileone_{variant}"
    train, deploy = repblocks.create_model(name), repblocks.create_model(name, deploy=True)
    apple_train, apple_deploy = mobileone(variant=variant), mobileone(variant=variant, inference_mode=True)
    assert _shapes(convert_layout(train.state_dict(), "apple")) == _shapes(apple_train.state_dict())
    assert _shapes(convert_layout(deploy.state_dict(), "apple")) == _shapes(apple_deploy.state_dict())
    assert count_params(deploy) == count_params(apple_deploy)
    assert round(count_params(deploy) / 1e6, 1) == PUBLISHED_MILLIONS[variant]
    assert count_params(train) == count_params(timm.create_model(name))


def test_tiny_takes_every_code_path_at_32x32():
    """k > 1, SE in some blocks only, identities in depthwise and pointwise blocks, strides, and the stem."""
    model = randomize_bn_(repblocks.create_model("mobileone_tiny", num_classes=10)).eval()
    blocks = [block for stage in model.stages for block in stage]
    depthwise, pointwise = blocks[0::2], blocks[1::2]
    assert len(model.stem.conv_kxk) == 1 and model.stem.identity is None
    assert all(len(block.conv_kxk) == 2 for block in blocks)
    assert all(block.groups == block.in_channels and block.conv_1x1 is not None for block in depthwise)
    assert all(block.kernel_size == 1 and block.conv_1x1 is None for block in pointwise)
    se = [not isinstance(block.se, torch.nn.Identity) for block in blocks]
    assert any(se) and not all(se)
    assert any(block.identity is not None for block in depthwise) and any(b.identity is not None for b in pointwise)
    assert {block.stride for block in depthwise} == {1, 2}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_errors(model(x), repblocks.switch_to_deploy(model)(x))[1] < 1e-5


def test_feature_levels_equal_timms():
    timm = pytest.importorskip("timm")
    ours = repblocks.create_model("mobileone_s0", features_only=True).feature_info
    theirs = timm.create_model("mobileone_s0", features_only=True).feature_info
    assert ours.channels() == theirs.channels() and ours.reduction() == theirs.reduction()


def test_every_mobileone_has_its_model_config():
    names = repblocks.list_models("mobileone_*")
    assert {path.stem for path in CONFIGS.glob("mobileone_*.yaml")} == set(names)
    for name in names:
        assert yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["name"] == name


def test_builder_arguments_are_keyword_only_and_named_when_unknown():
    with pytest.raises(ValueError, match=r"mobileone_tiny got unknown argument keep_post_bn; it accepts: act, "):
        repblocks.create_model("mobileone_tiny", keep_post_bn=True)
    model = repblocks.create_model("mobileone_tiny", in_chans=1, num_classes=3, act="gelu", drop_rate=0.1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert isinstance(model.stages[0][0].act, torch.nn.GELU) and model.head.drop.p == 0.1
