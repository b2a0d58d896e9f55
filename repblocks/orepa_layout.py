"""OREPA's train form read as a kernel: each block's weight generated from its parameters, exactly, in float64.

OREPA (Hu et al., CVPR 2022, https://arxiv.org/abs/2204.00826; JUGGHM/OREPA_CVPR2022, ``blocks.py``,
``blocks_repvgg.py``) trains each block as ONE convolution whose kernel is generated from branch
parameters (``weight_gen``: an origin kxk, a 1x1 times a kxk average, a 1x1 times a frequency prior,
an identity-based 1x1 -> kxk, a 1x1, a depthwise-separable kxk, each scaled per channel by a row of
``vector``) and then one BatchNorm. Generating that kernel is the block's own forward arithmetic, so
the train form is exactly a Conv+BN, which is what this module turns it into, per block:

* ``OREPA`` (kxk) and ``OREPA_1x1``: fused now into ``reparam`` (the kernel with its BN folded, eps
  1e-5: OREPA's BatchNorms are built with the default). No branch set here holds OREPA's branches
  as parameters, so the train form loads into a deploy-form block (any branch set: all fuse into one conv).
* ``OREPA_3x3_RepVGG`` (the ``rbr_dense`` of OREPA's ``RepVGGBlock_OREPA``): its kernel becomes the
  ``conv.weight`` of a plain Conv+BN beside its ``bn``, so the block reads as the official RepVGG block
  it then is, in train form (further training trains that kernel, not OREPA's parameters).
* ``OREPA_LargeConv`` and weight-only OREPA blocks (no BatchNorm of their own) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OREPA_BN_EPS", "generate_orepa_kernels"]

OREPA_BN_EPS = 1e-5  # nn.BatchNorm2d's default: OREPA never sets another
_EXPAND_RATIO = 8  # OREPA's depthwise-separable branch widens the input 8 times (``expand_ratio = 8``)
# A parameter that says where an OREPA block is: ``<block>.weight_<kind>_origin``.
_ORIGIN = re.compile(r"^(?P<block>(?:.*\.)?)weight_(?P<kind>orepa|rbr|or1x1)_origin$")


def generate_orepa_kernels(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with every OREPA train-form block replaced by its exact Conv+BN or fused conv (see the module).

    Raises:
        ValueError: A block that cannot be read so (a weight-only block, OREPA_LargeConv), named.
    """
    state_dict = dict(state_dict)
    for key in [key for key in state_dict if _ORIGIN.match(key)]:
        match = _ORIGIN.match(key)
        block, kind = match["block"], match["kind"]
        params = {
            k[len(block) :]: v for k, v in state_dict.items() if k.startswith(block) and "." not in k[len(block) :]
        }
        if f"{block}bn.running_var" not in state_dict:
            raise ValueError(
                f"OREPA block {block.rstrip('.') or '(the root)'} has no BatchNorm of its own (weight_only, as inside "
                "OREPA_LargeConv): only OREPA, OREPA_1x1 and RepVGGBlock_OREPA blocks are read; load its deploy form"
            )
        kernel = _KERNELS[kind](params)
        for name in params:
            del state_dict[block + name]
        if kind == "rbr":  # RepVGGBlock_OREPA's rbr_dense: a Conv+BN, the official block's
            state_dict[f"{block}conv.weight"] = kernel
            continue
        bn = {name: state_dict.pop(f"{block}bn.{name}") for name in _BN_KEYS if f"{block}bn.{name}" in state_dict}
        weight, bias = _fold_bn(kernel, bn)
        state_dict[f"{block}reparam.weight"], state_dict[f"{block}reparam.bias"] = weight, bias
    return state_dict


