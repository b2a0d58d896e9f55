"""RepViT against timm's RepVit and the authors' code: weights both ways, train and fused, and our deploy form.

timm's models are built by timm's own classes (``repvit_m0_9`` with our tiny widths and depths for
``repvit_tiny``), with random BN statistics; timm's fused form is its own ``reparameterize_model``
(the model's ``fuse()``), run with float64 as the default dtype so that its fresh layers keep float64.
"""

import pytest
import torch
from torch import nn

import repblocks
from repblocks.errors import FoldError
from repblocks.layouts import convert_layout, detect_layout
from repblocks.models import repvit
from repblocks.models.repvit import REPVIT_CONFIGS, RepVit, RepVitHead
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.online import OnlineRepBlock

from . import repvit_upstream as authors

timm = pytest.importorskip("timm")

NAMES = ["repvit_tiny"] + [
    pytest.param(name, marks=pytest.mark.slow) for name in ("repvit_m0_9", "repvit_m1_0", "repvit_m1_5")
]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _timm(name: str, dtype=torch.float64) -> nn.Module:
    cfg = REPVIT_CONFIGS[name]
    arch = dict(embed_dim=cfg.widths, depth=cfg.depths)  # timm's own classes, at our widths and depths
    model = timm.create_model("repvit_m0_9", num_classes=10, **arch)
    return randomize_bn_(model).to(dtype).eval()


def _timm_fused(model: nn.Module) -> nn.Module:
    """timm's own fusion, in the model's dtype (its fuse() builds fresh layers in the default dtype)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(next(model.parameters()).dtype)
    try:
        return timm.utils.reparameterize_model(model)  # a copy, fused by RepVit.fuse()
    finally:
        torch.set_default_dtype(default)


def _ours(name: str, dtype=torch.float64, **kwargs) -> nn.Module:
    return repblocks.create_model(name, num_classes=10, **kwargs).to(dtype)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_timm_train_form_loads_exactly_both_ways(name):
    theirs = _timm(name)
    assert detect_layout(theirs.state_dict()) == "timm_repvit"
    ours = repblocks.load_weights(_ours(name), theirs.state_dict()).eval()
    assert torch.equal(ours(X), theirs(X))
    back = timm.create_model("repvit_m0_9", num_classes=10, **_arch(name)).double().eval()
    back.load_state_dict(convert_layout(ours.state_dict(), "timm_repvit"))  # strict
    assert torch.equal(back(X), theirs(X))


def _arch(name):
    return dict(embed_dim=REPVIT_CONFIGS[name].widths, depth=REPVIT_CONFIGS[name].depths)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@torch.no_grad()
def test_our_deploy_form_equals_timms_fused_model(name, dtype, tolerance):
    theirs = _timm(name, dtype)
    fused = _timm_fused(theirs)
    ours = repblocks.load_weights(_ours(name, dtype), theirs.state_dict()).eval()
    deployed = repblocks.switch_to_deploy(ours)
    x = X.to(dtype)
    assert max_errors(fused(x), deployed(x))[1] < tolerance
    assert max_errors(theirs(x), deployed(x))[1] < tolerance
    # timm's fused layers have our deploy form's keys, renamed: one conv per Conv+BN and token mixer, one Linear.
    assert convert_layout(deployed.state_dict(), "timm_repvit").keys() == fused.state_dict().keys()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_timm_fused_weights_load_into_our_deploy_form_and_back(name):
    fused = _timm_fused(_timm(name))
    ours = repblocks.load_weights(_ours(name, deploy=True), fused.state_dict()).eval()
    assert torch.equal(ours(X), fused(X))
    back = _timm_fused(timm.create_model("repvit_m0_9", num_classes=10, **_arch(name)).double())
    back.load_state_dict(convert_layout(ours.state_dict(), "timm_repvit"))
    assert torch.equal(back.eval()(X), fused(X))


@torch.no_grad()
def test_timm_train_form_fuses_on_load_into_our_deploy_form():
    """Every block's branches and the classifier's BatchNorms and two heads, fused on the way in."""
    theirs = _timm("repvit_tiny")
    ours = repblocks.load_weights(_ours("repvit_tiny", deploy=True), theirs.state_dict()).eval()
    assert isinstance(ours.head.fc, nn.Linear) and ours.head.norm is None
    assert max_errors(theirs(X), ours(X))[1] < 1e-12


@torch.no_grad()
def test_a_train_form_head_missing_its_distillation_head_is_refused_by_a_deploy_model():
    weights = {k: v for k, v in _timm("repvit_tiny").state_dict().items() if "head_dist" not in k}
    with pytest.raises(ValueError, match=r"missing keys \(head\.norm_dist\.weight.*left unfused.*\(head\)"):
        repblocks.load_weights(_ours("repvit_tiny", deploy=True), weights)


# --- the classifier head ---


@pytest.mark.parametrize("distillation", [True, False])
@torch.no_grad()
def test_head_folds_its_batchnorms_and_averages_its_heads_into_one_linear(distillation):
    head = randomize_bn_(RepVitHead(16, 5, distillation=distillation)).double().eval()
    features = torch.randn(3, 16, 2, 2, dtype=torch.float64)
    expected = head(features)
    head.deploy_form()
    assert head.deploy and head.norm is None and head.fc_dist is None and isinstance(head.fc, nn.Linear)
    assert max_errors(expected, head(features))[1] < 1e-12
    assert head.deploy_form().module is head  # again: nothing more to fold


def test_head_fold_checks_itself(monkeypatch):
    head = randomize_bn_(RepVitHead(16, 5)).eval()
    monkeypatch.setattr(repvit, "average_linears", lambda pairs: pairs[0])  # drops the distillation head
    with pytest.raises(FoldError):
        head.deploy_form()


def test_head_without_classifier_and_reset():
    model = _ours("repvit_tiny", torch.float32)
    assert model.num_classes == 10 and model.head.fc_dist is not None
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(X.float()).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.head.norm is not None and model(X.float()).shape == (2, 7)
    plain = repblocks.switch_to_deploy(model)
    plain.reset_classifier(3)
    assert plain.head.deploy and plain.head.norm is None and plain(X.float()).shape == (2, 3)


def test_without_distillation_the_head_has_one_linear_and_timms_keys():
    ours = _ours("repvit_tiny", distillation=False)
    theirs = timm.create_model("repvit_m0_9", num_classes=10, distillation=False, **_arch("repvit_tiny")).double()
    assert convert_layout(ours.state_dict(), "timm_repvit").keys() == theirs.state_dict().keys()


# --- the model ---


def test_feature_levels_are_timms_stages_after_the_stem():
    model = repblocks.create_model("repvit_tiny", features_only=True)
    theirs = timm.create_model("repvit_m0_9", features_only=True, **_arch("repvit_tiny"))
    assert model.feature_info.reduction() == [4, 4, 8, 16, 32]  # the stem, then timm's four stages
    assert model.feature_info.channels()[1:] == theirs.feature_info.channels()
    assert model.feature_info.reduction()[1:] == theirs.feature_info.reduction()


def test_token_mixers_are_the_repvit_dw_branch_set_and_stay_offline_in_online_mode():
    model = repblocks.create_model("repvit_tiny", block_mode="online")
    mixers = [m for name, m in model.named_modules() if name.endswith("token_mixer")]
    assert mixers and all(type(m) is repblocks.RepBlock for m in mixers)
    assert all(m.branch_config["scale_branch"] == "conv_bias" and m.branch_config["post_bn"] for m in mixers)
    others = [m for m in model.modules() if isinstance(m, repblocks.RepBlock) and m not in mixers]
    assert others and all(isinstance(m, OnlineRepBlock) for m in others)


def test_parameter_counts_match_timms():
    """timm's RepVit-M0.9 (5.49M with its distillation head, 1000 classes): the same count, train and deploy."""
    ours = repblocks.create_model("repvit_m0_9")
    theirs = timm.create_model("repvit_m0_9")
    count = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count
    assert round(count / 1e6, 2) == 5.49


