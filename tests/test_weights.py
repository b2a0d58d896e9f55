"""load_weights: layouts of other code bases, wrappers, train-to-deploy on load, and safe reading."""

import argparse
import json
import logging
import pickle
import shlex
import sys
from collections import OrderedDict

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

import repblocks
from repblocks.blocks import BRANCH_SETS, RepBlock
from repblocks.checkpoint import read_safetensors_metadata
from repblocks.layouts import convert_layout, detect_layout
from repblocks.numerics import max_errors, randomize_bn_

from .conftest import TINY_MODELS
from .mmpretrain_layout import MMImageClassifier
from .official_layout import OfficialRepVGG

X = torch.randn(2, 3, 32, 32)
TINY = dict(num_blocks=(2, 2, 2, 1), widths=(0.25, 0.25, 0.25, 0.25))


def _official(deploy=False, **kwargs):
    model = OfficialRepVGG(**TINY, deploy=deploy, **kwargs)
    return randomize_bn_(model).eval()


@torch.no_grad()
@pytest.mark.parametrize(
    "name,kwargs", [("repvgg_tiny", {}), ("repvgg_tiny_g2se", {"groups_map": {2: 2, 4: 2, 6: 2}, "use_se": True})]
)
def test_official_layout_train_form(name, kwargs):
    official = _official(**kwargs)
    ours = repblocks.load_weights(repblocks.create_model(name, num_classes=10), official.state_dict()).eval()
    assert max_errors(official(X), ours(X))[1] < 1e-6


@torch.no_grad()
def test_official_layout_deploy_form_and_train_form_into_deploy_model():
    official = _official()
    expected = official(X)
    deploy_official = OfficialRepVGG(**TINY, deploy=True)
    deploy_state = repblocks.load_weights(
        repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), official.state_dict()
    )
    # Our fused weights, written in the official layout, run in the official deploy model ...
    deploy_official.load_state_dict(convert_layout(deploy_state.state_dict(), "official"))
    assert max_errors(expected, deploy_official.eval()(X))[1] < 1e-5
    # ... and official deploy weights load into our deploy model.
    ours = repblocks.load_weights(
        repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), deploy_official.state_dict()
    )
    assert max_errors(expected, ours.eval()(X))[1] < 1e-5


# timm's RepVGGs in float64: with timm's init and random BN statistics, D2se amplifies rounding to 0.2 in float32
# and up to 1e-8 in float64 (input-dependent), where a misplaced weight costs O(1). A0 in the default run; under
# slow, one of each other code path (B depths, groups, SE with timm's attn.fc keys): the rest differ in widths only.
TIMM_REPVGG = ["repvgg_a0"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("repvgg_b0", "repvgg_b1g4", "repvgg_d2se")
]
X64 = X.double()
FLOAT64 = 1e-6


@pytest.fixture(scope="module", params=TIMM_REPVGG)
def timm_repvgg(request):
    return request.param, randomize_bn_(timm.create_model(request.param, num_classes=10)).double().eval()


@torch.no_grad()
def test_timm_layout_train_form_matches_timm_outputs_exactly(timm_repvgg):
    name, timm_model = timm_repvgg
    ours = repblocks.load_weights(repblocks.create_model(name, num_classes=10).double(), timm_model.state_dict())
    assert torch.equal(ours.eval()(X64), timm_model(X64))


@torch.no_grad()
def test_timm_layout_deploy_form_and_train_form_into_deploy_model(timm_repvgg):
    name, timm_model = timm_repvgg
    expected = timm_model(X64)
    timm_deploy = reparameterize_model(timm_model)
    from_deploy = repblocks.load_weights(
        repblocks.create_model(name, num_classes=10, deploy=True).double(), timm_deploy.state_dict()
    )
    from_train = repblocks.load_weights(
        repblocks.create_model(name, num_classes=10, deploy=True).double(), timm_model.state_dict()
    )
    assert torch.equal(timm_deploy(X64), from_deploy.eval()(X64))
    assert max_errors(expected, from_train.eval()(X64))[1] < FLOAT64