_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _fold_bn(kernel: Tensor, bn: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    scale = bn["weight"].double() / torch.sqrt(bn["running_var"].double() + OREPA_BN_EPS)  # (O,)
    return kernel * scale.reshape(-1, 1, 1, 1), bn["bias"].double() - bn["running_mean"].double() * scale


def _wide(params: Mapping[str, Tensor], name: str) -> Tensor:
    return params[name].double()


def _scaled(kernel: Tensor, vector: Tensor, row: int) -> Tensor:
    return kernel * vector[row].reshape(-1, 1, 1, 1)  # one scale per output channel


def _one_by_one_then_kxk(first: Tensor, second: Tensor, groups: int) -> Tensor:
    """A grouped 1x1 (T, I/g, 1, 1) then a grouped kxk (O, T/g, k, k) as one kxk kernel (O, I/g, k, k)."""
    t, ig = first.shape[:2]
    o, tg, h, w = second.shape
    first = first.reshape(groups, t // groups, ig)
    second = second.reshape(groups, o // groups, tg, h, w)
    return torch.einsum("gti,gothw->goihw", first, second).reshape(o, ig, h, w)


def _depthwise_separable(dw: Tensor, pw: Tensor, in_channels: int, groups: int) -> Tensor:
    """OREPA's ``dwsc2full``: a depthwise kxk widening each input channel (dw), then a grouped 1x1 (pw), as one kernel.

    As OREPA reads ``pw`` (O, I*t/g): output row ``a * g + c`` of group ``c`` lands at ``c * O/g + a``.
    """
    t, _, h, w = dw.shape
    o = pw.shape[0]
    per_input, per_group = t // in_channels, in_channels // groups
    dw = dw.reshape(groups, per_group, per_input, h, w)  # (g, I/g, t/I, h, w)
    pw = pw.reshape(o // groups, groups, per_group, per_input)  # (O/g, g, I/g, t/I)
    return torch.einsum("cgthw,acgt->caghw", dw, pw).reshape(o, per_group, h, w)


def _orepa_kernel(params: Mapping[str, Tensor], prefix: str = "weight_orepa_") -> Tensor:
    """``OREPA.weight_gen`` (``OREPA_3x3_RepVGG.weight_gen`` with ``prefix="weight_rbr_"``)."""
    p = {name[len(prefix) :]: _wide(params, name) for name in params if name.startswith(prefix)}
    vector = _wide(params, "vector")
    origin = p["origin"]
    out_channels, in_per_group, k, _ = origin.shape
    in_channels = p["gconv_dw"].shape[0] // _EXPAND_RATIO
    groups = in_channels // in_per_group
    avg = p["avg_conv"] * p["avg_avg"]  # (O, I/g, 1, 1) * (k, k)
    prior = p["pfir_conv"] * p["prior"].unsqueeze(1)  # (O, I/g, 1, 1) * (O, 1, k, k)
    first = p["1x1_kxk_idconv1"] + _wide(params, "id_tensor") if "1x1_kxk_idconv1" in p else p["1x1_kxk_conv1"]
    seq = _one_by_one_then_kxk(first, p["1x1_kxk_conv2"], groups)
    # OREPA_3x3_RepVGG's separable branch is ungrouped (its dwsc2full takes no groups)
    gconv = _depthwise_separable(p["gconv_dw"], p["gconv_pw"], in_channels, 1 if prefix == "weight_rbr_" else groups)
    kernel = _scaled(origin, vector, 0) + _scaled(avg, vector, 1) + _scaled(prior, vector, 2) + _scaled(seq, vector, 3)
    if prefix == "weight_rbr_":  # OREPA_3x3_RepVGG: no 1x1 branch, the separable one on row 4
        return kernel + _scaled(gconv, vector, 4)
    one = F.pad(p["1x1"], [(k - 1) // 2] * 4) if "1x1" in p else torch.zeros_like(origin)
    return kernel + _scaled(one, vector, 4) + _scaled(gconv, vector, 5)


def _orepa_1x1_kernel(params: Mapping[str, Tensor]) -> Tensor:
    """``OREPA_1x1.weight_gen``: the origin 1x1 and a 1x1 -> 1x1 (one of the two an identity at init), scaled."""
    vector = _wide(params, "vector")
    first, second = _wide(params, "weight_or1x1_l2i_conv1"), _wide(params, "weight_or1x1_l2i_conv2")
    low_rank = torch.einsum("ti,ot->oi", first[:, :, 0, 0], second[:, :, 0, 0])[:, :, None, None]
    return _scaled(_wide(params, "weight_or1x1_origin"), vector, 0) + _scaled(low_rank, vector, 1)


_KERNELS = {
    "orepa": _orepa_kernel,
    "rbr": lambda params: _orepa_kernel(params, "weight_rbr_"),
    "or1x1": _orepa_1x1_kernel,
}
