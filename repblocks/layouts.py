"""State-dict layouts of other code bases, renamed to ours and back.

Our layout is ``stem``, ``stages.i.j``, ``conv_kxk`` (``conv_kxk.n`` with several kxk branches),
``conv_1x1``, ``identity``, ``post_bn``, ``reparam``, ``se.down/up``, ``head.fc``. Read as well, in
train or deploy form:

* the official RepVGG code's (``stage0..4``, ``rbr_dense``, ``rbr_1x1``, ``rbr_identity``,
  ``rbr_reparam``, ``linear``), QARepVGG blocks in that network included (the QARepVGG authors' code,
  cxxgtxy/QARepVGG: a plain-conv ``rbr_1x1`` and a block-level ``bn`` after the sum, our ``post_bn``);
* timm's RepVGG and MobileOne (ours, except ``conv_scale``, ``reparam_conv`` and ``attn.fc1/fc2``: a
  RepVGG in train form without SE has our very keys), and timm's FastViT (``timm_fastvit``: timm's
  MobileOne names plus ``se.fc1/fc2``, ``large_conv``/``small_conv`` and the FFN's ``mlp.conv.conv/bn``);
  apple's FastViT (apple/ml-fastvit: ``patch_embed``, ``network.N``, ``conv_exp``, read as timm's through
  :mod:`repblocks.fastvit_layout`). Both reparameterized forms keep the BatchNorm before attention, which
  our deploy form folds into ``qkv``: it is folded on reading;
* mmpretrain's (``backbone.stem``, ``backbone.stage_1..4``, ``branch_3x3``/``branch_1x1`` with
  ``conv``/``norm``, ``branch_norm``, ``branch_reparam``, ``se_layer.conv1/conv2.conv``, ``head.fc``);
* apple's MobileOne (``stage0..4`` as the official RepVGG code, ``rbr_conv.n``, ``rbr_scale``,
  ``rbr_skip``, ``reparam_conv``, ``se.reduce/expand``, ``linear``);
* YOLOv6's blocks (RepVGGBlock: the official block keys; QARepVGGBlock: a plain-conv ``rbr_1x1`` and
  a block-level ``bn`` after the sum, which its deploy form keeps beside ``rbr_reparam``), told apart by
  the QA blocks or by YOLOv6's network names (``ERBlock_N``, ``Rep_pN``/``Rep_nN``). YOLOv6's networks
  train with BatchNorm eps 1e-3 (:data:`LAYOUT_BN_EPS`), a block built alone with 1e-5; a state dict
  records neither (:func:`repblocks.load_weights` takes the model's and says so);
* DBB's ``DiverseBranchBlock`` (DingXiaoH/DiverseBranchBlock, and the ``DBB`` of OREPA's code): ``dbb_origin``,
  ``dbb_1x1``, ``dbb_1x1_kxk`` (``idconv1``/``conv1``, ``bn1.bn``, ``conv2``, ``bn2``), ``dbb_avg``
  (``conv``, ``bn.bn``, ``avgbn``), ``dbb_reparam``: our ``dbb`` branch set;
* ACNet's ``ACBlock`` (DingXiaoH/ACNet, ``acnet/acb.py``): ``square_conv/bn``, ``hor_conv/bn``,
  ``ver_conv/bn``, ``fused_conv``: our ``acnet`` branch set;
* UniRepLKNet's (AILab-CVC/UniRepLKNet): its ``DilatedReparamBlock`` (``lk_origin``, ``origin_bn``,
  ``dil_conv_k{k}_{r}``; our ``unireplk`` branch set), its block and its network, in train or fused form
  (:mod:`repblocks.unireplknet_layout`);
* ultralytics' ``RepConv`` (YOLOv7/v9's, ``conv1``/``conv2``/``bn``; our ``yolo_repconv``) and ``RepVGGDW``
  (YOLOv10's, ``conv``/``conv1``; our ``repvggdw``), blocks only, train or fused (:mod:`repblocks.ultralytics_layout`);
* OREPA's blocks (JUGGHM/OREPA_CVPR2022): the deploy forms (``orepa_reparam``, ``or1x1_reparam``,
  ``or_large_reparam``; ``RepVGGBlock_OREPA``'s is the official block's), and the train forms of ``OREPA``,
  ``OREPA_1x1`` and ``RepVGGBlock_OREPA``, whose kernels are generated on reading, exactly
  (:mod:`repblocks.orepa_layout`);

* timm's RepViT (``timm_repvit``: ConvNorm's ``c``/``bn``, the token mixer's ``conv``/``conv1``/``bn``,
  ``se.fc1/fc2``, the classifier's ``head.head``/``head.head_dist`` with ``bn``/``l``; fused by timm's
  ``fuse()``, each conv where its module was and the classifier one Linear ``head``) and the RepViT authors'
  (``thu_repvit``, THU-MIG/RepViT: one flat ``features`` list, read as timm's by :mod:`repblocks.repvit_layout`);
* timm's RepGhostNet (``timm_repghost``; ChengpengChen/RepGhost's own code has the same keys) and
  GhostNetV3 (``timm_ghostnetv3``): ``conv_stem``/``bn1``, ``blocks.N`` (our stages hold
  :data:`GHOST_GROUPS_PER_STAGE` of them), the ghost modules' ``primary_conv``/``cheap_operation``/``fusion_bn``
  (RepGhost) or ``primary_rpr_conv``/``cheap_rpr_*``/``dw_rpr_*``/``short_conv`` (GhostNetV3), in train form or
  as timm's ``reparameterize_model`` leaves them (only the ghost modules and GhostNetV3's strided conv fused);

each possibly wrapped by DDP (``module.``), ``torch.compile`` (``_orig_mod.``) or a Lightning
module (``model.``). A layout is recognised by keys no other layout has, and every layout is a
table of renames: regular expressions on each key, and :class:`BlockRename` for the few names
that depend on the block around them (YOLOv6's ``bn``, timm's ``conv_scale``). Adding one is data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from repblocks.fastvit_layout import apple_fastvit_as_timm, fold_attention_norms
from repblocks.orepa_layout import generate_orepa_kernels
from repblocks.repvit_layout import authors_to_timm, timm_to_authors
from repblocks.ultralytics_layout import from_ultralytics_names, is_ultralytics, to_ultralytics_names
from repblocks.unireplknet_layout import from_unireplknet_names, is_unireplknet, to_unireplknet_names

__all__ = ["LAYOUTS", "LAYOUT_BN_EPS", "BlockRename", "convert_layout", "detect_layout", "to_repblocks_layout"]

StateDict = dict[str, Tensor]

# Prefixes that wrappers add to every key: DDP, torch.compile, a LightningModule's attribute.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass(frozen=True)
class BlockRename:
    """Rename the component ``old`` directly below a block to ``new``, in blocks marked by ``marker`` only.

    A block is marked when one of its keys continues, right below the block's name, with ``marker``
    (a regular expression). YOLOv6's block-level ``bn`` is our ``post_bn``, but the ``bn`` inside its
    ``rbr_dense`` and in the rest of a YOLOv6 network is not; our ``conv_1x1`` is timm's ``conv_scale``
    in a MobileOne block (``conv_kxk.0``, a list), and stays ``conv_1x1`` in a RepVGG block.
    """

    old: str
    new: str
    marker: str


_Rename = tuple[str, str | Callable[[re.Match], str]] | BlockRename
# A QARepVGG block's BatchNorm after the sum is ``bn`` right below the block, in YOLOv6's code and in the
# QARepVGG authors' (cxxgtxy/QARepVGG, repvgg.py); the ``bn`` inside ``rbr_dense`` (or a YOLOv6 ConvModule) is not.
_POST_BN = BlockRename("bn", "post_bn", marker=r"rbr_(dense|reparam)\.")
_OFFICIAL_BLOCK: list[_Rename] = [
    _POST_BN,
    (r"\brbr_dense\.", "conv_kxk."),
    (r"\brbr_1x1\.", "conv_1x1."),
    (r"\brbr_identity\.", "identity."),
    (r"\brbr_reparam\.", "reparam."),
]
# The official RepVGG network's stage and classifier names, which apple's MobileOne code took over.
_OFFICIAL_NETWORK: list[_Rename] = [
    (r"^stage0\.", "stem."),
    (r"^stage([1-9])\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}."),
    (r"^linear\.", "head.fc."),
]
_OFFICIAL_RENAMES: list[_Rename] = [*_OFFICIAL_NETWORK, *_OFFICIAL_BLOCK]
_TIMM_RENAMES: list[_Rename] = [
    (r"\bconv_scale\.", "conv_1x1."),
    (r"\breparam_conv\.", "reparam."),
    (r"\battn\.fc1\.", "se.down."),
    (r"\battn\.fc2\.", "se.up."),
]
# timm's FastViT (timm/models/fastvit.py): its MobileOne blocks are timm's; the large kernel's, the FFN's
# depthwise Conv+BN and the SE names are its own. Our RepMixer, RepCPE and attention have timm's names.
_TIMM_FASTVIT_RENAMES: list[_Rename] = [
    *_TIMM_RENAMES,
    (r"\bse\.fc([12])\.", lambda m: "se.down." if m[1] == "1" else "se.up."),
    (r"\blarge_conv\.", "conv_kxk."),
    (r"\bsmall_conv\.", "conv_extra.0."),
    (r"\bmlp\.conv\.(conv|bn)\.", lambda m: f"mlp.conv.conv_kxk.{m[1]}."),
]
_MMPRETRAIN_RENAMES: list[_Rename] = [
    (r"^backbone\.", ""),  # the classifier's head sits beside the backbone, not under it
    (r"^stage_([1-9])\.", lambda m: f"stages.{int(m[1]) - 1}."),
    (r"\bbranch_3x3\.norm\.", "conv_kxk.bn."),
    (r"\bbranch_1x1\.norm\.", "conv_1x1.bn."),
    (r"\bbranch_3x3\.", "conv_kxk."),
    (r"\bbranch_1x1\.", "conv_1x1."),
    (r"\bbranch_norm\.", "identity."),
    (r"\bbranch_reparam\.", "reparam."),
    (r"\bse_layer\.conv1\.conv\.", "se.down."),
    (r"\bse_layer\.conv2\.conv\.", "se.up."),
]
_APPLE_RENAMES: list[_Rename] = [
    *_OFFICIAL_NETWORK,
    (r"\brbr_conv\.", "conv_kxk."),
    (r"\brbr_scale\.", "conv_1x1."),
    (r"\brbr_skip\.", "identity."),
    (r"\breparam_conv\.", "reparam."),
    (r"\bse\.reduce\.", "se.down."),
    (r"\bse\.expand\.", "se.up."),
]
# Blocks only: YOLOv6's networks (EfficientRep, ...) are not ours, the blocks inside them are.
_YOLOV6_RENAMES: list[_Rename] = _OFFICIAL_BLOCK
# Blocks only, as YOLOv6's. DBB's BNAndPadLayer holds its BatchNorm as ``.bn``; ours pads beside a plain one.
_DBB_RENAMES: list[_Rename] = [
    (r"\bdbb_origin\.", "conv_kxk."),
    (r"\bdbb_1x1_kxk\.idconv1\.", "conv_1x1_kxk.conv1."),  # ours is identity-based too where DBB's is
    (r"\bdbb_1x1_kxk\.bn1\.bn\.", "conv_1x1_kxk.bn1."),
    (r"\bdbb_1x1_kxk\.", "conv_1x1_kxk."),
    (r"\bdbb_1x1\.", "conv_1x1."),
    (r"\bdbb_avg\.bn\.bn\.", "conv_1x1_avg.bn."),
    (r"\bdbb_avg\.", "conv_1x1_avg."),
    (r"\bdbb_reparam\.", "reparam."),
]
_ACNET_RENAMES: list[_Rename] = [
    (r"\bsquare_(conv|bn)\.", lambda m: f"conv_kxk.{m[1]}."),
    (r"\bhor_(conv|bn)\.", lambda m: f"conv_1xk.{m[1]}."),
    (r"\bver_(conv|bn)\.", lambda m: f"conv_kx1.{m[1]}."),
    (r"\bfused_conv\.", "reparam."),
]
# After generate_orepa_kernels: OREPA's RepVGG network has the official names; its conv blocks' fused convs are ours.
_OREPA_RENAMES: list[_Rename] = [*_OFFICIAL_RENAMES, (r"\b(orepa|or1x1|or_large)_reparam\.", "reparam.")]
# timm's RepViT. A ConvNorm (``c`` + ``bn``) is our one-branch RepBlock (``conv_kxk``); the token mixer's ``conv``,
# ``conv1`` and ``bn`` are its kxk, 1x1 and post_bn; fused, a module's own weight is its RepBlock's ``reparam``.
_TIMM_REPVIT_RENAMES: list[_Rename] = [
    BlockRename("bn", "conv_kxk.bn", marker=r"c\."),  # a ConvNorm's BN; the token mixer's own bn is its post_bn
    (r"\btoken_mixer\.conv\.conv_kxk\.bn\.", "token_mixer.conv_kxk.bn."),
    (r"\btoken_mixer\.conv\.c\.", "token_mixer.conv_kxk.conv."),
    (r"\btoken_mixer\.conv1\.", "token_mixer.conv_1x1."),
    (r"\btoken_mixer\.bn\.", "token_mixer.post_bn."),
    (r"(^|\.)c\.", r"\1conv_kxk.conv."),
    (r"\b(conv1|conv2|token_mixer|spatial_downsample|channel_downsample)\.(weight|bias)$", r"\1.reparam.\2"),
    (r"\bse\.fc1\.", "se.down."),
    (r"\bse\.fc2\.", "se.up."),
    (r"^head\.head\.bn\.", "head.norm."),
    (r"^head\.head\.l\.", "head.fc."),
    (r"^head\.head_dist\.bn\.", "head.norm_dist."),
    (r"^head\.head_dist\.l\.", "head.fc_dist."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
# RepGhostNet and GhostNetV3 (timm, and ChengpengChen/RepGhost): timm's blocks.N are our stages.i.j, i.e. the
# groups of each stage in order (repblocks.models.repghost.GROUPS_PER_STAGE, checked there by a test).
GHOST_GROUPS_PER_STAGE = (3, 2, 2, 3)
_GHOST_GROUPS = [(stage, group) for stage, count in enumerate(GHOST_GROUPS_PER_STAGE) for group in range(count)]


def _conv_bn(theirs_conv: str, theirs_bn: str, ours: str) -> list[_Rename]:
    """A Conv+BN of theirs (a conv and a BN key prefix) as our single-branch RepBlock ``ours`` (its ``conv_kxk``)."""
    return [(theirs_conv, f"{ours}.conv_kxk.conv."), (theirs_bn, f"{ours}.conv_kxk.bn.")]


def _ghost_group(match: re.Match) -> str:
    stage, group = _GHOST_GROUPS[int(match[1])]
    return f"stages.{stage}.{group}."


# Both timm networks: the stem, the projection shortcut, the final 1x1 ConvBnAct (a block right in its group), the head.
_TIMM_GHOST_NETWORK: list[_Rename] = [
    *_conv_bn(r"^conv_stem\.", r"^bn1\.", "stem"),
    (r"\bshortcut\.([0-3])\.", lambda m: f"shortcut.{int(m[1]) // 2}.conv_kxk.{('conv', 'bn')[int(m[1]) % 2]}."),
    (r"^(blocks\.\d+\.\d+)\.conv\.", r"\1.conv_kxk.conv."),
    (r"^(blocks\.\d+\.\d+)\.bn1\.", r"\1.conv_kxk.bn."),
    (r"^blocks\.(\d+)\.", _ghost_group),
    (r"^conv_head\.", "head.conv_head."),
    (r"^classifier\.", "head.fc."),
]
_TIMM_REPGHOST_RENAMES: list[_Rename] = [
    (r"\b(primary_conv|cheap_operation)\.0\.", r"\1.conv_kxk.conv."),
    (r"\b(primary_conv|cheap_operation)\.1\.", r"\1.conv_kxk.bn."),
    (r"\bfusion_bn\.0\.", "cheap_operation.identity."),
    (r"\bcheap_operation\.(weight|bias)$", r"cheap_operation.reparam.\1"),
    *_conv_bn(r"\bconv_dw\.", r"\bbn_dw\.", "conv_dw"),
    *_TIMM_GHOST_NETWORK,
]
_TIMM_GHOSTNETV3_RENAMES: list[_Rename] = [
    (r"\bprimary_rpr_conv\.(\d+)\.bn1\.", r"primary_conv.conv_kxk.\1.bn."),
    (r"\bprimary_rpr_conv\.", "primary_conv.conv_kxk."),
    (r"\bprimary_conv\.0\.", "primary_conv.reparam."),
    (r"\bcheap_rpr_conv\.(\d+)\.bn1\.", r"cheap_operation.conv_kxk.\1.bn."),
    (r"\bcheap_rpr_conv\.", "cheap_operation.conv_kxk."),
    (r"\bcheap_rpr_scale\.bn1\.", "cheap_operation.conv_1x1.bn."),
    (r"\bcheap_rpr_scale\.", "cheap_operation.conv_1x1."),
    (r"\bcheap_rpr_skip\.", "cheap_operation.identity."),
    (r"\bcheap_operation\.0\.", "cheap_operation.reparam."),
    (r"\bdw_rpr_conv\.(\d+)\.bn1\.", r"conv_dw.conv_kxk.\1.bn."),
    (r"\bdw_rpr_conv\.", "conv_dw.conv_kxk."),
    (r"\bdw_rpr_scale\.bn1\.", "conv_dw.conv_1x1.bn."),
    (r"\bdw_rpr_scale\.", "conv_dw.conv_1x1."),
    (r"\bconv_dw\.(weight|bias)$", r"conv_dw.reparam.\1"),
    # The short branch: a 1x1 Conv+BN (our RepBlock), then the 1x5 and 5x1 depthwise Conv+BN (our ConvNorm).
    *_conv_bn(r"\bshort_conv\.0\.", r"\bshort_conv\.1\.", "short_conv.0"),
    (r"\bshort_conv\.([2-5])\.", lambda m: f"short_conv.{int(m[1]) // 2}.{('conv', 'bn')[int(m[1]) % 2]}."),
    *_TIMM_GHOST_NETWORK,
]
_FROM_LAYOUT = {
    "official": _OFFICIAL_RENAMES,
    "timm": _TIMM_RENAMES,
    "timm_fastvit": _TIMM_FASTVIT_RENAMES,
    "apple_fastvit": _TIMM_FASTVIT_RENAMES,  # after apple_fastvit_as_timm
    "mmpretrain": _MMPRETRAIN_RENAMES,
    "apple": _APPLE_RENAMES,
    "yolov6": _YOLOV6_RENAMES,
    "dbb": _DBB_RENAMES,
    "acnet": _ACNET_RENAMES,
    "orepa": _OREPA_RENAMES,
    "timm_repvit": _TIMM_REPVIT_RENAMES,
    "thu_repvit": _TIMM_REPVIT_RENAMES,  # after authors_to_timm
    "timm_repghost": _TIMM_REPGHOST_RENAMES,
    "timm_ghostnetv3": _TIMM_GHOSTNETV3_RENAMES,
}


def _renamed_by(names: Callable[[list[str]], dict[str, str]]) -> Callable[[StateDict], StateDict]:
    """A state dict's keys renamed by a function of all its keys (a layout whose names depend on the block around them)."""
    return lambda state_dict: {new: state_dict[key] for key, new in names(list(state_dict)).items()}


