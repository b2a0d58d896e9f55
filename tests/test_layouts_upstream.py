"""Upstream layouts, exactly: timm's MobileOne, apple's MobileOne and YOLOv6's blocks, both ways, both forms.

Their weights (BN statistics randomized) load into ours, train form into train and deploy form and
deploy form into deploy form, and give their outputs in float64; ours load back into their code
with a plain strict ``load_state_dict``. timm is the installed package; apple's, YOLOv6's and the
QARepVGG authors' code are re-created from their published definitions (tests/apple_mobileone_layout.py,
tests/yolov6_layout.py, tests/qarepvgg_layout.py). ``load_weights`` must say which layout it recognised.

Each comparison logs its relative error (logger ``tests.test_layouts_upstream``); the table of
them: ``pytest tests/test_layouts_upstream.py -m "" -o log_cli=true --log-cli-level=INFO``.
"""

import logging

import pytest
import torch
from torch import nn

import repblocks
from repblocks.blocks import RepBlock
from repblocks.layouts import LAYOUTS, convert_layout, detect_layout, to_repblocks_layout
from repblocks.numerics import max_errors, randomize_bn_

from . import apple_mobileone_layout as apple
from . import qarepvgg_layout as authors
from . import yolov6_layout as yolov6
from .official_layout import OfficialRepVGG

log = logging.getLogger(__name__)

X = torch.randn(2, 3, 64, 64, dtype=torch.float64)
FLOAT64 = 1e-10  # relative: float64 sums the same terms in another order (about 1e-15 here)


def _close(family: str, layout: str, direction: str, expected, actual) -> None:
    rel_err = max_errors(expected, actual)[1]
    log.info("interop %s | %s | %s | max rel err %.1e", family, layout, direction, rel_err)
    assert rel_err < FLOAT64, f"{family} {layout} {direction}: relative error {rel_err:.1e}"