@torch.no_grad()
@pytest.mark.parametrize("deploy", [False, True])
def test_our_weights_load_into_timm_and_the_official_code(deploy, timm_repvgg):
    name, _ = timm_repvgg
    ours = randomize_bn_(repblocks.create_model(name, num_classes=10)).double().eval()
    expected = ours(X64)
    if deploy:
        ours = repblocks.switch_to_deploy(ours)
    timm_model = timm.create_model(name, num_classes=10).double().eval()
    if deploy:
        timm_model = reparameterize_model(timm_model)
    timm_model.load_state_dict(convert_layout(ours.state_dict(), "timm"))
    assert max_errors(expected, timm_model(X64))[1] < FLOAT64
    official = OfficialRepVGG(**TINY, deploy=deploy).eval()
    tiny = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
    tiny_expected = tiny(X)
    official.load_state_dict(
        convert_layout((repblocks.switch_to_deploy(tiny) if deploy else tiny).state_dict(), "official")
    )
    assert max_errors(tiny_expected, official(X))[1] < 1e-5


def test_unknown_layout_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="known layouts: repblocks, official, timm, .*mmpretrain, .*thu_repvit, unireplknet"
    ):
        convert_layout({}, "caffe")


@torch.no_grad()
def test_timm_se_layout_loads():
    """timm's RepVGG-D2se keeps SE as attn.fc1/fc2; a tiny model of the same layout checks the renaming."""
    source = randomize_bn_(repblocks.create_model("repvgg_tiny_g2se", num_classes=10)).eval()
    timm_style = {
        k.replace("se.down.", "attn.fc1.").replace("se.up.", "attn.fc2."): v for k, v in source.state_dict().items()
    }
    ours = repblocks.load_weights(repblocks.create_model("repvgg_tiny_g2se", num_classes=10), timm_style).eval()
    assert torch.equal(ours(X), source(X))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "model.module."])
def test_wrapper_prefixes_are_stripped(prefix):
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    wrapped = {prefix + k: v for k, v in source.state_dict().items()}
    loaded = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), wrapped)
    assert torch.equal(loaded.stem.conv_kxk.bn.running_var, source.stem.conv_kxk.bn.running_var)


def test_lightning_style_checkpoint_file(tmp_path):
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    state = OrderedDict((f"model.{k}", v) for k, v in source.state_dict().items())
    state["ema.stem.conv_kxk.conv.weight"] = torch.zeros(1)  # extra entries a trainer may keep beside the model
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 30, "state_dict": state, "hyper_parameters": {"model": "repvgg_tiny"}}, path)
    loaded = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), path)
    assert torch.equal(loaded.head.fc.weight, source.head.fc.weight)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_files_of_every_suffix(tmp_path, suffix):
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        repblocks.save_weights(source, path)
    else:
        torch.save(source.state_dict(), path)
    loaded = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), path)
    assert torch.equal(loaded.stem.conv_kxk.conv.weight, source.stem.conv_kxk.conv.weight)


def test_mismatch_names_missing_unexpected_and_reshaped_keys():
    source = repblocks.create_model("repvgg_tiny", num_classes=10).state_dict()
    source.pop("head.fc.bias")
    source["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \(head.fc.bias\); 1 unexpected keys \(extra.weight\)"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), source)
    with pytest.raises(ValueError, match=r"head.fc.weight: \(10, 128\) in the weights, \(5, 128\) in the model"):
        repblocks.load_weights(
            repblocks.create_model("repvgg_tiny", num_classes=5),
            repblocks.create_model("repvgg_tiny", num_classes=10).state_dict(),
        )


def test_non_strict_loads_what_fits(caplog):
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).state_dict()
    source.pop("head.fc.bias")
    loaded = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), source, strict=False)
    assert torch.equal(loaded.head.fc.weight, source["head.fc.weight"])
    assert "head.fc.bias" in caplog.text