# Layouts whose keys are not all a rename of ours: their tensors are computed (OREPA's train form, FastViT's
# attention norm folded), their names nested (the RepViT authors' flat list) or dependent on the block around
# them (UniRepLKNet, ultralytics) first.
_READ_FIRST = {
    "orepa": generate_orepa_kernels,
    "timm_fastvit": fold_attention_norms,
    "apple_fastvit": lambda state_dict: fold_attention_norms(apple_fastvit_as_timm(state_dict)),
    "thu_repvit": authors_to_timm,
    "unireplknet": _renamed_by(from_unireplknet_names),
    "ultralytics": _renamed_by(from_ultralytics_names),
}

# Ours -> theirs, for handing our weights to the other code base.
_TO_OFFICIAL_BLOCK: list[_Rename] = [
    (r"\bpost_bn\.", "bn."),
    (r"\bconv_kxk\.", "rbr_dense."),
    (r"\bconv_1x1\.", "rbr_1x1."),
    (r"\bidentity\.", "rbr_identity."),
    (r"\breparam\.", "rbr_reparam."),
]
_TO_OFFICIAL_NETWORK: list[_Rename] = [
    (r"^stem\.", "stage0."),
    (r"^stages\.(\d+)\.", lambda m: f"stage{int(m[1]) + 1}."),
    (r"^head\.fc\.", "linear."),
]
_TO_OFFICIAL: list[_Rename] = [*_TO_OFFICIAL_NETWORK, *_TO_OFFICIAL_BLOCK]
_TO_TIMM: list[_Rename] = [
    BlockRename("conv_1x1", "conv_scale", marker=r"conv_kxk\.\d+\."),  # MobileOne blocks; RepVGG's keep conv_1x1
    (r"\breparam\.", "reparam_conv."),
    (r"\bse\.down\.", "attn.fc1."),
    (r"\bse\.up\.", "attn.fc2."),
]
_TO_TIMM_FASTVIT: list[_Rename] = [
    *[rename for rename in _TO_TIMM if isinstance(rename, BlockRename) or "se" not in rename[0]],
    (r"\bse\.(down|up)\.", lambda m: "se.fc1." if m[1] == "down" else "se.fc2."),
    (r"\bproj\.0\.conv_kxk\.", "proj.0.large_conv."),
    (r"\bproj\.0\.conv_extra\.0\.", "proj.0.small_conv."),
    (r"\bmlp\.conv\.conv_kxk\.", "mlp.conv."),
]
_TO_MMPRETRAIN: list[_Rename] = [
    (r"^stem\.", "backbone.stem."),
    (r"^stages\.(\d+)\.", lambda m: f"backbone.stage_{int(m[1]) + 1}."),
    (r"\bconv_kxk\.bn\.", "branch_3x3.norm."),
    (r"\bconv_1x1\.bn\.", "branch_1x1.norm."),
    (r"\bconv_kxk\.", "branch_3x3."),
    (r"\bconv_1x1\.", "branch_1x1."),
    (r"\bidentity\.", "branch_norm."),
    (r"\breparam\.", "branch_reparam."),
    (r"\bse\.down\.", "se_layer.conv1.conv."),
    (r"\bse\.up\.", "se_layer.conv2.conv."),
]
_TO_APPLE: list[_Rename] = [
    *_TO_OFFICIAL_NETWORK,
    (r"\bconv_kxk\.", "rbr_conv."),
    (r"\bconv_1x1\.", "rbr_scale."),
    (r"\bidentity\.", "rbr_skip."),
    (r"\breparam\.", "reparam_conv."),
    (r"\bse\.down\.", "se.reduce."),
    (r"\bse\.up\.", "se.expand."),
]
_TO_YOLOV6: list[_Rename] = _TO_OFFICIAL_BLOCK
# conv_1x1_kxk.conv1 is DBB's idconv1 where it is identity-based: _dbb_identity_conv1 renames it by its shape.
_TO_DBB: list[_Rename] = [
    (r"\bconv_kxk\.", "dbb_origin."),
    (r"\bconv_1x1_kxk\.bn1\.", "dbb_1x1_kxk.bn1.bn."),
    (r"\bconv_1x1_kxk\.", "dbb_1x1_kxk."),
    (r"\bconv_1x1_avg\.bn\.", "dbb_avg.bn.bn."),
    (r"\bconv_1x1_avg\.", "dbb_avg."),
    (r"\bconv_1x1\.", "dbb_1x1."),
    (r"\breparam\.", "dbb_reparam."),
]
_TO_ACNET: list[_Rename] = [
    (r"\bconv_kxk\.(conv|bn)\.", lambda m: f"square_{m[1]}."),
    (r"\bconv_1xk\.(conv|bn)\.", lambda m: f"hor_{m[1]}."),
    (r"\bconv_kx1\.(conv|bn)\.", lambda m: f"ver_{m[1]}."),
    (r"\breparam\.", "fused_conv."),
]
_TO_TIMM_REPVIT: list[_Rename] = [
    BlockRename("fc", "head.l", marker=r"norm\."),  # the train-form classifier; deploy form: one Linear, timm's head
    (r"\btoken_mixer\.conv_kxk\.conv\.", "token_mixer.conv.c."),
    (r"\btoken_mixer\.conv_kxk\.bn\.", "token_mixer.conv.bn."),
    (r"\btoken_mixer\.conv_1x1\.", "token_mixer.conv1."),
    (r"\btoken_mixer\.post_bn\.", "token_mixer.bn."),
    (r"\bconv_kxk\.conv\.", "c."),
    (r"\bconv_kxk\.bn\.", "bn."),
    (r"\breparam\.", ""),
    (r"\bse\.down\.", "se.fc1."),
    (r"\bse\.up\.", "se.fc2."),
    (r"^head\.norm\.", "head.head.bn."),
    (r"^head\.norm_dist\.", "head.head_dist.bn."),
    (r"^head\.fc_dist\.", "head.head_dist.l."),
    (r"^head\.fc\.", "head."),
]