# --- the authors' code (THU-MIG/RepViT) ---


def _ours_for_fixture(**kwargs) -> nn.Module:
    return RepVit(authors.FIXTURE_CFG, num_classes=authors.NUM_CLASSES, **kwargs).double()


@torch.no_grad()
def test_authors_weights_load_exactly_train_and_fused():
    """From the committed file their code made: no mirror needed."""
    fixture = authors.read_fixture()
    assert detect_layout(fixture["train"]) == detect_layout(fixture["deploy"]) == "thu_repvit"
    ours = repblocks.load_weights(_ours_for_fixture(), fixture["train"]).eval()
    assert torch.equal(ours(fixture["input"]), fixture["output.train"])
    fused = repblocks.load_weights(_ours_for_fixture(deploy=True), fixture["deploy"]).eval()
    assert torch.equal(fused(fixture["input"]), fixture["output.deploy"])
    deployed = repblocks.switch_to_deploy(ours)
    assert max_errors(fixture["output.deploy"], deployed(fixture["input"]))[1] < 1e-12
    # And back, both forms, with their keys and values.
    for form, model in (("train", ours), ("deploy", deployed)):
        back = convert_layout(model.state_dict(), "thu_repvit")
        assert back.keys() == fixture[form].keys(), form
    assert all(
        torch.equal(value, fixture["train"][key])
        for key, value in convert_layout(ours.state_dict(), "thu_repvit").items()
    )


@torch.no_grad()
def test_authors_code_still_makes_the_file_and_takes_our_weights():
    """With the mirror: their network, given the file's weights, gives the file's outputs, and loads ours strictly."""
    fixture = authors.read_fixture()
    theirs = authors.authors_network().double().eval()
    theirs.load_state_dict(fixture["train"])
    assert torch.equal(theirs(fixture["input"]), fixture["output.train"])
    fused = authors.fused_copy(theirs)
    assert fused.state_dict().keys() == fixture["deploy"].keys()
    assert max_errors(fixture["output.deploy"], fused(fixture["input"]))[1] < 1e-12
    ours = randomize_bn_(_ours_for_fixture(), seed=5).eval()
    fresh = authors.authors_network().double().eval()
    fresh.load_state_dict(convert_layout(ours.state_dict(), "thu_repvit"))
    assert torch.equal(fresh(fixture["input"]), ours(fixture["input"]))
    fresh_fused = authors.fused_copy(fresh)
    deployed = repblocks.switch_to_deploy(ours)
    fresh_fused.load_state_dict(convert_layout(deployed.state_dict(), "thu_repvit"))
    assert max_errors(fresh_fused(fixture["input"]), ours(fixture["input"]))[1] < 1e-12


@pytest.mark.slow
def test_authors_published_variants_are_ours():
    """Their repvit_m0_9 / m1_0 / m1_5 rows, read from their code, build the same state dict keys and shapes as ours."""
    module = authors.authors_module()
    for name in ("repvit_m0_9", "repvit_m1_0", "repvit_m1_5"):
        theirs = getattr(module, name)(num_classes=10, distillation=True)
        ours = convert_layout(_ours(name, torch.float32).state_dict(), "thu_repvit")
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}, name
