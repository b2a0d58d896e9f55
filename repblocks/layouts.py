"""State-dict layouts of other code bases, renamed to ours and back.

Our layout is ``stem``, ``stages.i.j``, ``conv_kxk``, ``conv_1x1``, ``identity``, ``reparam``,
``se.down/up``, ``head.fc``. Read as well: the official RepVGG layout (``stage0..4``,
``rbr_dense``, ``rbr_1x1``, ``rbr_identity``, ``rbr_reparam``, ``linear``) and timm's (``stem``,
``stages.i.j``, ``conv_kxk``, ``conv_1x1``, ``identity``, ``reparam_conv``, ``attn.fc1/fc2``,
``head.fc``), in train or deploy form, wrapped by DDP (``module.``), ``torch.compile``
(``_orig_mod.``) or a Lightning module (``model.``). Every layout is a table of regular-expression
renames: adding one is data, not code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping

from torch import Tensor

__all__ = ["LAYOUTS", "convert_layout", "to_repblocks_layout"]

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

# Ours -> theirs, for handing our weights to the official code or to timm.
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
LAYOUTS = ("repblocks", "official", "timm")


def to_repblocks_layout(
    state_dict: Mapping[str, Tensor], roots: set[str] | None = None, keep: Collection[str] = ()
) -> StateDict:
    """Rename keys of the official RepVGG or timm layout to ours, dropping wrapper prefixes.

    Args:
        state_dict: Keys in any supported layout.
        roots: First key components of the target model (``{"stem", "stages", "head"}`` for
            RepVGG); wrapper prefixes are stripped until keys start with one of them.
        keep: Keys the target model has as they are; never renamed, so that loading into a
            model of another layout (a timm model with ``attn.fc1``, say) leaves its keys alone.
    """
    state_dict = _strip_wrappers(dict(state_dict), roots or {"stem", "stages", "head"})
    official = any(re.match(r"^stage\d\.|.*\brbr_", key) for key in state_dict)
    renames = _OFFICIAL_RENAMES if official else _TIMM_RENAMES
    return {key if key in keep else _rename(key, renames): value for key, value in state_dict.items()}


def convert_layout(state_dict: Mapping[str, Tensor], layout: str) -> StateDict:
    """Rename a state dict of our layout to ``layout`` (one of :data:`LAYOUTS`).

    The official RepVGG code and timm then load it with a plain ``load_state_dict``.
    """
    renames = {"repblocks": [], "official": _TO_OFFICIAL, "timm": _TO_TIMM}.get(layout)
    if renames is None:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    return {_rename(key, renames): value for key, value in state_dict.items()}


def _rename(key: str, renames: list[_Rename]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _strip_wrappers(state_dict: StateDict, roots: set[str]) -> StateDict:
    roots = roots | {"stage0", "linear"}  # the official layout's roots count as arrived too
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