def test_deploy_weights_into_train_model_say_what_to_do():
    deployed = repblocks.switch_to_deploy(repblocks.create_model("repvgg_tiny"))
    with pytest.raises(ValueError, match="deploy-form weights: build the model with deploy=True"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny"), deployed.state_dict())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny"), tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_junk_and_truncated_files(tmp_path, suffix):
    junk = tmp_path / f"junk{suffix}"
    junk.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        repblocks.read_state_dict(junk)
    good = tmp_path / f"good{suffix}"
    model = repblocks.create_model("repvgg_tiny")
    repblocks.save_weights(model, good) if suffix == ".safetensors" else torch.save(model.state_dict(), good)
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read"):
        repblocks.read_state_dict(truncated)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Payload()}, handle)
    # A plain pickle file, and the same payload inside torch's zip format.
    torch.save({"state_dict": _Payload()}, tmp_path / "evil_zip.pth")
    for candidate in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(ValueError, match="refusing to load"):
            repblocks.read_state_dict(candidate)
    assert not (tmp_path / "pwned").exists()


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"epoch": 3, "note": "no weights here"}, path)
    with pytest.raises(ValueError, match="holds no state dict"):
        repblocks.read_state_dict(path)


def test_save_weights_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        repblocks.save_weights(repblocks.create_model("repvgg_tiny"), path)
    assert list(tmp_path.iterdir()) == []


TIMM_TWINS = [name for name in timm.list_models("repvgg*") if name in repblocks.list_models()]


@pytest.mark.parametrize(
    "name", [name if name == "repvgg_a0" else pytest.param(name, marks=pytest.mark.slow) for name in TIMM_TWINS]
)
@torch.no_grad()
def test_every_timm_twin_has_the_same_architecture(name):
    """timm's RepVGG weights load strictly into ours and give identical outputs, variant by variant."""
    reference = randomize_bn_(timm.create_model(name, num_classes=10)).eval()
    ours = repblocks.load_weights(repblocks.create_model(name, num_classes=10), reference.state_dict()).eval()
    assert torch.equal(ours(X), reference(X))


@pytest.mark.parametrize("name", TINY_MODELS)
@torch.no_grad()
def test_train_form_weights_fuse_on_load_into_a_deploy_model(name):
    """Grouped blocks and SE included: the deploy model gets fused convs and the SE weights as they are."""
    source = randomize_bn_(repblocks.create_model(name, num_classes=10)).eval()
    deployed = repblocks.load_weights(repblocks.create_model(name, num_classes=10, deploy=True), source.state_dict())
    assert max_errors(source(X), deployed.eval()(X))[1] < 1e-5


@torch.no_grad()
def test_models_of_other_layouts_load_their_own_weights_unrenamed():
    """load_weights serves any model: timm's D2se-style keys (attn.fc1) stay as they are for a timm model."""
    source = randomize_bn_(timm.create_model("repvgg_a0", num_classes=10, attn_layer="se")).eval()
    target = timm.create_model("repvgg_a0", num_classes=10, attn_layer="se").eval()
    assert any(".attn.fc1." in key for key in source.state_dict())
    repblocks.load_weights(target, {f"module.{k}": v for k, v in source.state_dict().items()})
    assert torch.equal(target(X), source(X))


# --- mmpretrain's layout -------------------------------------------------------------------------

MM_VARIANTS = {"repvgg_tiny": {}, "repvgg_tiny_g2se": {"group_layer_map": {2: 2, 4: 2, 6: 2}, "use_se": True}}


def _mmpretrain(name, deploy=False):
    return randomize_bn_(MMImageClassifier(**TINY, **MM_VARIANTS[name], deploy=deploy)).eval()


@torch.no_grad()
@pytest.mark.parametrize("name", MM_VARIANTS)
def test_mmpretrain_layout_train_form_both_ways(name, caplog):
    mm = _mmpretrain(name)
    expected = mm(X)
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        ours = repblocks.load_weights(repblocks.create_model(name, num_classes=10), mm.state_dict()).eval()
    assert "mmpretrain layout, train form" in caplog.text
    assert torch.equal(ours(X), expected)
    # Train-form weights fuse on the way into our deploy model, SE included.
    fused = repblocks.load_weights(repblocks.create_model(name, num_classes=10, deploy=True), mm.state_dict())
    assert max_errors(expected, fused.eval()(X))[1] < 1e-5
    # And back: our weights in mmpretrain's layout load strictly into its classifier.
    back = MMImageClassifier(**TINY, **MM_VARIANTS[name]).eval()
    back.load_state_dict(convert_layout(ours.state_dict(), "mmpretrain"))
    assert torch.equal(back(X), expected)