def _load(model, weights, caplog, recognised: str):
    """``load_weights`` in float64 eval mode, checking the layout and form it reports."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        repblocks.load_weights(model.double(), weights)
    assert f": {recognised}" in caplog.text, caplog.text
    return model.eval()


# --- timm's MobileOne -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mobileone_s0"] + [pytest.param(f"mobileone_s{i}", marks=pytest.mark.slow) for i in range(1, 5)]
)
@torch.no_grad()
def test_timm_mobileone_both_ways_in_both_forms(name, caplog):
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    theirs = randomize_bn_(timm.create_model(name, num_classes=10)).double().eval()
    theirs_deploy = reparameterize_model(theirs)
    ours = _load(repblocks.create_model(name, num_classes=10), theirs.state_dict(), caplog, "timm layout, train form")
    _close(name, "timm", "timm train -> ours train", theirs(X), ours(X))
    fused = _load(repblocks.create_model(name, num_classes=10, deploy=True), theirs.state_dict(), caplog, "timm layout")
    _close(name, "timm", "timm train -> ours deploy", theirs(X), fused(X))
    ours_deploy = _load(
        repblocks.create_model(name, num_classes=10, deploy=True),
        theirs_deploy.state_dict(),
        caplog,
        "timm layout, deploy form",
    )
    _close(name, "timm", "timm deploy -> ours deploy", theirs_deploy(X), ours_deploy(X))

    back = timm.create_model(name, num_classes=10).double().eval()
    back.load_state_dict(convert_layout(ours.state_dict(), "timm"))
    _close(name, "timm", "ours train -> timm train", ours(X), back(X))
    back_deploy = reparameterize_model(timm.create_model(name, num_classes=10)).double().eval()
    back_deploy.load_state_dict(convert_layout(ours_deploy.state_dict(), "timm"))
    _close(name, "timm", "ours deploy -> timm deploy", ours_deploy(X), back_deploy(X))


# --- apple's MobileOne ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["s0", pytest.param("s4", marks=pytest.mark.slow)])  # s4: SE, k=1
@torch.no_grad()
def test_apple_mobileone_both_ways_in_both_forms(variant, caplog):
    name = f"mobileone_{variant}"
    theirs = randomize_bn_(apple.mobileone(variant=variant, num_classes=10)).double().eval()
    theirs_deploy = apple.reparameterize_model(theirs)
    ours = _load(repblocks.create_model(name, num_classes=10), theirs.state_dict(), caplog, "apple layout, train form")
    _close(name, "apple", "apple train -> ours train", theirs(X), ours(X))
    fused = _load(repblocks.create_model(name, num_classes=10, deploy=True), theirs.state_dict(), caplog, "apple")
    _close(name, "apple", "apple train -> ours deploy", theirs(X), fused(X))
    ours_deploy = _load(
        repblocks.create_model(name, num_classes=10, deploy=True),
        theirs_deploy.state_dict(),
        caplog,
        "apple layout, deploy form",
    )
    _close(name, "apple", "apple inference -> ours deploy", theirs_deploy(X), ours_deploy(X))

    back = apple.mobileone(variant=variant, num_classes=10).double().eval()
    back.load_state_dict(convert_layout(ours.state_dict(), "apple"))
    _close(name, "apple", "ours train -> apple train", ours(X), back(X))
    back_deploy = apple.mobileone(variant=variant, num_classes=10, inference_mode=True).double().eval()
    back_deploy.load_state_dict(convert_layout(ours_deploy.state_dict(), "apple"))
    _close(name, "apple", "ours deploy -> apple inference", ours_deploy(X), back_deploy(X))


# --- YOLOv6's blocks --------------------------------------------------------------------------------

QAREPVGG = dict(scale_branch="conv", identity_branch="plain", post_bn=True)
QAREPVGG_V2 = dict(QAREPVGG, avg_pool_branch=True)
# YOLOv6's block, ours with the same branches, in and out channels, stride: the shapes that give each
# block its identity (and v2 its average pool) and the strided ones that drop them. A YOLOv6 network has
# one kind of QA block (its config's training_mode), beside RepVGGBlocks, which the keys tell apart.
YOLOV6_BLOCKS = {
    "qarepvgg": [
        (yolov6.RepVGGBlock, {}, 8, 8, 1),
        (yolov6.QARepVGGBlock, QAREPVGG, 8, 8, 1),
        (yolov6.QARepVGGBlock, QAREPVGG, 8, 16, 2),
        (yolov6.RepVGGBlock, {}, 16, 16, 2),
    ],
    "qarepvgg_v2": [
        (yolov6.QARepVGGBlockV2, QAREPVGG_V2, 8, 8, 1),
        (yolov6.QARepVGGBlockV2, QAREPVGG_V2, 8, 16, 2),
        (yolov6.RepVGGBlock, {}, 16, 16, 1),
        (yolov6.QARepVGGBlockV2, QAREPVGG_V2, 16, 16, 2),
    ],
}
Y = torch.randn(2, 8, 16, 16, dtype=torch.float64)


def _yolov6_stack(kind="qarepvgg", *, in_network=True):
    """YOLOv6's blocks as its Model holds them (every BatchNorm with eps 1e-3: initialize_weights), or built alone (1e-5)."""
    blocks = (block(cin, cout, stride=stride) for block, _, cin, cout, stride in YOLOV6_BLOCKS[kind])
    return yolov6.network(*blocks) if in_network else nn.Sequential(*blocks)


def _our_stack(kind="qarepvgg", bn_eps=1e-3, **kwargs):
    return nn.Sequential(
        *(
            RepBlock(cin, cout, stride=s, bn_eps=bn_eps, **branches, **kwargs)
            for _, branches, cin, cout, s in YOLOV6_BLOCKS[kind]
        )
    )


def _small_variances_(model, seed=0):
    """Running variances in [1e-4, 1e-2], as trained networks have in some channels: where eps matters most."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 0.0099 + 1e-4)
    return model


def _load_stated(model, weights, caplog, recognised, kind):
    """``_load`` with the QA blocks' kind stated, as YOLOv6's keys cannot tell it."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        repblocks.load_weights(model.double(), weights, branches=kind)
    assert f": {recognised}" in caplog.text, caplog.text
    return model.eval()


