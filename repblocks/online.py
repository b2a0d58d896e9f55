"""Online re-parameterization: the branches squeezed into one kernel on every training step.

OREPA (Hu, Zhang, Wei, Li, Lan, Zhou, Chen, Yang. "Online Convolutional Re-parameterization",
CVPR 2022, https://arxiv.org/abs/2204.00826; code: https://github.com/JUGGHM/OREPA_CVPR2022,
``blocks.py``, class ``OREPA``) removes the BatchNorm of every branch and gives each branch a
learnable per-output-channel scale instead (its ``vector``). Every branch is then linear in the
input, so the block computes the one kxk kernel they add up to from the branch parameters, on
every forward and differentiably, runs a single convolution and one BatchNorm. The gradients are
those of the branches computed one by one; the cost per step is that of a plain conv (plus the
kernel arithmetic, which is per weight, not per pixel), and the block keeps no feature map of its
own for the backward pass (:mod:`repblocks.online_step`: the conv output is recomputed there).

:class:`OnlineRepBlock` is that block with :class:`~repblocks.blocks.RepBlock`'s constructor and
surface. It has the branches RepBlock would build for the same arguments, every branch set of
:data:`~repblocks.blocks.BRANCH_SETS` (RepVGG, MobileOne, QARepVGG, ACNet, DBB), each in its online
form (:mod:`repblocks.online_branches`), and OREPA's own kinds besides (``prior_branch``,
``dw_sep_branch``; the set :data:`ONLINE_BRANCH_SETS` ``["orepa"]``). Its deploy form is RepBlock's
(``reparam``, the BatchNorm folded in, or kept with ``keep_post_bn``), so ``repblocks.switch_to_deploy``,
weight loading and the RepVGG L2 penalty treat it as any RepBlock.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblocks.blocks import BRANCH_SETS, DEFAULT_BN_EPS, ActFactory, RepBlock, _relu, resolve_branch_set
from repblocks.fusion import bn_scale_shift, fold_bn, wide_dtype
from repblocks.online_branches import (
    ScaledAvgPool,
    ScaledAvgSequence,
    ScaledConv,
    ScaledConvSequence,
    ScaledDepthwiseSeparable,
    ScaledIdentity,
    ScaledPriorConv,
)
from repblocks.online_step import conv_batch_norm, recomputes
from repblocks.sequences import IdentityConv1x1

__all__ = [
    "BLOCK_MODES",
    "ONLINE_BRANCH_MODULES",
    "ONLINE_BRANCH_SETS",
    "OnlineRepBlock",
    "online_block_from_conv",
    "resolve_block_mode",
    "resolve_online_branch_set",
]

# Branches only the online block has (OREPA's), beside RepBlock's BRANCH_MODULES: what its fusion replaces.
ONLINE_BRANCH_MODULES = ("conv_prior", "conv_dw_sep")
# Online-only branch keywords, and the layouts the 1x1 -> kxk and 1x1 -> average sequences may follow.
_ONLINE_ARGS = ("prior_branch", "dw_sep_branch", "layout")
LAYOUTS = ("dbb", "orepa")

# Branch sets only the online block has (RepBlock's BRANCH_SETS all have an online form too).
ONLINE_BRANCH_SETS: dict[str, dict] = {
    # OREPA's block (JUGGHM/OREPA_CVPR2022, blocks.py, OREPA): kxk, 1x1, 1x1 -> average pool, the
    # frequency prior, identity-based 1x1 -> kxk and the depthwise-separable branch; no identity.
    "orepa": dict(
        identity_branch=None,
        seq_conv_branch=True,
        seq_avg_branch=True,
        prior_branch=True,
        dw_sep_branch=True,
        layout="orepa",
    ),  # fmt: skip
}

# Branch kinds (keyword, value) the online block has no form for, and why: refused by name, never dropped.
_NOT_ONLINE = {
    "extra_kernels": "its dilated and smaller kernels have no scaled online form yet",
    "scale_branch=conv_bias": "a conv bias before the block's one BatchNorm would be removed by the batch mean in training",
}


def _check_online_kinds(branches: Mapping) -> None:
    """Raise a one-line ValueError for a branch kind the online block cannot train."""
    asked = {"extra_kernels": branches.get("extra_kernels") is not None}
    asked["scale_branch=conv_bias"] = branches.get("scale_branch") == "conv_bias"
    for kind, why in _NOT_ONLINE.items():
        if asked[kind]:
            raise ValueError(
                f"the online block cannot train branch kind {kind}: {why} (use RepBlock: block_mode='offline')"
            )


# OREPA's initial scales (its `vector` rows); the other layout starts every scale at 1, as an offline block's BNs.
_OREPA_SCALES = dict(kxk=0.25, avg=0.25, prior=0.0, seq_conv=0.5, one=1.0, dw_sep=0.5)


def resolve_online_branch_set(branches: str | Mapping) -> dict:
    """The online block's keywords for a branch-set name (RepBlock's or :data:`ONLINE_BRANCH_SETS`) or a dict.

    Raises:
        ValueError: An unknown name (the known ones listed), or keys or values no branch takes.
    """
    if isinstance(branches, str):
        if branches in ONLINE_BRANCH_SETS:
            return dict(ONLINE_BRANCH_SETS[branches])
        if branches not in BRANCH_SETS:
            known = ", ".join([*BRANCH_SETS, *ONLINE_BRANCH_SETS])
            raise ValueError(f"unknown branch set {branches!r}; known branch sets: {known}")
        resolved = resolve_branch_set(branches)
        _check_online_kinds(resolved)
        return resolved
    if not isinstance(branches, Mapping):
        raise ValueError(f"a branch set is a name or a dict, got {branches!r}")
    online = {key: value for key, value in branches.items() if key in _ONLINE_ARGS}
    _check_online_values(**online)
    resolved = resolve_branch_set({k: v for k, v in branches.items() if k not in _ONLINE_ARGS})
    _check_online_kinds(resolved)
    return {**resolved, **online}


def _check_online_values(prior_branch: bool = False, dw_sep_branch: bool = False, layout: str = "dbb") -> None:
    for name, value in (("prior_branch", prior_branch), ("dw_sep_branch", dw_sep_branch)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


class OnlineRepBlock(RepBlock):
    """A RepBlock trained in OREPA's online form: scaled linear branches fused into one conv every step, one BN.

    Takes RepBlock's arguments (so a zoo family builds it in place of RepBlock) and builds the
    branches RepBlock would, each without BatchNorm and with a per-output-channel scale
    (:mod:`repblocks.online_branches`); the branch kinds ``"bn"``/``"conv"`` and ``"bn"``/``"plain"``
    mean the same here. The block ends in ``post_bn`` whatever ``post_bn`` says. Train-form keys:
    RepBlock's branch names with the parameters of :mod:`repblocks.online_branches` (``conv_kxk.weight``,
    ``conv_kxk.scale``, ``conv_1x1_kxk.weight_1x1``, ``identity.scale`` ...), ``post_bn.*``; deploy
    form: RepBlock's.

    Args:
        in_channels, out_channels, stride, groups, kernel_size, num_conv_branches, scale_branch,
            identity_branch, avg_pool_branch, asym_branches, seq_conv_branch, seq_avg_branch: As RepBlock's
            (but ``extra_kernels`` and ``scale_branch="conv_bias"``, refused: no online form).
        prior_branch: OREPA's frequency-prior branch ``conv_prior`` (:class:`~repblocks.online_branches.ScaledPriorConv`).
        dw_sep_branch: OREPA's depthwise-separable branch ``conv_dw_sep``.
        layout: ``"dbb"``: the sequences as DBB builds them (RepBlock's), every scale starting at 1;
            ``"orepa"``: as OREPA does (the 1x1 -> kxk identity-based, ``2 * in_channels`` wide when
            ``groups > 4``; the average sequence always with its 1x1 conv; OREPA's initial scales).
        post_bn: Accepted for RepBlock's signature; the online block always ends in its BatchNorm.
        keep_post_bn: Keep ``post_bn`` unfolded in the deploy form (quantization-aware training).
        use_se, act, bn_eps, deploy: As RepBlock's.

    Set ``block.recompute = False`` on a block (or the class) to keep the conv output for backward:
    a faster step (no second conv), one more feature map held per block.
    """

    # Training recomputes the conv output in backward instead of keeping it (repblocks.online_step): one map
    # less per block for about a third more time per step on the CPU. False keeps it: faster, more memory.
    recompute: bool = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        kernel_size: int = 3,
        num_conv_branches: int | None = None,
        extra_kernels: str | tuple[tuple[int, int], ...] | None = None,
        scale_branch: str | None = "bn",
        identity_branch: str | None = "bn",
        avg_pool_branch: bool = False,
        asym_branches: bool = False,
        seq_conv_branch: bool = False,
        seq_avg_branch: bool = False,
        prior_branch: bool = False,
        dw_sep_branch: bool = False,
        layout: str = "dbb",
        post_bn: bool = True,
        keep_post_bn: bool = False,
        use_se: bool = False,
        act: str | ActFactory | None = _relu,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
    ):
        _check_online_values(prior_branch, dw_sep_branch, layout)
        _check_online_kinds(dict(extra_kernels=extra_kernels, scale_branch=scale_branch))
        branch_kwargs = dict(
            num_conv_branches=num_conv_branches,
            scale_branch=scale_branch,
            identity_branch=identity_branch,
            avg_pool_branch=avg_pool_branch,
            asym_branches=asym_branches,
            seq_conv_branch=seq_conv_branch,
            seq_avg_branch=seq_avg_branch,
        )
        geometry = dict(stride=stride, groups=groups, kernel_size=kernel_size)
        # RepBlock checks the arguments and builds what both forms share (SE, activation, post_bn);
        # built in deploy form, it holds no branch to throw away, only the fused conv.
        super().__init__(
            in_channels,
            out_channels,
            **geometry,
            **branch_kwargs,
            post_bn=True,
            keep_post_bn=True,
            use_se=use_se,
            act=act,
            bn_eps=bn_eps,
            deploy=True,
        )
        online = dict(prior_branch=prior_branch, dw_sep_branch=dw_sep_branch, layout=layout)
        # Only what differs from the defaults, so a RepVGG-set block records what it always did.
        self.branch_config.update({k: v for k, v in online.items() if v != ("dbb" if k == "layout" else False)})
        self.keep_post_bn = keep_post_bn
        self.conv_prior = self.conv_dw_sep = None
        if deploy:
            if not keep_post_bn:
                self.post_bn = None
            return
        self.reparam = None
        with torch.device("meta"):  # which branches RepBlock builds for these arguments, without memory
            offline = RepBlock(in_channels, out_channels, **geometry, **branch_kwargs, act=None)
        self._build_branches(offline, online)

    def _build_branches(self, offline: RepBlock, online: Mapping) -> None:
        """Each of ``offline``'s branches in its online form under the same name; then OREPA's own."""
        orepa = online["layout"] == "orepa"
        scales = _OREPA_SCALES if orepa else dict.fromkeys(_OREPA_SCALES, 1.0)
        shape = dict(stride=self.stride, groups=self.groups)
        make = dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size)

        def conv(sides: tuple[int, int], scale: float) -> ScaledConv:
            return ScaledConv(**make, shape=sides, **shape, scale=scale)

        size = self.kernel_size
        if isinstance(offline.conv_kxk, nn.ModuleList):
            self.conv_kxk = nn.ModuleList(conv((size, size), scales["kxk"]) for _ in offline.conv_kxk)
        else:
            self.conv_kxk = conv((size, size), scales["kxk"])
        if offline.conv_1x1 is not None:
            self.conv_1x1 = conv((1, 1), scales["one"])
        if offline.conv_1xk is not None:
            self.conv_1xk, self.conv_kx1 = conv((1, size), 1.0), conv((size, 1), 1.0)
        if offline.identity is not None:
            self.identity = ScaledIdentity(**make, stride=1, groups=self.groups, scale=1.0)
        if offline.avg_pool is not None:
            self.avg_pool = ScaledAvgPool(**make, stride=1, groups=self.groups, scale=1.0)
        if offline.conv_1x1_kxk is not None:
            first = offline.conv_1x1_kxk.conv1
            middle, identity_based = first.out_channels, isinstance(first, IdentityConv1x1)
            if orepa:  # OREPA: internal_channels_1x1_3x3 = in_channels if groups <= 4 else 2 * in_channels
                middle, identity_based = (self.in_channels if self.groups <= 4 else 2 * self.in_channels), True
            self.conv_1x1_kxk = ScaledConvSequence(
                **make, middle=middle, identity_based=identity_based, **shape, scale=scales["seq_conv"]
            )
        if offline.conv_1x1_avg is not None:
            with_conv = orepa or offline.conv_1x1_avg.conv is not None
            self.conv_1x1_avg = ScaledAvgSequence(**make, with_conv=with_conv, **shape, scale=scales["avg"])
        if online["prior_branch"]:
            self.conv_prior = ScaledPriorConv(**make, **shape, scale=scales["prior"])
        if online["dw_sep_branch"]:
            self.conv_dw_sep = ScaledDepthwiseSeparable(**make, **shape, scale=scales["dw_sep"])

    def branches(self) -> list[nn.Module]:
        """The train-form branches, RepBlock's then OREPA's own (empty in deploy form)."""
        extra = [branch for branch in (self.conv_prior, self.conv_dw_sep) if branch is not None]
        return [*super().branches(), *extra]

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam is not None:
            return super().forward(x)
        kernel = self.online_kernel(self.post_bn.weight.dtype)
        geometry = dict(stride=self.stride, padding=self.kernel_size // 2, groups=self.groups)
        if self.recompute and recomputes(
            x, self.post_bn
        ):  # training: the conv output is not kept for backward, but recomputed
            out = conv_batch_norm(x, kernel, self.post_bn, **geometry)
        else:
            out = self.post_bn(F.conv2d(x, kernel, None, geometry["stride"], geometry["padding"], 1, self.groups))
        return self.act(self.se(out))

    def forward_branches(self, x: Tensor) -> Tensor:
        """The block computed branch by branch, each as the stages it stands for: what :meth:`forward` equals.

        For tests and for reading; a training step through it costs what the offline block costs.
        """
        if self.reparam is not None:
            raise RuntimeError("this block is in deploy form: it has no branches")
        first, *rest = self.branches()
        out = first(x)
        for branch in rest:
            out = out + branch(x)
        return self.act(self.se(self.post_bn(out)))

    def online_kernel(self, dtype: torch.dtype) -> Tensor:
        """The kxk kernel of the branch sum (before ``post_bn``), differentiable, computed in ``dtype``.

        The forward pass takes it in the parameters' dtype; fusion in float64, rounded once.
        """
        if self.reparam is not None:
            raise RuntimeError("this block is in deploy form: its kernel is reparam.weight")
        first, *rest = self.branches()
        kernel = first.kernel(dtype)  # (C_out, C_in / groups, k, k); every sum is out of place, for autograd
        for branch in rest:
            kernel = kernel + branch.kernel(dtype)
        return kernel

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv equal to the block before SE and activation, in eval mode.

        Differentiable; formed in float64 and returned in the parameters' dtype, as RepBlock's.
        """
        if self.reparam is not None:
            return super().get_equivalent_kernel_bias()
        dtype = self.post_bn.weight.dtype
        kernel, bias = fold_bn(self.online_kernel(wide_dtype(self.post_bn.weight.device)), self.post_bn)
        return kernel.to(dtype), bias.to(dtype)

    def kernel_parameters(self) -> list[nn.Parameter]:
        """The parameters that scale :meth:`get_equivalent_kernel_bias`'s kernel: kernels, branch scales, BN weight."""
        if self.reparam is not None:
            return super().kernel_parameters()
        params = [param for branch in self.branches() for param in branch.parameters()]
        return [*params, self.post_bn.weight]

    @torch.no_grad()
    def switch_to_deploy(self, keep_post_bn: bool | None = None) -> OnlineRepBlock:
        """Replace the branches by one fused conv with a bias, in place (RepBlock's deploy form). Idempotent.

        Args:
            keep_post_bn: Keep ``post_bn`` as its own module instead of folding it; by default the
                block's own ``keep_post_bn``.
        """
        if self.reparam is not None:
            super().switch_to_deploy(keep_post_bn)
            return self
        keep = self.keep_post_bn if keep_post_bn is None else keep_post_bn
        first = self.branches()[0].weight
        kernel = self.online_kernel(wide_dtype(first.device))
        if keep:
            bias = kernel.new_zeros(self.out_channels)
        else:
            scale, bias = bn_scale_shift(self.post_bn)
            kernel = kernel * scale.reshape(-1, 1, 1, 1)
        kernel = kernel.to(first.dtype)
        if first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
            kernel = kernel.contiguous(memory_format=torch.channels_last)  # a channels_last model stays so
        fused = self._fused_conv(device="meta")  # no random init of weights about to be replaced
        fused.weight = nn.Parameter(kernel, requires_grad=first.requires_grad)
        fused.bias = nn.Parameter(bias.to(first.dtype), requires_grad=first.requires_grad)
        self.reparam = fused
        self.conv_kxk = self.conv_1x1 = self.identity = self.avg_pool = None
        self.conv_1xk = self.conv_kx1 = self.conv_1x1_kxk = self.conv_1x1_avg = None
        self.conv_prior = self.conv_dw_sep = None
        if not keep:
            self.post_bn = None
        return self

    def extra_repr(self) -> str:
        return f"online, {super().extra_repr()}"


# How a zoo family builds its blocks: ``create_model(name, block_mode="online")``.
BLOCK_MODES: dict[str, type[RepBlock]] = {
    "offline": RepBlock,  # every branch its own Conv+BN, summed (RepVGG, DBB, ACNet)
    "online": OnlineRepBlock,  # scaled branches fused into one conv every step, one BN (OREPA)
}


def resolve_block_mode(block_mode: str) -> type[RepBlock]:
    """The block class of a mode name in :data:`BLOCK_MODES`.

    Raises:
        ValueError: An unknown name; the message lists the known ones.
    """
    if block_mode not in BLOCK_MODES:
        raise ValueError(f"unknown block_mode {block_mode!r}; known block modes: {', '.join(BLOCK_MODES)}")
    return BLOCK_MODES[block_mode]


@torch.no_grad()
def online_block_from_conv(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None,
    branches: Mapping[str, object] | None = None,
    *,
    block_class: type[OnlineRepBlock] = OnlineRepBlock,
    **block_kwargs: object,
) -> OnlineRepBlock:
    """An online block computing what ``bn(conv(x))`` computes, with new branches that start at zero.

    The original kernel goes into the kxk branch at scale 1, every other branch starts at scale 0
    (so its kernel still trains once its scale moves), and ``bn`` becomes the block's ``post_bn``
    (its statistics and affine parameters copied): in eval mode the block equals ``bn(conv(x))``
    exactly, and in training mode too when ``bn`` is given, as the kernel it convolves with is the
    original one. A conv bias is taken into ``post_bn``'s running mean, where in training mode the batch mean
    removes it anyway. The block has no activation, as the pair it replaces.

    Args:
        conv: A square, odd-sized ``nn.Conv2d`` with padding ``k // 2``, dilation 1, zero padding.
        bn: The BatchNorm that follows it, or None: the block's ``post_bn`` then starts as the identity
            in eval mode (running mean 0, variance 1, eps 0; the conv's bias goes into the mean). In
            training mode it normalizes, as every branch's BN of an offline block would.
        branches: The block's branch keywords (:func:`resolve_online_branch_set`: any branch set's, or
            ``{}`` for the kxk branch alone).
        block_class, block_kwargs: The class built and its own further keywords (repblocks.expand's
            subclass, which says what the block replaced).

    Raises:
        ValueError: A conv the block cannot stand for, or keywords that name no branch.
    """
    branches = resolve_online_branch_set(dict(branches or {}))
    kernel_size = conv.kernel_size[0]
    fits = (
        conv.kernel_size == (kernel_size, kernel_size)
        and kernel_size % 2 == 1
        and conv.padding == (kernel_size // 2,) * 2
        and conv.dilation == (1, 1)
        and conv.stride[0] == conv.stride[1]
        and conv.padding_mode == "zeros"
    )
    if not fits:
        raise ValueError(
            f"an online block stands only for a square odd conv padded by k // 2 with dilation 1, got {conv}"
        )
    block = block_class(
        conv.in_channels,
        conv.out_channels,
        stride=conv.stride[0],
        groups=conv.groups,
        kernel_size=kernel_size,
        act=None,
        **branches,
        **block_kwargs,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    first = block.conv_kxk[0] if isinstance(block.conv_kxk, nn.ModuleList) else block.conv_kxk
    first.weight.copy_(conv.weight)
    for branch in block.branches():
        branch.scale.fill_(1.0 if branch is first else 0.0)
    post_bn = block.post_bn
    if bn is not None:
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(f"cannot take over {type(bn).__name__}: it has no running statistics")
        post_bn.running_mean.copy_(bn.running_mean)
        post_bn.running_var.copy_(bn.running_var)
        if getattr(bn, "weight", None) is not None:
            post_bn.weight.copy_(bn.weight)
        if getattr(bn, "bias", None) is not None:
            post_bn.bias.copy_(bn.bias)
        post_bn.eps = bn.eps
        post_bn.momentum = getattr(bn, "momentum", post_bn.momentum)  # torchvision's FrozenBatchNorm2d has none
    else:
        post_bn.eps = 0.0  # the identity in eval mode; a plain conv has no batch statistics to keep
    if conv.bias is not None:
        post_bn.running_mean.sub_(conv.bias)
    return block
