"""FastViT state dicts that a table of renames cannot read alone: apple's flat network, and fused attention norms.

apple's code (apple/ml-fastvit, ``models/fastvit.py``) holds its stages as one flat ``network`` list: the
blocks of a stage (an ``nn.Sequential``), then the next stage's ``PatchEmbed`` (``network.N.proj``) and,
in SA variants, its ``RepCPE`` (``network.N.pe`` or, fused, ``network.N.reparam_conv``). Which stage an
index belongs to follows from where the ``PatchEmbed`` s are, so :func:`apple_fastvit_as_timm` renames
to timm's FastViT keys (as timm's own ``checkpoint_filter_fn`` does, deploy form included), and the
``timm_fastvit`` layout's renames take it from there.

Both code bases keep the BatchNorm before attention in their reparameterized form; ours folds it into
the attention's ``qkv`` (:class:`repblocks.models.fastvit.AttentionBlock`). :func:`fold_attention_norms`
folds it on reading deploy-form weights, in float64 rounded once.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from repblocks.fusion import fold_bn_into_linear

__all__ = ["apple_fastvit_as_timm", "fold_attention_norms"]

StateDict = dict[str, Tensor]

# apple's names -> timm's, below the network level (timm's checkpoint_filter_fn's table, and the fused
# large kernel's name, which that table leaves out).
_APPLE_TO_TIMM = [
    (r"^patch_embed\.", "stem."),
    (r"\brbr_conv\.", "conv_kxk."),
    (r"\brbr_scale\.", "conv_scale."),
    (r"\brbr_skip\.", "identity."),
    (r"\blkb_origin\.", "large_conv."),
    (r"\blkb_reparam\.", "reparam_conv."),
    (r"\bconvffn\.", "mlp."),
    (r"\bse\.reduce\.", "se.fc1."),
    (r"\bse\.expand\.", "se.fc2."),
    (r"^conv_exp\.", "final_conv."),
    (r"\blayer_scale(_[12])?$", lambda m: f"layer_scale{m[1] or ''}.gamma"),
    (r"^head\.", "head.fc."),
]


def apple_fastvit_as_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """apple's FastViT keys (train or deploy form) renamed to timm's."""
    patch_embeds = sorted({int(m[1]) for key in state_dict if (m := re.match(r"network\.(\d+)\.proj\.", key))})
    renamed = {}
    for key, value in state_dict.items():
        match = re.match(r"network\.(\d+)\.(.*)$", key)
        if match:
            index, rest = int(match[1]), match[2]
            stage = f"stages.{bisect.bisect_right(patch_embeds, index)}"
            if rest.startswith("proj."):
                key = f"{stage}.downsample.{rest}"
            elif rest.startswith("pe."):
                key = f"{stage}.pos_emb.pos_enc.{rest[3:]}"
            elif rest.startswith("reparam_conv."):  # a fused RepCPE: the only module right below network.N with it
                key = f"{stage}.pos_emb.{rest}"
            else:
                key = f"{stage}.blocks.{rest}"
        for pattern, replacement in _APPLE_TO_TIMM:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


@torch.no_grad()
def fold_attention_norms(state_dict: Mapping[str, Tensor]) -> StateDict:
    """In timm-named deploy-form weights, each ``<block>.norm`` BatchNorm folded into ``<block>.token_mixer.qkv``.

    Train-form weights (a MobileOne block's or large kernel's branches present) are returned as they are:
    a train-form model keeps the norm. The BatchNorm's eps is timm's and apple's (1e-5): a state dict
    does not record it.
    """
    if any(re.search(r"(^|\.)(conv_kxk|large_conv)\.", key) for key in state_dict):
        return dict(state_dict)
    folded = dict(state_dict)
    for key, running_mean in state_dict.items():
        block = re.match(r"(.*\.)norm\.running_mean$", key)
        qkv_key = f"{block[1]}token_mixer.qkv.weight" if block else ""
        if qkv_key not in state_dict:
            continue
        prefix = f"{block[1]}norm."
        norm = nn.BatchNorm2d(len(running_mean), dtype=running_mean.dtype).eval()
        norm.load_state_dict(
            {name: state_dict[prefix + name] for name in norm.state_dict() if prefix + name in state_dict},
            strict=False,  # num_batches_tracked, which older files lack, does not enter the fold
        )
        qkv = nn.Linear(*state_dict[qkv_key].shape[::-1], bias=False, device="meta")
        qkv.weight = nn.Parameter(state_dict[qkv_key], requires_grad=False)
        folded[qkv_key], folded[qkv_key[: -len("weight")] + "bias"] = fold_bn_into_linear(norm, qkv)
        for name in [name for name in folded if name.startswith(prefix)]:
            del folded[name]
    return folded