@torch.no_grad()
def test_mmpretrain_layout_deploy_form_both_ways():
    mm = _mmpretrain("repvgg_tiny")
    expected = mm(X)
    mm_deploy = repblocks.switch_to_deploy(mm)  # mmpretrain's own fusion (its blocks' switch_to_deploy)
    assert hasattr(mm_deploy.backbone.stem, "branch_reparam")
    ours = repblocks.load_weights(
        repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), mm_deploy.state_dict()
    ).eval()
    assert max_errors(expected, ours(X))[1] < 1e-5
    back = MMImageClassifier(**TINY, deploy=True).eval()
    back.load_state_dict(convert_layout(ours.state_dict(), "mmpretrain"))
    assert torch.equal(back(X), ours(X))


@torch.no_grad()
def test_mmpretrain_backbone_only_weights_into_a_backbone():
    """Detection code bases keep mmpretrain's backbone keys without the ``backbone.`` prefix."""
    mm = _mmpretrain("repvgg_tiny")
    backbone_only = {k.removeprefix("backbone."): v for k, v in mm.state_dict().items() if k.startswith("backbone.")}
    ours = repblocks.load_weights(repblocks.create_model("repvgg_tiny", features_only=True), backbone_only).eval()
    assert torch.equal(ours(X)[-1], mm.backbone(X)[-1])


def _layout_samples():
    timm_se = timm.create_model("repvgg_a0", num_classes=10, attn_layer="se")
    ours_se = repblocks.create_model("repvgg_tiny_g2se", num_classes=10)
    return {
        "official": [OfficialRepVGG(**TINY).state_dict(), OfficialRepVGG(**TINY, deploy=True).state_dict()],
        "timm": [reparameterize_model(timm.create_model("repvgg_a0")).state_dict(), timm_se.state_dict()],
        "mmpretrain": [MMImageClassifier(**TINY).state_dict(), MMImageClassifier(**TINY, deploy=True).state_dict()],
        "repblocks": [ours_se.state_dict(), repblocks.switch_to_deploy(ours_se).state_dict()],
    }


def test_layouts_are_told_apart_in_both_forms_and_behind_wrappers():
    for layout, samples in _layout_samples().items():
        for state_dict in samples:
            assert detect_layout(state_dict) == layout
            assert detect_layout(f"module.{key}" for key in state_dict) == layout


# --- loading into deploy-form models --------------------------------------------------------------


@torch.no_grad()
def test_our_train_form_safetensors_loads_into_a_deploy_model(tmp_path):
    """The file holds BN's int64 step counters beside the floats; fusion must not take its dtype from them."""
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
    path = repblocks.save_weights(source, tmp_path / "train_form.safetensors")
    deployed = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), path)
    assert max_errors(source(X), deployed.eval()(X))[1] < 1e-5


def _without(state_dict, fragment):
    return {k: v for k, v in state_dict.items() if fragment not in k}


@pytest.mark.parametrize(
    "edit,named",
    [
        (lambda sd: _without(sd, "stages.0.1.conv_1x1."), "stages.0.1.conv_1x1.conv.weight"),  # a whole 1x1 branch
        (lambda sd: _without(sd, "stages.0.1.identity."), "stages.0.1.identity.running_var"),  # the identity BN
        (lambda sd: _without(sd, "stem.conv_kxk.bn.running_mean"), "stem.conv_kxk.bn.running_mean"),
        (lambda sd: {**sd, "stages.0.0.identity.weight": torch.ones(32)}, "stages.0.0.identity.weight"),  # stride 2
        (lambda sd: {**sd, "stem.conv_kxk.conv.bias": torch.zeros(16)}, "stem.conv_kxk.conv.bias"),
    ],
    ids=["missing-1x1-branch", "missing-identity", "missing-bn-stat", "extra-identity", "extra-bias"],
)
def test_strict_deploy_load_names_missing_and_extra_branch_weights(edit, named, caplog):
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
    weights = edit(source.state_dict())
    with pytest.raises(ValueError, match=rf"weights do not fit RepVGG: .*{named}"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), weights)
    with caplog.at_level(logging.WARNING, logger="repblocks.weights"):
        repblocks.load_weights(
            repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), weights, strict=False
        )
    assert named in caplog.text and "reparam" not in caplog.text  # the branches are named, not the fused conv