@pytest.mark.parametrize("kind", YOLOV6_BLOCKS)
@pytest.mark.parametrize("variances", ["random", "small"])
@torch.no_grad()
def test_yolov6_blocks_both_ways_in_both_forms(kind, variances, caplog):
    theirs = randomize_bn_(_yolov6_stack(kind)).double().eval()
    if variances == "small":
        _small_variances_(theirs)
    expected = theirs(Y)
    ours = _load_stated(_our_stack(kind), theirs.state_dict(), caplog, "yolov6 layout, train form", kind)
    _close(kind, "yolov6", "yolov6 train -> ours train", expected, ours(Y))
    fused = _load_stated(_our_stack(kind, deploy=True), theirs.state_dict(), caplog, "yolov6 layout, train form", kind)
    _close(kind, "yolov6", "yolov6 train -> ours deploy", expected, fused(Y))
    theirs_deploy = yolov6.deploy(theirs)  # rbr_reparam, and the QA blocks keep bn beside it
    assert any(key.endswith(".bn.weight") for key in theirs_deploy.state_dict())
    deploy_weights = theirs_deploy.state_dict()
    ours_deploy = _load(_our_stack(kind, deploy=True), deploy_weights, caplog, "yolov6 layout, deploy form")
    _close(kind, "yolov6", "yolov6 deploy -> ours deploy (bn folded)", theirs_deploy(Y), ours_deploy(Y))
    kept = _load(_our_stack(kind, deploy=True, keep_post_bn=True), deploy_weights, caplog, "yolov6 layout, deploy form")
    _close(kind, "yolov6", "yolov6 deploy -> ours deploy (bn kept)", theirs_deploy(Y), kept(Y))

    back = _yolov6_stack(kind).double().eval()
    back.load_state_dict(convert_layout(ours.state_dict(), "yolov6"))
    _close(kind, "yolov6", "ours train -> yolov6 train", ours(Y), back(Y))
    # YOLOv6's deploy form keeps bn: ours with keep_post_bn is that form.
    ours_kept = _our_stack(kind).double().eval()
    ours_kept.load_state_dict(ours.state_dict())
    for block in ours_kept:
        block.switch_to_deploy(keep_post_bn=True)
    back_deploy = yolov6.deploy(_yolov6_stack(kind)).double().eval()
    back_deploy.load_state_dict(convert_layout(ours_kept.state_dict(), "yolov6"))
    _close(kind, "yolov6", "ours deploy (bn kept) -> yolov6 deploy", ours(Y), back_deploy(Y))


# --- BatchNorm eps: how the file was made, which its keys do not say -------------------------------


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("in_network", [True, False], ids=["network-1e-3", "alone-1e-5"])
@torch.no_grad()
def test_yolov6_weights_load_exactly_into_blocks_built_with_the_eps_they_were_made_with(in_network, deploy, caplog):
    """A YOLOv6 network (initialize_weights: 1e-3) and its blocks built alone (1e-5): each loads where the model says so."""
    theirs = _small_variances_(randomize_bn_(_yolov6_stack(in_network=in_network))).double().eval()
    eps = 1e-3 if in_network else 1e-5
    ours = _our_stack(bn_eps=eps, deploy=deploy).double()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        repblocks.load_weights(ours, theirs.state_dict(), branches="qarepvgg", bn_eps=eps)
    assert max_errors(theirs(Y), ours.eval()(Y))[1] < FLOAT64
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.text


def test_yolov6_weights_read_with_an_unstated_default_eps_say_which_and_how_to_change_it(caplog):
    """Unstated, the model's default eps is used, and the log says so once, with what to build the model with."""
    theirs = randomize_bn_(_yolov6_stack(in_network=False)).double().eval()
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        ours = repblocks.load_weights(_our_stack(bn_eps=1e-5).double(), theirs.state_dict(), branches="qarepvgg")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "yolov6 layout weights do not record their BatchNorm eps" in warnings[0]
    assert "read with Sequential's eps 1e-05" in warnings[0] and "bn_eps=0.001" in warnings[0]
    with torch.no_grad():
        assert max_errors(theirs(Y), ours.eval()(Y))[1] < FLOAT64  # a block built alone: 1e-5 is right


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
def test_a_stated_eps_the_model_does_not_use_is_refused_saying_what_to_build(deploy):
    theirs = randomize_bn_(_yolov6_stack())
    with pytest.raises(
        ValueError, match=r"made with BatchNorm eps 0\.001 .* use eps 1e-05: build it with bn_eps=0\.001"
    ):
        repblocks.load_weights(
            _our_stack(bn_eps=1e-5, deploy=deploy), theirs.state_dict(), branches="qarepvgg", bn_eps=1e-3
        )


