"""UniRepLKNet's layout (AILab-CVC/UniRepLKNet, ``unireplknet.py``), renamed to ours and back.

Upstream's ``DilatedReparamBlock`` holds ``lk_origin`` and ``origin_bn`` (our ``conv_kxk.conv``/``.bn``) and a
Conv+BN per dilated branch, ``dil_conv_k{k}_{r}``/``dil_bn_k{k}_{r}`` (our ``conv_extra.{i}``, in the order of
its table, :data:`repblocks.blocks.UNIREPLK_EXTRA_KERNELS`); ``merge_dilated_branches()`` leaves ``lk_origin``
with a bias (our ``reparam``). Its ``UniRepLKNetBlock`` names the BN after the dwconv ``norm`` (our dwconv's
``post_bn``, or its kxk's BN where the dwconv is a plain 3x3/5x5 conv, ``dwconv.weight``), and keeps its FFN
in ``nn.Sequential``s: ``pwconv1.1`` (our ``pwconv1``), ``act.1`` (the GRN, our ``grn``), ``pwconv2.0`` and the
BN ``pwconv2.2`` (our ``pwconv2`` and ``bn``). Its network: ``downsample_layers.0`` is our stem (``.0``, ``.1``)
and the downsampling of stage 1 (``.3``, ``.4``), ``downsample_layers.i`` stage i's, ``stages.i.j`` our
``stages.i.blocks.j``, ``norm``/``head`` our ``head.norm``/``head.fc``.

Which name a key takes depends on the block around it (train or fused form, dilated or plain dwconv), so both
directions are a function of all the keys, and of the kernel shapes for the dilations (a fused block has none).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from repblocks.block_renames import rename_below
from repblocks.blocks import UNIREPLK_EXTRA_KERNELS

__all__ = ["DILATED_FROM", "from_unireplknet_names", "is_unireplknet", "to_unireplknet_names"]

DILATED_FROM = 7  # upstream's UniRepLKNetBlock: a DilatedReparamBlock from kernel 7 on, a plain conv below

_MARK = re.compile(
    r"(^|\.)(lk_origin|origin_bn|dil_(conv|bn)_k\d+_\d+|downsample_layers\.\d+)\.|(^|\.)(pwconv1\.1|act\.1)\.\w+$"
)
_DILATED = re.compile(r"^(?P<block>(?:.*\.)?)lk_origin\.weight$")
_BRANCH = re.compile(r"^dil_(?P<part>conv|bn)_k(?P<k>\d+)_(?P<r>\d+)\.(?P<rest>.+)$")
_FFN_BLOCK = re.compile(r"^(?P<block>(?:.*\.)?)pwconv1\.1\.weight$")
_UPSTREAM_NETWORK = [
    (r"^downsample_layers\.0\.([01])\.", r"stem.\1."),
    (r"^downsample_layers\.0\.3\.", "stages.0.downsample.0."),
    (r"^downsample_layers\.0\.4\.", "stages.0.downsample.1."),
    (r"^downsample_layers\.([1-9])\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.", "head.fc."),  # before the norm becomes head.norm
    (r"^norm\.", "head.norm."),
]
_OUR_NETWORK = [
    (r"^stem\.([01])\.", r"downsample_layers.0.\1."),
    (r"^stages\.0\.downsample\.([01])\.", lambda m: f"downsample_layers.0.{int(m[1]) + 3}."),
    (r"^stages\.([1-9])\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]
_UPSTREAM_FFN = [("pwconv1.1.", "pwconv1."), ("act.1.", "grn."), ("pwconv2.0.", "pwconv2."), ("pwconv2.2.", "bn.")]


def is_unireplknet(keys) -> bool:
    """Whether the keys are upstream UniRepLKNet's: its dilated block, its FFN's Sequentials or its network."""
    return any(_MARK.search(key) for key in keys)


def from_unireplknet_names(keys) -> dict[str, str]:
    """Each upstream key's name in our layout (other keys keep theirs)."""
    names = {key: key for key in keys}
    if any(key.startswith(("downsample_layers.", "stages.")) for key in names):  # the network, not a block alone
        for pattern, replacement in _UPSTREAM_NETWORK:
            names = {key: re.sub(pattern, replacement, name) for key, name in names.items()}
    current = set(names.values())
    dilated = [match["block"] for name in current if (match := _DILATED.match(name))]
    for block in dilated:
        fused = f"{block}origin_bn.running_var" not in current
        dilations = sorted(
            {int(m["r"]) for n in current if n.startswith(block) and (m := _BRANCH.match(n[len(block) :]))}
        )
        for key, name in names.items():
            rest = name[len(block) :] if name.startswith(block) else None
            if rest is None:
                continue
            if rest.startswith("lk_origin."):
                names[key] = block + ("reparam." if fused else "conv_kxk.conv.") + rest[len("lk_origin.") :]
            elif rest.startswith("origin_bn."):
                names[key] = f"{block}conv_kxk.bn.{rest[len('origin_bn.') :]}"
            elif branch := _BRANCH.match(rest):
                index = dilations.index(int(branch["r"]))
                names[key] = f"{block}conv_extra.{index}.{branch['part']}.{branch['rest']}"
    for block in [match["block"] for name in current if (match := _FFN_BLOCK.match(name))]:
        if f"{block}dwconv.lk_origin.weight" in current:
            rename_below(names, block, [("norm.", "dwconv.post_bn.")])
        else:  # a plain 3x3/5x5 depthwise conv: with a bias once fused, else followed by `norm`, its BN
            plain = "dwconv.reparam." if f"{block}dwconv.bias" in current else "dwconv.conv_kxk.conv."
            rename_below(names, block, [("dwconv.weight", plain + "weight"), ("dwconv.bias", plain + "bias")])
            rename_below(names, block, [("norm.", "dwconv.conv_kxk.bn.")])
        rename_below(names, block, _UPSTREAM_FFN)
    return names


