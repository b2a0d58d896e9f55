"""Building blocks: the re-parameterizable ``RepBlock`` and the small modules it is made of.

``RepBlock`` is the RepVGG block (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again",
CVPR 2021, https://arxiv.org/abs/2101.03697): during training it sums a kxk Conv+BN, a 1x1
Conv+BN and, when shapes allow, an identity BN; for deployment the three collapse, exactly, into
one kxk convolution with a bias. It takes any ``in/out_channels``, ``stride`` and ``groups``
(grouped and depthwise included), so it drops into any backbone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from repblocks.fusion import equivalent_kernel_bias, fused_kernel_bias

__all__ = ["ACTIVATIONS", "ConvBN", "RepBlock", "SqueezeExcite", "resolve_act"]

ActFactory = Callable[[], nn.Module]


def _relu() -> nn.Module:
    # In place is safe: the block's sum (or fused conv output) is a fresh tensor nobody else holds.
    return nn.ReLU(inplace=True)


# Activations by name, so a config can say `act: gelu` (names as timm spells them).
ACTIVATIONS: dict[str, ActFactory] = {
    "relu": _relu,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "prelu": nn.PReLU,
    "identity": nn.Identity,
}


def resolve_act(act: str | ActFactory | None) -> ActFactory | None:
    """An activation factory from a name in :data:`ACTIVATIONS`, a factory (``nn.GELU``), or None (no activation).

    Raises:
        ValueError: An unknown name (the message lists the known ones), or a module instance
            instead of a factory (every block needs its own, or a PReLU would share its weights).
    """
    if act is None:
        return None
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known activations: {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[act]
    if isinstance(act, nn.Module) or not callable(act):
        raise ValueError(
            f"act must be an activation name ({', '.join(ACTIVATIONS)}) or a factory such as nn.GELU, got {act!r}"
        )
    return act


def check_int(value: object, name: str, *, minimum: int) -> int:
    """``value`` if it is an int of at least ``minimum``; otherwise a one-line ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class ConvBN(nn.Sequential):
    """A bias-free convolution followed by BatchNorm, padded to keep the spatial size at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, groups: int = 1):
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in RepVGG-D2se: global pool, reduce, ReLU, expand, sigmoid gate.

    Not re-parameterizable (it depends on the input), so it survives deployment unchanged.
    """

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        scale = self.up(torch.relu(self.down(scale)))
        return x * torch.sigmoid(scale)


class RepBlock(nn.Module):
    """RepVGG block: kxk Conv+BN + 1x1 Conv+BN (+ identity BN), then optional SE and activation.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Convolution stride; the identity branch exists only at stride 1 with
            ``in_channels == out_channels``.
        groups: Convolution groups (``groups == in_channels`` is depthwise).
        kernel_size: Odd size of the main kernel (3 in RepVGG).
        use_se: Add squeeze-excitation after the branch sum (RepVGG-D2se).
        act: Activation: a name from :data:`ACTIVATIONS` (``"gelu"``), a factory (``nn.GELU``), or None for none.
        deploy: Build only the fused convolution (for loading deploy-form weights).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        kernel_size: int = 3,
        use_se: bool = False,
        act: str | ActFactory | None = _relu,
        deploy: bool = False,
    ):
        super().__init__()
        for arg, value in dict(
            in_channels=in_channels, out_channels=out_channels, stride=stride, groups=groups
        ).items():
            check_int(value, arg, minimum=1)
        if check_int(kernel_size, "kernel_size", minimum=1) % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the 1x1 branch can be centred, got {kernel_size}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.kernel_size = kernel_size
        self.has_identity = in_channels == out_channels and stride == 1

        if deploy:
            self.conv_kxk = self.conv_1x1 = self.identity = None
            self.reparam = self._fused_conv()
        else:
            self.conv_kxk = ConvBN(in_channels, out_channels, kernel_size, stride=stride, groups=groups)
            self.conv_1x1 = ConvBN(in_channels, out_channels, 1, stride=stride, groups=groups)
            self.identity = nn.BatchNorm2d(in_channels) if self.has_identity else None
            self.reparam = None
        self.se = SqueezeExcite(out_channels) if use_se else nn.Identity()
        act = resolve_act(act)
        self.act = act() if act is not None else nn.Identity()

    @property
    def deploy(self) -> bool:
        """True once the branches have been fused into ``reparam``."""
        return self.reparam is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam is not None:
            out = self.reparam(x)
        else:
            out = self.conv_kxk(x) + self.conv_1x1(x)
            if self.identity is not None:
                out += self.identity(x)
        return self.act(self.se(out))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv equal to the branch sum in eval mode.

        Differentiable (the RepVGG L2 penalty is taken on it) and includes the identity branch.
        In deploy form it returns the fused convolution's own parameters.
        """
        if self.reparam is not None:
            return self.reparam.weight, self.reparam.bias
        return equivalent_kernel_bias(self._branches(), self.identity, kernel_size=self.kernel_size)

    def _branches(self) -> list[tuple[Tensor, nn.Module]]:
        return [(self.conv_kxk.conv.weight, self.conv_kxk.bn), (self.conv_1x1.conv.weight, self.conv_1x1.bn)]

    @torch.no_grad()
    def switch_to_deploy(self) -> RepBlock:
        """Replace the branches by one fused conv, in place. Calling it again does nothing."""
        if self.reparam is not None:
            return self
        kernel, bias = fused_kernel_bias(self._branches(), self.identity, kernel_size=self.kernel_size)
        weight = self.conv_kxk.conv.weight
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            kernel = kernel.contiguous(memory_format=torch.channels_last)  # a channels_last model stays so
        requires_grad = weight.requires_grad
        fused = self._fused_conv(device="meta")  # no random init of weights about to be replaced
        fused.weight = nn.Parameter(kernel, requires_grad=requires_grad)
        fused.bias = nn.Parameter(bias, requires_grad=requires_grad)
        self.reparam = fused
        self.conv_kxk = self.conv_1x1 = self.identity = None
        return self

    def _fused_conv(self, device: str | None = None) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.kernel_size // 2,
            groups=self.groups,
            bias=True,
            device=device,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, deploy={self.deploy}"
        )