def test_a_model_built_with_another_eps_than_the_default_states_it(caplog):
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        repblocks.load_weights(_our_stack(), randomize_bn_(_yolov6_stack()).state_dict(), branches="qarepvgg")
    assert "yolov6 layout, train form; BatchNorm eps 0.001" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.text


def test_official_block_keys_say_the_same_as_yolov6s_repvgg_block_has_them(caplog):
    """YOLOv6's RepVGGBlock alone reads as the official block: the log names the eps used and YOLOv6's 1e-3."""
    theirs = randomize_bn_(nn.Sequential(yolov6.RepVGGBlock(8, 8))).double().eval()
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        repblocks.load_weights(nn.Sequential(RepBlock(8, 8)), theirs.state_dict())
    assert "official layout weights do not record their BatchNorm eps" in caplog.text
    assert "YOLOv6's RepVGGBlock" in caplog.text and "bn_eps=1e-05" not in caplog.text


def test_a_yolov6_network_of_repvgg_blocks_alone_is_told_by_its_module_names(caplog):
    """YOLOv6-N/S hold only RepVGGBlocks (the official block keys): EfficientRep's names still say YOLOv6."""
    backbone = nn.Module()
    backbone.stem = yolov6.RepVGGBlock(3, 8, stride=2)
    backbone.ERBlock_2 = nn.Sequential(yolov6.RepVGGBlock(8, 8))
    theirs = nn.Module()
    theirs.backbone = yolov6.initialize_weights(backbone)
    assert detect_layout(theirs.state_dict()) == "yolov6"
    ours = nn.Module()
    ours.backbone = nn.Module()
    ours.backbone.stem = RepBlock(3, 8, stride=2)
    ours.backbone.ERBlock_2 = nn.Sequential(RepBlock(8, 8))
    with caplog.at_level(logging.WARNING, logger="repblocks.weights"):
        repblocks.load_weights(ours, theirs.state_dict())
    assert "yolov6 layout weights do not record their BatchNorm eps" in caplog.text and "bn_eps=0.001" in caplog.text


# --- QARepVGG v1 and v2: the same keys ---------------------------------------------------------------


def test_yolov6_qa_weights_are_refused_until_their_kind_is_stated():
    """v2's average pool has no weights: the keys fit a v1 block and the outputs differ. Unstated, nothing loads."""
    theirs = randomize_bn_(_yolov6_stack("qarepvgg_v2")).state_dict()
    with pytest.raises(ValueError, match=r"v1 \(QARepVGGBlock\) and v2 .* branches='qarepvgg_v2' for v2"):
        repblocks.load_weights(_our_stack("qarepvgg_v2"), theirs)
    v1 = nn.Sequential(RepBlock(8, 8, bn_eps=1e-3, **QAREPVGG), RepBlock(8, 16, stride=2, bn_eps=1e-3, **QAREPVGG))
    v2_file = randomize_bn_(yolov6.network(yolov6.QARepVGGBlockV2(8, 8), yolov6.QARepVGGBlockV2(8, 16, stride=2)))
    # Named: the block with an identity; the strided one has neither identity nor pool, so v1 and v2 agree there.
    with pytest.raises(
        ValueError, match=r"hold v2 \(v1 and an average pool\) QARepVGG blocks .* \(0\) are v1 .*'qarepvgg_v2'"
    ):
        repblocks.load_weights(v1, v2_file.state_dict(), branches="qarepvgg_v2")


def test_yolov6_block_bn_is_post_bn_and_no_other_bn_is():
    """Only a block's own ``bn`` (beside ``rbr_dense``/``rbr_reparam``) is the BN after the sum; a ConvModule's stays."""
    keys = [
        "backbone.stem.rbr_dense.conv.weight",
        "backbone.stem.rbr_dense.bn.weight",
        "backbone.stem.rbr_1x1.weight",
        "backbone.stem.bn.weight",
        "backbone.ERBlock_2.1.rbr_reparam.weight",
        "backbone.ERBlock_2.1.bn.weight",
        "backbone.ERBlock_5.2.cv1.bn.weight",
    ]
    renamed = list(to_repblocks_layout(dict.fromkeys(keys, torch.zeros(1)), roots={"backbone"}))
    assert renamed == [
        "backbone.stem.conv_kxk.conv.weight",
        "backbone.stem.conv_kxk.bn.weight",
        "backbone.stem.conv_1x1.weight",
        "backbone.stem.post_bn.weight",
        "backbone.ERBlock_2.1.reparam.weight",
        "backbone.ERBlock_2.1.post_bn.weight",
        "backbone.ERBlock_5.2.cv1.bn.weight",
    ]
    assert list(convert_layout(dict.fromkeys(renamed, torch.zeros(1)), "yolov6")) == keys