def _to_conv_bn(ours: str, theirs_conv: str, theirs_bn: str) -> list[_Rename]:
    return [(rf"{ours}\.conv_kxk\.conv\.", theirs_conv), (rf"{ours}\.conv_kxk\.bn\.", theirs_bn)]


def _to_ghost_group(match: re.Match) -> str:
    return f"blocks.{_GHOST_GROUPS.index((int(match[1]), int(match[2])))}."


# Block renames before the network's (they read our names), as _renamed applies them in order.
_TO_TIMM_GHOST_NETWORK: list[_Rename] = [
    *_to_conv_bn(r"^stem", "conv_stem.", "bn1."),
    (r"\bshortcut\.([01])\.conv_kxk\.(conv|bn)\.", lambda m: f"shortcut.{2 * int(m[1]) + (m[2] == 'bn')}."),
    (r"^(stages\.\d+\.\d+\.\d+)\.conv_kxk\.conv\.", r"\1.conv."),
    (r"^(stages\.\d+\.\d+\.\d+)\.conv_kxk\.bn\.", r"\1.bn1."),
    (r"^stages\.(\d+)\.(\d+)\.", _to_ghost_group),
    (r"^head\.conv_head\.", "conv_head."),
    (r"^head\.fc\.", "classifier."),
]
_TO_TIMM_REPGHOST: list[_Rename] = [
    (r"\b(primary_conv|cheap_operation)\.conv_kxk\.conv\.", r"\1.0."),
    (r"\b(primary_conv|cheap_operation)\.conv_kxk\.bn\.", r"\1.1."),
    (r"\bcheap_operation\.identity\.", "fusion_bn.0."),
    (r"\bcheap_operation\.reparam\.", "cheap_operation."),
    *_to_conv_bn(r"\bconv_dw", "conv_dw.", "bn_dw."),
    *_TO_TIMM_GHOST_NETWORK,
]
_TO_TIMM_GHOSTNETV3: list[_Rename] = [
    (r"\bprimary_conv\.conv_kxk\.(\d+)\.bn\.", r"primary_rpr_conv.\1.bn1."),
    (r"\bprimary_conv\.conv_kxk\.", "primary_rpr_conv."),
    (r"\bprimary_conv\.reparam\.", "primary_conv.0."),
    (r"\bcheap_operation\.conv_kxk\.(\d+)\.bn\.", r"cheap_rpr_conv.\1.bn1."),
    (r"\bcheap_operation\.conv_kxk\.", "cheap_rpr_conv."),
    (r"\bcheap_operation\.conv_1x1\.bn\.", "cheap_rpr_scale.bn1."),
    (r"\bcheap_operation\.conv_1x1\.", "cheap_rpr_scale."),
    (r"\bcheap_operation\.identity\.", "cheap_rpr_skip."),
    (r"\bcheap_operation\.reparam\.", "cheap_operation.0."),
    (r"\bconv_dw\.conv_kxk\.(\d+)\.bn\.", r"dw_rpr_conv.\1.bn1."),
    (r"\bconv_dw\.conv_kxk\.", "dw_rpr_conv."),
    (r"\bconv_dw\.conv_1x1\.bn\.", "dw_rpr_scale.bn1."),
    (r"\bconv_dw\.conv_1x1\.", "dw_rpr_scale."),
    (r"\bconv_dw\.reparam\.", "conv_dw."),
    *_to_conv_bn(r"\bshort_conv\.0", "short_conv.0.", "short_conv.1."),
    (r"\bshort_conv\.([12])\.(conv|bn)\.", lambda m: f"short_conv.{2 * int(m[1]) + (m[2] == 'bn')}."),
    *_TO_TIMM_GHOST_NETWORK,
]
_TO_LAYOUT = {
    "repblocks": [],
    "official": _TO_OFFICIAL,
    "timm": _TO_TIMM,
    "timm_fastvit": _TO_TIMM_FASTVIT,
    "apple_fastvit": [],  # read only: _apple_fastvit_unwritten says what to write instead
    "mmpretrain": _TO_MMPRETRAIN,
    "apple": _TO_APPLE,
    "yolov6": _TO_YOLOV6,
    "dbb": _TO_DBB,
    "acnet": _TO_ACNET,
    "timm_repghost": _TO_TIMM_REPGHOST,
    "timm_ghostnetv3": _TO_TIMM_GHOSTNETV3,
    "orepa": [],  # deploy form only: _orepa_fused_names names each fused conv as OREPA's choose_blk would build it
    "timm_repvit": _TO_TIMM_REPVIT,
    "thu_repvit": _TO_TIMM_REPVIT,  # then timm_to_authors
    "unireplknet": [],  # to_unireplknet_names, by the block around each key
    "ultralytics": [],  # to_ultralytics_names, by the block around each key
}
LAYOUTS = tuple(_TO_LAYOUT)
# The BatchNorm eps a code base trains with, where it is not BatchNorm's default (1e-5). YOLOv6's
# initialize_weights (yolov6/utils/torch_utils.py) sets eps=1e-3 on every nn.BatchNorm2d of its models.
LAYOUT_BN_EPS: dict[str, float] = {"yolov6": 1e-3, "ultralytics": 1e-3}  # ultralytics: the same initialize_weights