def test_non_strict_deploy_load_names_the_block_left_unfused(caplog):
    """One branch tensor missing leaves the block's whole fused conv at random init: the warning must say so."""
    weights = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).state_dict()
    del weights["stages.0.1.conv_1x1.bn.running_var"]
    model = repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True)
    random_init = model.stages[0][1].reparam.weight.clone()
    with caplog.at_level(logging.WARNING, logger="repblocks.weights"):
        repblocks.load_weights(model, weights, strict=False)
    assert torch.equal(model.stages[0][1].reparam.weight, random_init)
    assert "1 deploy-form block(s) left unfused" in caplog.text and "random init" in caplog.text
    assert "(stages.0.1)" in caplog.text
    with pytest.raises(ValueError, match=r"block\(s\) left unfused .*\(stages\.0\.1\)"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), weights)


# --- BatchNorm eps and block kinds: what a state dict does not record --------------------------------


@pytest.mark.parametrize("name", ["repvgg_tiny", "qarepvgg_tiny", "mobileone_tiny"])
@torch.no_grad()
def test_train_form_weights_fuse_with_the_bn_eps_the_deploy_model_was_built_with(name):
    source = randomize_bn_(repblocks.create_model(name, num_classes=10, bn_eps=1e-3)).double().eval()
    for module in source.modules():  # small variances, where eps matters most
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(1e-4, 1e-2)
    fused = repblocks.create_model(name, num_classes=10, bn_eps=1e-3, deploy=True).double()
    repblocks.load_weights(fused, source.state_dict())
    assert max_errors(source(X.double()), fused.eval()(X.double()))[1] < 1e-10


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), True, "1e-3"])
def test_bn_eps_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match="bn_eps must be a positive number"):
        repblocks.create_model("repvgg_tiny", bn_eps=bad)


def test_our_files_record_bn_eps_and_block_kinds(tmp_path):
    model = repblocks.create_model("qarepvgg_v2_tiny", num_classes=10, bn_eps=1e-3)
    metadata = read_safetensors_metadata(repblocks.save_weights(model, tmp_path / "w.safetensors"))
    assert json.loads(metadata["bn_eps"]) == 1e-3
    assert {kind["avg_pool_branch"] for kind in json.loads(metadata["block_kinds"])} == {True}


@pytest.mark.parametrize("via", ["load_weights", "create_model"])
def test_our_qarepvgg_v2_file_is_refused_by_a_v1_model_though_the_keys_fit(tmp_path, via):
    v2 = randomize_bn_(repblocks.create_model("qarepvgg_v2_tiny", num_classes=10))
    path = repblocks.save_weights(v2, tmp_path / "v2.safetensors", metadata={"model": "qarepvgg_v2_tiny"})
    with pytest.raises(ValueError, match=r"saved from qarepvgg_v2_tiny.*avg_pool_branch=True"):
        if via == "load_weights":
            repblocks.load_weights(repblocks.create_model("qarepvgg_tiny", num_classes=10), path)
        else:
            repblocks.create_model("qarepvgg_tiny", pretrained=path)
    repblocks.load_weights(repblocks.create_model("qarepvgg_v2_tiny", num_classes=10), path)  # its own kind loads
    deployed = repblocks.switch_to_deploy(v2)  # every kind fuses into the same conv: nothing to confuse
    deploy_path = repblocks.save_weights(deployed, tmp_path / "v2_deploy.safetensors")
    repblocks.load_weights(repblocks.create_model("qarepvgg_tiny", num_classes=10, deploy=True), deploy_path)