_OUR_FFN_BLOCK = re.compile(r"^(?P<block>(?:.*\.)?)pwconv1\.weight$")
_OUR_DWCONV = re.compile(r"^(?P<block>(?:.*\.)?)(conv_kxk\.conv|reparam)\.weight$")


def to_unireplknet_names(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """Each key of our layout as upstream names it.

    A RepBlock is a ``DilatedReparamBlock`` (its ``conv_extra.i`` named by the table for its kernel size) unless
    it is the 3x3/5x5 dwconv of a UniRepLKNet block, which upstream holds as a plain conv.

    Raises:
        ValueError: A block whose kernel or extra kernels are not a DilatedReparamBlock's.
    """
    names = {key: key for key in state_dict}
    ffn_blocks = {match["block"] for key in names if (match := _OUR_FFN_BLOCK.match(key))}
    for dwconv in [match["block"] for key in names if (match := _OUR_DWCONV.match(key))]:
        train = f"{dwconv}conv_kxk.conv.weight" in names
        size = state_dict[f"{dwconv}conv_kxk.conv.weight" if train else f"{dwconv}reparam.weight"].shape[-1]
        owner = dwconv.removesuffix("dwconv.") if dwconv.removesuffix("dwconv.") in ffn_blocks else None
        if owner is not None and size < DILATED_FROM:  # upstream's plain depthwise conv, and its BN `norm`
            plain = [
                ("dwconv.conv_kxk.conv.", "dwconv."),
                ("dwconv.reparam.", "dwconv."),
                ("dwconv.conv_kxk.bn.", "norm."),
            ]
            rename_below(names, owner, plain)
            continue
        pairs = UNIREPLK_EXTRA_KERNELS.get(size)
        extra = {key[len(dwconv) :].split(".")[1] for key in names if key.startswith(f"{dwconv}conv_extra.")}
        if pairs is None or (train and len(extra) != len(pairs)):
            raise ValueError(
                f"block {dwconv.rstrip('.') or '(the root)'} (kernel {size}, {len(extra)} extra kernels) is no "
                f"DilatedReparamBlock: upstream's have kernels {', '.join(map(str, UNIREPLK_EXTRA_KERNELS))}, "
                "each with its own dilated branches (repblocks.blocks.UNIREPLK_EXTRA_KERNELS)"
            )
        renames = [("conv_kxk.conv.", "lk_origin."), ("conv_kxk.bn.", "origin_bn."), ("reparam.", "lk_origin.")]
        for index, (k, r) in enumerate(pairs):
            renames += [
                (f"conv_extra.{index}.conv.", f"dil_conv_k{k}_{r}."),
                (f"conv_extra.{index}.bn.", f"dil_bn_k{k}_{r}."),
            ]
        rename_below(names, dwconv, renames)
        if owner is not None:
            rename_below(names, owner, [("dwconv.post_bn.", "norm.")])
    for block in ffn_blocks:
        rename_below(names, block, [(new, old) for old, new in _UPSTREAM_FFN])
    if any(key.startswith(("stem.", "stages.")) for key in names):
        for pattern, replacement in _OUR_NETWORK:
            names = {key: re.sub(pattern, replacement, name) for key, name in names.items()}
    return names