_OFFICIAL_NETWORK_MARK = re.compile(r"(^|\.)(stage\d\.|linear\.(weight|bias)$)")
_YOLOV6_NETWORK_MARK = re.compile(r"(^|\.)(ERBlock_\d|Rep_[pn]\d)\.")  # EfficientRep's and RepPAN's module names


def _yolov6_marks(keys: list[str]) -> bool:
    """YOLOv6: its network's module names, or a QARepVGG block outside the official network.

    A QA block (a plain-conv ``rbr_1x1``, a ``bn`` beside ``rbr_dense``/``rbr_reparam``) inside the
    official network (``stage0..4``) is the QARepVGG authors' code, which the official layout reads.
    """
    if any(_YOLOV6_NETWORK_MARK.search(key) for key in keys):
        return True
    if any(_OFFICIAL_NETWORK_MARK.search(key) for key in keys):
        return False
    if any(re.search(r"(^|\.)rbr_1x1\.weight$", key) for key in keys):
        return True
    return any(new != old for old, new in _block_renamed(keys, _POST_BN).items())


# What gives each layout away, checked in this order: key components no layout checked later has
# (wrapper prefixes allowed), or a test on all keys. apple's stage0..4 are the official code's too:
# apple's branch names tell them apart in train form and reparam_conv (official: rbr_reparam) in
# deploy form. YOLOv6's RepVGGBlock has the official block keys; only the QA blocks tell it apart.
# timm's train form without SE has our very keys, so it reads as ours, which is right.
_SIGNATURES: dict[str, re.Pattern | Callable[[list[str]], bool]] = {
    # apple's FastViT: its MobileOne blocks have apple's MobileOne names, so it comes first.
    "apple_fastvit": re.compile(r"(^|\.)(patch_embed\.\d|network\.\d+\.|conv_exp\.)"),
    # The authors' RepViT rows and classifier; timm's RepVggDw token mixer, train (a ConvNorm ``conv.c``) or fused.
    "thu_repvit": re.compile(r"^features\.\d+\.(token_mixer|channel_mixer)\.|^classifier\.classifier\."),
    "timm_repvit": re.compile(r"(^|\.)token_mixer\.(conv\.c\.weight|weight)$"),
    "unireplknet": is_unireplknet,
    "apple": re.compile(r"(^|\.)(rbr_(conv|scale|skip)|se\.(reduce|expand))\.|(^|\.)stage\d\.(\d+\.)?reparam_conv\."),
    # OREPA's RepVGGBlock_OREPA has the official rbr_1x1 and rbr_identity beside its generated rbr_dense.
    "orepa": re.compile(r"(^|\.)(weight_(orepa|rbr|or1x1)_\w+$|(orepa|or1x1|or_large)_reparam\.)"),
    "dbb": re.compile(r"(^|\.)dbb_(origin|1x1|avg|1x1_kxk|reparam)\."),
    "acnet": re.compile(r"(^|\.)(square_(conv|bn)|hor_(conv|bn)|ver_(conv|bn)|fused_conv)\."),
    "yolov6": _yolov6_marks,
    "official": re.compile(r"(^|\.)(stage\d|rbr_(dense|1x1|identity|reparam))\."),
    "mmpretrain": re.compile(r"(^|\.)(stage_\d+|branch_(3x3|1x1|norm|reparam)|se_layer)\."),
    # Before timm's: its FastViT's FFN keeps its depthwise Conv+BN unfused in train and deploy form alike.
    "timm_fastvit": re.compile(r"(^|\.)(mlp\.conv\.(conv|bn)|(large|small)_conv)\."),
    "timm": re.compile(r"(^|\.)(reparam_conv|conv_scale|attn\.fc[12])\."),
    # Ours have the same module names, but never a bare index or tensor right below them.
    "timm_ghostnetv3": re.compile(
        r"(^|\.)((primary|cheap)_rpr_\w+|dw_rpr_\w+)\.|(^|\.)short_conv\.\d\.(weight|bias|running_\w+)$"
    ),
    "timm_repghost": re.compile(r"(^|\.)ghost[12]\.(primary_conv\.[01]\.|fusion_bn\.|cheap_operation\.(\d\.|weight$))"),
    # Last: conv1/conv2 Conv+BN pairs are a RepConv only where nothing else claimed the keys.
    "ultralytics": is_ultralytics,
}
# First key components at which a layout's keys have arrived: wrapper prefixes are stripped until one shows.
_LAYOUT_ROOTS = {"stage0", "linear", "backbone", "stage_1", "patch_embed", "network", "features", "conv_stem"}