def test_timm_conv_scale_is_a_mobileone_blocks_only():
    """Our conv_1x1 is timm's conv_scale in a MobileOne block (a list of kxk branches), conv_1x1 in a RepVGG block."""
    mobileone = repblocks.create_model("mobileone_tiny").state_dict()
    repvgg = repblocks.create_model("repvgg_tiny").state_dict()
    mixed = {**{f"a.{k}": v for k, v in mobileone.items()}, **{f"b.{k}": v for k, v in repvgg.items()}}
    timm_keys = list(convert_layout(mixed, "timm"))
    assert "a.stem.conv_scale.conv.weight" in timm_keys and "b.stem.conv_1x1.conv.weight" in timm_keys
    assert not any(key.startswith("a.") and ".conv_1x1." in key for key in timm_keys)
    assert not any(key.startswith("b.") and ".conv_scale." in key for key in timm_keys)


# --- the QARepVGG authors' network (cxxgtxy/QARepVGG) ---------------------------------------------

AUTHORS_TINY = dict(num_blocks=[2, 2, 2, 1], width_multiplier=[0.25, 0.25, 0.25, 0.25], num_classes=10)


@torch.no_grad()
def test_qarepvgg_authors_network_both_ways_in_both_forms(caplog):
    """Their official stage names with QA blocks (``bn`` after the sum) load into qarepvgg_tiny and go back."""
    theirs = randomize_bn_(authors.RepVGG(**AUTHORS_TINY)).double().eval()
    theirs_deploy = authors.repvgg_model_convert(theirs)
    assert any(key.endswith(".bn.running_var") and ".rbr_dense." not in key for key in theirs.state_dict())
    ours = _load(repblocks.create_model("qarepvgg_tiny", num_classes=10), theirs.state_dict(), caplog, "official")
    assert "official layout, train form" in caplog.text
    _close("qarepvgg_tiny", "official", "authors train -> ours train", theirs(X), ours(X))
    fused = _load(repblocks.create_model("qarepvgg_tiny", num_classes=10, deploy=True), theirs.state_dict(), caplog, "")
    _close("qarepvgg_tiny", "official", "authors train -> ours deploy", theirs(X), fused(X))
    ours_deploy = _load(
        repblocks.create_model("qarepvgg_tiny", num_classes=10, deploy=True),
        theirs_deploy.state_dict(),
        caplog,
        "official layout, deploy form",
    )
    _close("qarepvgg_tiny", "official", "authors deploy -> ours deploy", theirs_deploy(X), ours_deploy(X))

    back = authors.RepVGG(**AUTHORS_TINY).double().eval()
    back.load_state_dict(convert_layout(ours.state_dict(), "official"))  # strict: post_bn must become bn
    _close("qarepvgg_tiny", "official", "ours train -> authors train", ours(X), back(X))
    back_deploy = authors.RepVGG(**AUTHORS_TINY, deploy=True).double().eval()
    back_deploy.load_state_dict(convert_layout(ours_deploy.state_dict(), "official"))
    _close("qarepvgg_tiny", "official", "ours deploy -> authors deploy", ours_deploy(X), back_deploy(X))


def test_qarepvgg_authors_network_into_a_v2_model_is_refused_naming_the_model_that_takes_it():
    """The authors' QARepVGGV2 network is built of v1 blocks (no average pool): qarepvgg_v2_* is the natural, wrong, choice."""
    theirs = randomize_bn_(authors.RepVGG(**AUTHORS_TINY)).state_dict()
    with pytest.raises(
        ValueError, match=r"hold v1 .*as the QARepVGG authors' code builds every block.* are v2 .*'qarepvgg'"
    ):
        repblocks.load_weights(repblocks.create_model("qarepvgg_v2_tiny", num_classes=10), theirs)
    with pytest.raises(ValueError, match=r"are v2"):
        repblocks.load_weights(repblocks.create_model("qarepvgg_v2_tiny", num_classes=10, deploy=True), theirs)