def test_our_file_is_refused_by_a_model_with_another_bn_eps(tmp_path):
    path = repblocks.save_weights(repblocks.create_model("repvgg_tiny", bn_eps=1e-3), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"BatchNorm eps 0\.001; RepVGG's BatchNorms use eps 1e-05: .*bn_eps=0\.001"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny"), path)
    with pytest.raises(ValueError, match=r"bn_eps=0\.001"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny", deploy=True), path)  # fused with the wrong eps
    repblocks.load_weights(repblocks.create_model("repvgg_tiny", bn_eps=1e-3, deploy=True), path)


def test_a_backbone_takes_its_classifiers_file_of_several_block_kinds(tmp_path):
    """MobileOne has three block kinds; a backbone built to level 0 has one of them: a subset, not another kind."""
    path = repblocks.save_weights(repblocks.create_model("mobileone_tiny"), tmp_path / "w.safetensors")
    repblocks.create_model("mobileone_tiny", features_only=True, out_indices=(0,), pretrained=path)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_half_precision_weights_fuse_in_float64_and_round_once_to_the_model_dtype(file_dtype, model_dtype):
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    weights = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    reference = repblocks.create_model("repvgg_tiny", num_classes=10).double()
    reference.load_state_dict(weights)  # the file's values, exactly, in float64
    reference = repblocks.switch_to_deploy(reference).state_dict()
    model = repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True).to(model_dtype)
    loaded = repblocks.load_weights(model, weights).state_dict()
    fused = [key for key in loaded if "reparam" in key]
    assert fused and all(loaded[key].dtype == model_dtype for key in fused)
    assert all(torch.equal(loaded[key], reference[key].to(model_dtype)) for key in fused)


# --- wrapped and headless models --------------------------------------------------------------------


WRAPPERS = {  # how a wrapper is made, and the attribute that holds the module it wraps
    "torch.compile": (torch.compile, "_orig_mod"),
    "DataParallel": (nn.DataParallel, "module"),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_load_into_a_wrapped_model_fills_the_module_it_wraps(wrapper):
    wrap, inner = WRAPPERS[wrapper]
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    wrapped = wrap(repblocks.create_model("repvgg_tiny", num_classes=10))
    assert repblocks.load_weights(wrapped, source.state_dict()) is wrapped
    assert torch.equal(getattr(wrapped, inner).stem.conv_kxk.bn.running_var, source.stem.conv_kxk.bn.running_var)
    # The wrapped model's own state dict (keys under the wrapper's prefix) loads back the same way.
    again = repblocks.load_weights(wrap(repblocks.create_model("repvgg_tiny", num_classes=10)), wrapped.state_dict())
    assert torch.equal(getattr(again, inner).head.fc.weight, source.head.fc.weight)


@pytest.mark.parametrize("kwargs", [{"features_only": True}, {"num_classes": 0}])
@pytest.mark.parametrize("layout", ["repblocks", "official"])
@torch.no_grad()
def test_a_model_without_a_head_takes_classifier_weights_and_says_it_dropped_them(kwargs, layout, caplog):
    source = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
    weights = convert_layout(source.state_dict(), layout)
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        backbone = repblocks.load_weights(repblocks.create_model("repvgg_tiny", **kwargs), weights, strict=True)
    assert "no classifier head: dropping the weights' head.fc.weight, head.fc.bias" in caplog.text
    expected = source.forward_features(X)
    if kwargs.get("features_only"):
        assert torch.equal(backbone.eval()(X)[-1], expected)
    else:
        assert torch.equal(backbone.eval()(X), source.forward_head(expected, pre_logits=True))


# --- reading files ------------------------------------------------------------------------------------


@pytest.fixture
def fake_yacs(tmp_path, monkeypatch):
    """An importable ``yacs.config.CfgNode`` whose import or unpickling leaves a mark; gone after the test."""
    marker = tmp_path / "payload_ran"
    package = tmp_path / "fake_site" / "yacs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text(
        f"import pathlib\nMARK = pathlib.Path({str(marker)!r})\nMARK.touch()\n"
        "class CfgNode(dict):\n    def __setstate__(self, state):\n        MARK.touch()\n"
    )
    monkeypatch.syspath_prepend(str(package.parent))
    yield marker
    for name in ("yacs.config", "yacs"):
        sys.modules.pop(name, None)


def test_official_training_checkpoint_is_refused_with_a_way_to_extract_its_weights(tmp_path, fake_yacs):
    """The official training script pickles its yacs config beside the weights: refused, never run, explained."""
    from yacs.config import CfgNode  # the fake one

    config = CfgNode(MODEL=CfgNode(ARCH="RepVGG-A0"))
    config.frozen = True  # instance state, so unpickling would call __setstate__
    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "ckpt_epoch_3.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "config": config}, path)
    for name in ("yacs.config", "yacs"):
        del sys.modules[name]
    fake_yacs.unlink()

    with pytest.raises(ValueError) as refusal:
        repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), path)
    message = str(refusal.value)
    assert "\n" not in message and "official RepVGG training script" in message and "yacs.config.CfgNode" in message
    assert not fake_yacs.exists()  # nothing was imported or rebuilt
    # Where the user trusts the file, the suggested command extracts the weights, which then load.
    command = shlex.split(message.split("installed: ", 1)[1].split(" then load ", 1)[0])
    assert command[:2] == ["python", "-c"]
    exec(command[2], {})  # as on the user's trusted machine, where yacs is importable
    extracted = tmp_path / "ckpt_epoch_3_model.pth"
    assert message.endswith(f"then load {extracted}")
    loaded = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), extracted)
    assert torch.equal(loaded.stem.conv_kxk.bn.running_var, model.stem.conv_kxk.bn.running_var)