def detect_layout(keys: Iterable[str]) -> str:
    """Which of :data:`LAYOUTS` a state dict's keys are in (``"repblocks"`` when no other layout's mark shows)."""
    keys = list(keys)
    for layout, signature in _SIGNATURES.items():
        marked = signature(keys) if callable(signature) else any(signature.search(key) for key in keys)
        if marked:
            return layout
    return "repblocks"


def to_repblocks_layout(
    state_dict: Mapping[str, Tensor], roots: set[str] | None = None, keep: Collection[str] = ()
) -> StateDict:
    """Rename keys of another code base's layout (:data:`LAYOUTS`) to ours, dropping wrapper prefixes.

    Args:
        state_dict: Keys in any supported layout (:func:`detect_layout` says which).
        roots: First key components of the target model (``{"stem", "stages", "head"}`` for
            RepVGG); wrapper prefixes are stripped until keys start with one of them.
        keep: Keys the target model has as they are; never renamed, so that loading into a
            model of another layout (a timm model with ``attn.fc1``, say) leaves its keys alone.
    """
    state_dict = _strip_wrappers(dict(state_dict), roots or {"stem", "stages", "head"})
    layout = detect_layout(state_dict)
    if layout in _READ_FIRST:
        state_dict = _READ_FIRST[layout](state_dict)
    renamed = _renamed(state_dict, _FROM_LAYOUT.get(layout, []))
    return {key if key in keep else renamed[key]: value for key, value in state_dict.items()}


