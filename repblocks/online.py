"""Online re-parameterization: the branches squeezed into one kernel on every training step.

OREPA (Hu, Zhang, Wei, Li, Lan, Zhou, Chen, Yang. "Online Convolutional Re-parameterization",
CVPR 2022, https://arxiv.org/abs/2204.00826; code: https://github.com/JUGGHM/OREPA_CVPR2022,
``blocks.py``, class ``OREPA``) removes the BatchNorm of every branch and gives each branch a
learnable per-output-channel scale instead (its ``vector``). Every branch is then linear in the
input, so the block computes the one kxk kernel they add up to from the branch parameters, on
every forward and differentiably, runs a single convolution and one BatchNorm. The gradients are
those of the branches computed one by one; the cost per step is that of a plain conv (plus the
kernel arithmetic, which is per weight, not per pixel), and only one feature map is kept for the
backward pass instead of one per branch.

:class:`OnlineRepBlock` is that block with :class:`~repblocks.blocks.RepBlock`'s constructor and
surface, and the branches of the zoo's block sets: kxk (one or ``num_conv_branches``), 1x1,
identity and kxk average pool, each times its scale, then the BatchNorm ``post_bn``. Its deploy
form is RepBlock's (``reparam``, the BatchNorm folded in, or kept with ``keep_post_bn``), so
``repblocks.switch_to_deploy``, weight loading and the RepVGG L2 penalty treat it as any RepBlock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblocks.blocks import DEFAULT_BN_EPS, ActFactory, RepBlock, _relu
from repblocks.fusion import bn_scale_shift, fold_bn, wide_dtype

__all__ = [
    "BLOCK_MODES",
    "ChannelScale",
    "OnlineRepBlock",
    "ScaledConv",
    "online_block_from_conv",
    "resolve_block_mode",
]


class ScaledConv(nn.Module):
    """A bias-free conv kernel times a learnable per-output-channel scale: a branch of the online block.

    The scale is what OREPA puts where the branch's BatchNorm was: without it the kxk and 1x1
    kernels would only ever be trained as their sum, one kernel, whatever their number.
    """

    def __init__(self, out_channels: int, in_per_group: int, kernel_size: int, *, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_per_group, kernel_size, kernel_size))
        self.scale = nn.Parameter(torch.full((out_channels,), float(scale)))
        # nn.Conv2d's own initialization, so the online block starts from the kernels the offline one does.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def kernel(self, dtype: torch.dtype) -> Tensor:
        """The scaled kernel ``(C_out, C_in / groups, k, k)`` in ``dtype``."""
        return self.weight.to(dtype) * self.scale.to(dtype).reshape(-1, 1, 1, 1)


class ChannelScale(nn.Module):
    """A learnable per-channel scale of a fixed map (the identity, an average pool)."""

    def __init__(self, channels: int, *, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), float(scale)))


def _OFFLINE_ONLY(asym: bool, seq_conv: bool, seq_avg: bool) -> list[tuple[str, bool]]:  # noqa: N802
    return [("asym_branches", asym), ("seq_conv_branch", seq_conv), ("seq_avg_branch", seq_avg)]


class OnlineRepBlock(RepBlock):
    """A RepBlock trained in OREPA's online form: scaled linear branches fused into one conv every step, one BN.

    Takes RepBlock's arguments (so a zoo family builds it in place of RepBlock); the branch kinds
    ``"bn"``/``"conv"`` and ``"bn"``/``"plain"`` mean the same here, since no branch has a
    BatchNorm of its own: every branch gets a per-channel scale, and the block ends in
    ``post_bn`` whatever ``post_bn`` says. Train-form keys: ``conv_kxk.{weight,scale}`` (or
    ``conv_kxk.<i>.*``), ``conv_1x1.{weight,scale}``, ``identity.scale``, ``avg_pool.scale``,
    ``post_bn.*``; deploy form: RepBlock's.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Convolution stride; identity and average pool exist only where shapes allow.
        groups: Convolution groups (depthwise included).
        kernel_size: Odd size of the main kernel.
        num_conv_branches: None for one kxk branch ``conv_kxk``; n for a list of n.
        scale_branch: The 1x1 branch (``"bn"`` or ``"conv"``: the same here), None for none.
        identity_branch: The identity branch (``"bn"`` or ``"plain"``: the same here), None for none.
        avg_pool_branch: Add a kxk stride-1 average pool of the input, where shapes allow.
        asym_branches, seq_conv_branch, seq_avg_branch: Accepted for RepBlock's signature; only False
            (ACNet's and DBB's branches have no online form here: a ValueError says so).
        post_bn: Accepted for RepBlock's signature; the online block always ends in its BatchNorm.
        keep_post_bn: Keep ``post_bn`` unfolded in the deploy form (quantization-aware training).
        use_se: Squeeze-excitation after the BatchNorm.
        act: Activation (see :class:`RepBlock`).
        bn_eps: The eps of the block's BatchNorm (see :class:`RepBlock`).
        deploy: Build only the fused convolution (RepBlock's deploy form).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        kernel_size: int = 3,
        num_conv_branches: int | None = None,
        scale_branch: str | None = "bn",
        identity_branch: str | None = "bn",
        avg_pool_branch: bool = False,
        asym_branches: bool = False,
        seq_conv_branch: bool = False,
        seq_avg_branch: bool = False,
        post_bn: bool = True,
        keep_post_bn: bool = False,
        use_se: bool = False,
        act: str | ActFactory | None = _relu,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
    ):
        unsupported = [name for name, on in _OFFLINE_ONLY(asym_branches, seq_conv_branch, seq_avg_branch) if on]
        if unsupported:
            raise ValueError(
                f"block_mode='online' has no form for {', '.join(unsupported)} (ACNet's and DBB's branches); "
                "it takes the kxk, 1x1, identity and average-pool branches: train those branch sets offline"
            )
        # RepBlock checks the arguments and builds what both forms share (SE, activation, post_bn);
        # built in deploy form, it holds no branch to throw away, only the fused conv.
        super().__init__(
            in_channels,
            out_channels,
            stride=stride,
            groups=groups,
            kernel_size=kernel_size,
            num_conv_branches=num_conv_branches,
            scale_branch=scale_branch,
            identity_branch=identity_branch,
            avg_pool_branch=avg_pool_branch,
            post_bn=True,
            keep_post_bn=True,
            use_se=use_se,
            act=act,
            bn_eps=bn_eps,
            deploy=True,
        )
        self.keep_post_bn = keep_post_bn
        if deploy:
            if not keep_post_bn:
                self.post_bn = None
            return
        self.reparam = None
        in_per_group = in_channels // groups
        conv = ScaledConv(out_channels, in_per_group, kernel_size)
        if num_conv_branches is None:
            self.conv_kxk = conv
        else:
            others = (ScaledConv(out_channels, in_per_group, kernel_size) for _ in range(num_conv_branches - 1))
            self.conv_kxk = nn.ModuleList([conv, *others])
        if scale_branch is not None:
            self.conv_1x1 = ScaledConv(out_channels, in_per_group, 1)
        if self.has_identity:
            self.identity = ChannelScale(out_channels)
        if avg_pool_branch and in_channels == out_channels and stride == 1:
            self.avg_pool = ChannelScale(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam is not None:
            return super().forward(x)
        kernel = self.online_kernel(self.post_bn.weight.dtype)
        out = F.conv2d(x, kernel, None, self.stride, self.kernel_size // 2, 1, self.groups)
        return self.act(self.se(self.post_bn(out)))

    def online_kernel(self, dtype: torch.dtype) -> Tensor:
        """The kxk kernel of the branch sum (before ``post_bn``), differentiable, computed in ``dtype``.

        The forward pass takes it in the parameters' dtype; fusion in float64, rounded once.
        """
        if self.reparam is not None:
            raise RuntimeError("this block is in deploy form: its kernel is reparam.weight")
        convs = list(self.conv_kxk) if isinstance(self.conv_kxk, nn.ModuleList) else [self.conv_kxk]
        kernel = convs[0].kernel(dtype)  # (C_out, C_in / groups, k, k); every step below is out of place, for autograd
        for conv in convs[1:]:
            kernel = kernel + conv.kernel(dtype)
        centre = self.kernel_size // 2
        if self.conv_1x1 is not None:
            kernel = kernel + F.pad(self.conv_1x1.kernel(dtype), [centre] * 4)
        # The identity and the pool read each output channel's own input channel: c % (inputs per group).
        out_idx = torch.arange(self.out_channels, device=kernel.device)
        in_idx = out_idx % kernel.shape[1]
        if self.identity is not None:
            centre_idx = torch.full_like(out_idx, centre)
            kernel = kernel.index_put(
                (out_idx, in_idx, centre_idx, centre_idx), self.identity.scale.to(dtype), accumulate=True
            )
        if self.avg_pool is not None:
            taps = (self.avg_pool.scale.to(dtype) / self.kernel_size**2).reshape(-1, 1, 1)  # (C_out, 1, 1)
            taps = taps.expand(-1, self.kernel_size, self.kernel_size)
            kernel = kernel.index_put((out_idx, in_idx), taps, accumulate=True)
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
        branches: RepBlock keyword arguments saying which branches to add (a branch set such as
            RepVGG's, ``{}``); the online block supports ``num_conv_branches``, ``scale_branch``,
            ``identity_branch``, ``avg_pool_branch`` and ``post_bn``.
        block_class, block_kwargs: The class built and its own further keywords (repblocks.expand's
            subclass, which says what the block replaced).

    Raises:
        ValueError: A conv the block cannot stand for, or a branch kind it does not support.
    """
    branches = dict(branches or {})
    supported = {"num_conv_branches", "scale_branch", "identity_branch", "avg_pool_branch", "post_bn"}
    unsupported = sorted(set(branches) - supported)
    if unsupported:
        raise ValueError(
            f"the online block does not support {', '.join(unsupported)}; it takes {', '.join(sorted(supported))}"
        )
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
