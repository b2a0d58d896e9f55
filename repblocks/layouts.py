"""State-dict layouts of other code bases, renamed to ours and back.

Our layout is ``stem``, ``stages.i.j``, ``conv_kxk`` (``conv_kxk.n`` with several kxk branches),
``conv_1x1``, ``identity``, ``post_bn``, ``reparam``, ``se.down/up``, ``head.fc``. Read as well, in
train or deploy form:

* the official RepVGG code's (``stage0..4``, ``rbr_dense``, ``rbr_1x1``, ``rbr_identity``,
  ``rbr_reparam``, ``linear``), QARepVGG blocks in that network included (the QARepVGG authors' code,
  cxxgtxy/QARepVGG: a plain-conv ``rbr_1x1`` and a block-level ``bn`` after the sum, our ``post_bn``);
* timm's RepVGG and MobileOne (ours, except ``conv_scale``, ``reparam_conv`` and ``attn.fc1/fc2``: a
  RepVGG in train form without SE has our very keys);
* mmpretrain's (``backbone.stem``, ``backbone.stage_1..4``, ``branch_3x3``/``branch_1x1`` with
  ``conv``/``norm``, ``branch_norm``, ``branch_reparam``, ``se_layer.conv1/conv2.conv``, ``head.fc``);
* apple's MobileOne (``stage0..4`` as the official RepVGG code, ``rbr_conv.n``, ``rbr_scale``,
  ``rbr_skip``, ``reparam_conv``, ``se.reduce/expand``, ``linear``);
* YOLOv6's blocks (RepVGGBlock: the official block keys; QARepVGGBlock: a plain-conv ``rbr_1x1`` and
  a block-level ``bn`` after the sum, which its deploy form keeps beside ``rbr_reparam``), told apart by
  the QA blocks or by YOLOv6's network names (``ERBlock_N``, ``Rep_pN``/``Rep_nN``). YOLOv6 trains
  with BatchNorm eps 1e-3 (:data:`LAYOUT_BN_EPS`), which a state dict does not record;

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
_FROM_LAYOUT = {
    "official": _OFFICIAL_RENAMES,
    "timm": _TIMM_RENAMES,
    "mmpretrain": _MMPRETRAIN_RENAMES,
    "apple": _APPLE_RENAMES,
    "yolov6": _YOLOV6_RENAMES,
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
_TO_LAYOUT = {
    "repblocks": [],
    "official": _TO_OFFICIAL,
    "timm": _TO_TIMM,
    "mmpretrain": _TO_MMPRETRAIN,
    "apple": _TO_APPLE,
    "yolov6": _TO_YOLOV6,
}
LAYOUTS = tuple(_TO_LAYOUT)
# The BatchNorm eps a code base trains with, where it is not BatchNorm's default (1e-5). YOLOv6's
# initialize_weights (yolov6/utils/torch_utils.py) sets eps=1e-3 on every nn.BatchNorm2d of its models.
LAYOUT_BN_EPS: dict[str, float] = {"yolov6": 1e-3}

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
    "apple": re.compile(r"(^|\.)(rbr_(conv|scale|skip)|se\.(reduce|expand))\.|(^|\.)stage\d\.(\d+\.)?reparam_conv\."),
    "yolov6": _yolov6_marks,
    "official": re.compile(r"(^|\.)(stage\d|rbr_(dense|1x1|identity|reparam))\."),
    "mmpretrain": re.compile(r"(^|\.)(stage_\d+|branch_(3x3|1x1|norm|reparam)|se_layer)\."),
    "timm": re.compile(r"(^|\.)(reparam_conv|conv_scale|attn\.fc[12])\."),
}
# First key components at which a layout's keys have arrived: wrapper prefixes are stripped until one shows.
_LAYOUT_ROOTS = {"stage0", "linear", "backbone", "stage_1"}


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
    renamed = _renamed(state_dict, _FROM_LAYOUT.get(detect_layout(state_dict), []))
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
    return {renamed[key]: value for key, value in state_dict.items()}


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