def convert_layout(state_dict: Mapping[str, Tensor], layout: str) -> StateDict:
    """Rename a state dict of our layout to ``layout`` (one of :data:`LAYOUTS`).

    That code base then loads it with a plain ``load_state_dict`` (mmpretrain: into its
    ``ImageClassifier``, whose ``backbone`` is the RepVGG; YOLOv6: into a module holding blocks
    where ours holds RepBlocks, as its networks are not ours).
    """
    renames = _TO_LAYOUT.get(layout)
    if renames is None:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    renamed = _renamed(state_dict, renames)
    if layout in _WRITE_LAST:
        renamed = _WRITE_LAST[layout](renamed, state_dict)
    return {renamed[key]: value for key, value in state_dict.items()}


def _dbb_identity_conv1(renamed: dict[str, str], state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """DBB names the first 1x1 of ``dbb_1x1_kxk`` ``idconv1`` where it is identity-based (as wide as the input).

    Its kernel (T, I/g, 1, 1) and the kxk after it (O, T/g, k, k) give the groups, g = T / (T/g), hence I.
    """
    for key, new in renamed.items():
        if not new.endswith("dbb_1x1_kxk.conv1.weight"):
            continue
        second = state_dict.get(key.replace("conv1.weight", "conv2.weight"))
        first = state_dict[key]
        if second is not None and first.shape[0] == first.shape[1] * (first.shape[0] // second.shape[1]):
            renamed[key] = new.replace(".conv1.weight", ".idconv1.weight")
    return renamed


def _orepa_fused_names(renamed: dict[str, str], state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """Each fused conv as OREPA's ``choose_blk`` builds the block of its kernel size: OREPA_1x1, OREPA, OREPA_LargeConv.

    Raises:
        ValueError: Train-form keys: OREPA's train form generates its kernel from parameters no branch here holds.
    """
    train_form = re.compile(r"(^|\.)(conv_(kxk|1x1|1xk|kx1|1x1_kxk|1x1_avg)|identity|post_bn)\.")
    branches = sorted({train_form.split(key)[0] for key in renamed if train_form.search(key)})
    if branches:
        raise ValueError(
            "OREPA's train form generates its kernel from parameters that no branch set here holds, so only the deploy "
            f"form is written in its layout; these weights have train-form blocks ({', '.join(branches[:3])}): fuse "
            "them first (repblocks.switch_to_deploy), or write layout 'official' for OREPA's RepVGGBlock_OREPA"
        )
    names = dict(renamed)
    for key, new in renamed.items():
        fused = re.search(r"(^|\.)reparam\.(weight|bias)$", new)
        if fused:
            size = state_dict[re.sub(r"bias$", "weight", key)].shape[-1]
            kind = "or1x1" if size == 1 else "or_large" if size >= 7 else "orepa"
            names[key] = f"{new[: fused.start()]}{fused[1]}{kind}_reparam.{fused[2]}"
    return names


def _timm_fastvit_unfused(renamed: dict[str, str], state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """timm's FastViT has no fused form of its FFN's depthwise Conv+BN, nor of the BatchNorm before attention.

    Raises:
        ValueError: Our deploy form (which folds both): the message says to write the train form.
    """
    fused = [
        key for key in renamed.values() if re.search(r"(^|\.)(mlp\.conv\.reparam_conv\.|token_mixer\.qkv\.bias$)", key)
    ]
    if fused:
        raise ValueError(
            "timm's FastViT keeps the FFN's depthwise Conv+BN and the BatchNorm before attention unfused even after "
            f"timm's reparameterize_model, and these weights fold them ({', '.join(fused[:3])}): write the train form "
            "in layout 'timm_fastvit' (timm.utils.reparameterize_model then gives timm's deploy form)"
        )
    return renamed


def _apple_fastvit_unwritten(renamed: dict[str, str], state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    raise ValueError(
        "apple's FastViT layout is read, not written: write layout 'timm_fastvit' (timm's FastVit loads it, and "
        "timm's checkpoint_filter_fn is how timm reads apple's)"
    )


# Layouts whose names depend on tensors, not on keys alone.
_WRITE_LAST = {
    "apple_fastvit": _apple_fastvit_unwritten,
    "dbb": _dbb_identity_conv1,
    "orepa": _orepa_fused_names,
    "thu_repvit": lambda renamed, _state_dict: timm_to_authors(renamed),
    "timm_fastvit": _timm_fastvit_unfused,
    "unireplknet": lambda renamed, state_dict: to_unireplknet_names(state_dict),
    "ultralytics": lambda renamed, state_dict: to_ultralytics_names(state_dict),
}


def _renamed(keys: Iterable[str], renames: list[_Rename]) -> dict[str, str]:
    """Each key's new name: the block renames first (their markers are the keys as given), then the rest in order."""
    new_names = {key: key for key in keys}
    for rename in renames:
        if isinstance(rename, BlockRename):
            by_block = _block_renamed(list(new_names.values()), rename)
            new_names = {key: by_block[new] for key, new in new_names.items()}
    for rename in renames:
        if not isinstance(rename, BlockRename):
            pattern, replacement = rename
            new_names = {key: re.sub(pattern, replacement, new) for key, new in new_names.items()}
    return new_names


def _block_renamed(keys: list[str], rename: BlockRename) -> dict[str, str]:
    """Each key with ``rename`` applied where the component follows the name of a block ``rename.marker`` marks."""
    marker = re.compile(rf"(?:^|(?<=\.))(?:{rename.marker})")
    marked = {key[: match.start()] for key in keys for match in marker.finditer(key)}  # block names, with their dot
    component = re.compile(rf"(?:^|(?<=\.)){re.escape(rename.old)}\.")
    new_names = {}
    for key in keys:
        new_names[key] = key
        for match in component.finditer(key):
            if key[: match.start()] in marked:
                new_names[key] = f"{key[: match.start()]}{rename.new}.{key[match.end() :]}"
                break
    return new_names


def _strip_wrappers(state_dict: StateDict, roots: set[str]) -> StateDict:
    roots = roots | _LAYOUT_ROOTS  # other layouts' roots count as arrived too
    while state_dict and not any(key.split(".")[0] in roots for key in state_dict):
        for prefix in _WRAPPER_PREFIXES:
            inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            # A Lightning checkpoint may hold more than the model (an EMA copy, loss buffers): keep the model.
            if inner and (len(inner) == len(state_dict) or prefix == "model."):
                state_dict = inner
                break
        else:
            break
    return state_dict