@torch.no_grad()
def test_a_qarepvgg_authors_block_out_of_its_network_loads_exactly_once_its_kind_is_stated():
    """Without stage names its keys are a YOLOv6 QA block's (either kind): stated, it loads with the model's eps 1e-5."""
    theirs = _small_variances_(randomize_bn_(nn.Sequential(authors.QARepVGGBlockV2(8, 8, 3, padding=1)))).double()
    theirs.eval()
    with pytest.raises(ValueError, match=r"branches='qarepvgg'\) for v1"):
        repblocks.load_weights(nn.Sequential(RepBlock(8, 8, **QAREPVGG)), theirs.state_dict())
    for deploy in (False, True):
        ours = nn.Sequential(RepBlock(8, 8, **QAREPVGG, deploy=deploy)).double()
        repblocks.load_weights(ours, theirs.state_dict(), branches="qarepvgg", bn_eps=1e-5)
        assert max_errors(theirs(Y), ours.eval()(Y))[1] < FLOAT64


def test_convert_layout_official_renames_a_qa_blocks_post_bn_and_reads_it_back():
    ours = repblocks.create_model("qarepvgg_tiny", num_classes=10).state_dict()
    official = convert_layout(ours, "official")
    assert "stage1.1.bn.running_var" in official and not any("post_bn" in key for key in official)
    assert "stage1.1.rbr_dense.bn.running_var" in official  # the 3x3 branch's own BN keeps its name
    assert detect_layout(official) == "official"
    assert list(to_repblocks_layout(official)) == list(ours)


# --- telling layouts apart --------------------------------------------------------------------------


def _layout_samples():
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    small_apple = dict(num_blocks_per_stage=(1, 1, 2, 1), width_multipliers=(0.25, 0.25, 0.5, 0.5), use_se=True)
    tiny = dict(num_blocks=(2, 2, 2, 1), widths=(0.25, 0.25, 0.25, 0.25))
    timm_mobileone = timm.create_model("mobileone_s0", num_classes=10)
    ours = repblocks.create_model("mobileone_tiny", num_classes=10)
    return {
        # apple's stage0..4 are the official RepVGG code's keys too: both must still be told apart.
        "apple": [apple.AppleMobileOne(**small_apple), apple.AppleMobileOne(**small_apple, inference_mode=True)],
        "official": [
            OfficialRepVGG(**tiny),
            OfficialRepVGG(**tiny, deploy=True),
            authors.RepVGG(**AUTHORS_TINY),  # the QARepVGG authors': official stage names, QA blocks
            authors.RepVGG(**AUTHORS_TINY, deploy=True),
        ],
        "timm": [timm_mobileone, reparameterize_model(timm_mobileone)],
        "yolov6": [_yolov6_stack(), yolov6.deploy(_yolov6_stack()), _yolov6_stack("qarepvgg_v2")],
        "repblocks": [ours, repblocks.switch_to_deploy(ours), _our_stack(), _our_stack(deploy=True, keep_post_bn=True)],
    }


def test_layouts_are_told_apart_in_both_forms_and_behind_wrappers():
    for layout, models in _layout_samples().items():
        for model in models:
            keys = list(model.state_dict())
            assert detect_layout(keys) == layout, f"{type(model).__name__}: {keys[:4]}"
            assert detect_layout(f"module.{key}" for key in keys) == layout


def test_a_yolov6_repvgg_block_alone_reads_as_the_official_block_it_is():
    """YOLOv6's RepVGGBlock has the official block keys: with no QA block beside it, it is read as official."""
    theirs = randomize_bn_(nn.Sequential(yolov6.RepVGGBlock(8, 8))).double().eval()
    assert detect_layout(theirs.state_dict()) == "official"
    ours = repblocks.load_weights(nn.Sequential(RepBlock(8, 8)).double(), theirs.state_dict()).eval()
    with torch.no_grad():
        assert torch.equal(ours(Y), theirs(Y))


def test_every_layout_converts_and_unknown_ones_are_named():
    assert {"apple", "yolov6", "timm", "official", "mmpretrain", "repblocks", "dbb", "acnet", "orepa"} <= set(LAYOUTS)
    with pytest.raises(ValueError, match=r"unknown layout 'caffe'; known layouts: .*apple, yolov6"):
        convert_layout({}, "caffe")