def test_a_folder_is_not_called_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder, not a weights file"):
        repblocks.read_state_dict(tmp_path)


def test_safetensors_metadata_is_read_back(tmp_path):
    model = repblocks.create_model("repvgg_tiny", num_classes=10)
    with_metadata = repblocks.save_weights(model, tmp_path / "a.safetensors", metadata={"model": "repvgg_tiny"})
    assert read_safetensors_metadata(with_metadata)["model"] == "repvgg_tiny"
    assert read_safetensors_metadata(repblocks.save_weights(model.state_dict(), tmp_path / "b.safetensors")) == {}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(with_metadata.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read .*truncated.safetensors: not a valid safetensors file") as err:
        read_safetensors_metadata(truncated)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_safetensors_metadata(tmp_path / "missing.safetensors")


def test_timm_training_checkpoint_with_its_argparse_arguments_loads(tmp_path):
    """timm's train.py pickles its argparse.Namespace beside the weights; timm itself reads it with weights_only."""
    from timm.utils import CheckpointSaver

    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="repvgg_tiny", lr=0.1)
    CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path)).save_checkpoint(0, metric=0.5)
    loaded = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), tmp_path / "last.pth.tar")
    assert torch.equal(loaded.stem.conv_kxk.bn.running_var, model.stem.conv_kxk.bn.running_var)
    assert repblocks.read_checkpoint(tmp_path / "last.pth.tar")["args"].model == "repvgg_tiny"


def test_safetensors_file_under_another_suffix_is_read_as_safetensors(tmp_path):
    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10))
    path = repblocks.save_weights(model, tmp_path / "weights.pth")
    loaded = repblocks.load_weights(repblocks.create_model("repvgg_tiny", num_classes=10), path)
    assert torch.equal(loaded.stem.conv_kxk.bn.running_var, model.stem.conv_kxk.bn.running_var)


def test_empty_file_and_keys_that_are_not_names(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="the file is empty"):
        repblocks.read_state_dict(empty)
    with pytest.raises(ValueError, match=r"keys that are not parameter names \(0, 1\)"):
        repblocks.load_weights(repblocks.create_model("repvgg_tiny"), {0: torch.zeros(1), 1: torch.zeros(1)})


@torch.no_grad()
def test_tied_weights_are_saved_and_load_back(tmp_path):
    def tied():
        model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
        model[1].weight = model[0].weight
        return model

    source = tied()
    path = repblocks.save_weights(source, tmp_path / "tied.safetensors")
    loaded = repblocks.load_weights(tied(), path)
    assert torch.equal(loaded[1].weight, source[0].weight) and loaded[1].weight is loaded[0].weight


def test_a_dbb_file_saved_before_the_depthwise_rule_still_loads(tmp_path):
    """Files recorded DBB's 1x1 as ``scale_branch="bn"`` before ``"bn_unless_depthwise"``: the same block outside depthwise."""
    model = randomize_bn_(nn.Sequential(RepBlock(4, 8, **BRANCH_SETS["dbb"])))
    recorded = [dict(model[0].branch_config, scale_branch="bn")]
    path = repblocks.save_weights(model, tmp_path / "dbb.safetensors", metadata={"block_kinds": json.dumps(recorded)})
    repblocks.load_weights(nn.Sequential(RepBlock(4, 8, **BRANCH_SETS["dbb"])), path)
    with pytest.raises(ValueError, match="blocks with"):  # another kind is still refused
        repblocks.load_weights(nn.Sequential(RepBlock(4, 8, **dict(BRANCH_SETS["acnet"], scale_branch="bn"))), path)
