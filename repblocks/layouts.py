"""State-dict layouts of other code bases, renamed to ours and back.

Our layout is ``stem``, ``stages.i.j``, ``conv_kxk``, ``conv_1x1``, ``identity``, ``reparam``,
``se.down/up``, ``head.fc``. Read as well, in train or deploy form:

* the official RepVGG code's (``stage0..4``, ``rbr_dense``, ``rbr_1x1``, ``rbr_identity``,
  ``rbr_reparam``, ``linear``);
* timm's (ours, except ``reparam_conv`` and ``attn.fc1/fc2``: in train form without SE the keys are ours);
* mmpretrain's (``backbone.stem``, ``backbone.stage_1..4``, ``branch_3x3``/``branch_1x1`` with
  ``conv``/``norm``, ``branch_norm``, ``branch_reparam``, ``se_layer.conv1/conv2.conv``, ``head.fc``);

each possibly wrapped by DDP (``module.``), ``torch.compile`` (``_orig_mod.``) or a Lightning
module (``model.``). A layout is recognised by keys no other layout has, and every layout is a
table of regular-expression renames: adding one is data, not code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping

from torch import Tensor

__all__ = ["LAYOUTS", "convert_layout", "detect_layout", "to_repblocks_layout"]

StateDict = dict[str, Tensor]

# Prefixes that wrappers add to every key: DDP, torch.compile, a LightningModule's attribute.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

_Rename = tuple[str, str | Callable[[re.Match], str]]
_OFFICIAL_RENAMES: list[_Rename] = [
    (r"^stage0\.", "stem."),
    (r"^stage([1-9])\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}."),
    (r"\brbr_dense\.", "conv_kxk."),
    (r"\brbr_1x1\.", "conv_1x1."),
    (r"\brbr_identity\.", "identity."),
    (r"\brbr_reparam\.", "reparam."),
    (r"^linear\.", "head.fc."),
]
_TIMM_RENAMES: list[_Rename] = [
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
_FROM_LAYOUT = {"official": _OFFICIAL_RENAMES, "timm": _TIMM_RENAMES, "mmpretrain": _MMPRETRAIN_RENAMES}

# Ours -> theirs, for handing our weights to the official code, timm or mmpretrain.
_TO_OFFICIAL: list[_Rename] = [
    (r"^stem\.", "stage0."),
    (r"^stages\.(\d+)\.", lambda m: f"stage{int(m[1]) + 1}."),
    (r"\bconv_kxk\.", "rbr_dense."),
    (r"\bconv_1x1\.", "rbr_1x1."),
    (r"\bidentity\.", "rbr_identity."),
    (r"\breparam\.", "rbr_reparam."),
    (r"^head\.fc\.", "linear."),
]
_TO_TIMM: list[_Rename] = [
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
_TO_LAYOUT = {"repblocks": [], "official": _TO_OFFICIAL, "timm": _TO_TIMM, "mmpretrain": _TO_MMPRETRAIN}
LAYOUTS = tuple(_TO_LAYOUT)

# What gives each layout away: key components that no other layout has (wrapper prefixes allowed).
# timm's train form without SE has our very keys, so it reads as ours, which is right.
_SIGNATURES = {
    "official": re.compile(r"(^|\.)(stage\d|rbr_(dense|1x1|identity|reparam))\."),
    "mmpretrain": re.compile(r"(^|\.)(stage_\d+|branch_(3x3|1x1|norm|reparam)|se_layer)\."),
    "timm": re.compile(r"(^|\.)(reparam_conv|attn\.fc[12])\."),
}
# First key components at which a layout's keys have arrived: wrapper prefixes are stripped until one shows.
_LAYOUT_ROOTS = {"stage0", "linear", "backbone", "stage_1"}


def detect_layout(keys: Iterable[str]) -> str:
    """Which of :data:`LAYOUTS` a state dict's keys are in (``"repblocks"`` when no other layout's mark shows)."""
    keys = list(keys)
    for layout, signature in _SIGNATURES.items():
        if any(signature.search(key) for key in keys):
            return layout
    return "repblocks"


def to_repblocks_layout(
    state_dict: Mapping[str, Tensor], roots: set[str] | None = None, keep: Collection[str] = ()
) -> StateDict:
    """Rename keys of the official RepVGG, timm or mmpretrain layout to ours, dropping wrapper prefixes.

    Args:
        state_dict: Keys in any supported layout (:func:`detect_layout` says which).
        roots: First key components of the target model (``{"stem", "stages", "head"}`` for
            RepVGG); wrapper prefixes are stripped until keys start with one of them.
        keep: Keys the target model has as they are; never renamed, so that loading into a
            model of another layout (a timm model with ``attn.fc1``, say) leaves its keys alone.
    """
    state_dict = _strip_wrappers(dict(state_dict), roots or {"stem", "stages", "head"})
    renames = _FROM_LAYOUT.get(detect_layout(state_dict), [])
    return {key if key in keep else _rename(key, renames): value for key, value in state_dict.items()}


def convert_layout(state_dict: Mapping[str, Tensor], layout: str) -> StateDict:
    """Rename a state dict of our layout to ``layout`` (one of :data:`LAYOUTS`).

    The official RepVGG code, timm and mmpretrain then load it with a plain ``load_state_dict``
    (mmpretrain: into its ``ImageClassifier``, whose ``backbone`` is the RepVGG).
    """
    renames = _TO_LAYOUT.get(layout)
    if renames is None:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    return {_rename(key, renames): value for key, value in state_dict.items()}


def _rename(key: str, renames: list[_Rename]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


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
