"""The branches of the online block: each a linear map times a learnable per-output-channel scale.

OREPA (Hu et al., CVPR 2022, https://arxiv.org/abs/2204.00826; JUGGHM/OREPA_CVPR2022, ``blocks.py``,
class ``OREPA``) drops every BatchNorm inside the branches and keeps one learnable scale per output
channel where each branch's last BN was (its ``vector`` row). A branch is then linear in the input,
so it is one kxk kernel, which :meth:`kernel` computes from the branch's parameters, differentiably:
the online block convolves once with the sum of these kernels.

Every branch also computes itself as what it stands for, stage by stage (:meth:`forward`), so that
the claim "one conv with the summed kernel trains as the branches would" is a test, not an
assumption. The kinds:

* :class:`ScaledConv`: a kxk, 1x1, 1xk or kx1 conv (RepVGG, MobileOne, ACNet; OREPA's origin and 1x1);
* :class:`ScaledIdentity`, :class:`ScaledAvgPool`: the identity and a kxk average pool of the input;
* :class:`ScaledConvSequence`: a 1x1 conv then a kxk conv, the 1x1 identity-based where its widths
  allow (DBB's ``dbb_1x1_kxk``, OREPA's ``weight_orepa_1x1_kxk_*``);
* :class:`ScaledAvgSequence`: a 1x1 conv then a kxk average pool (DBB's ``dbb_avg``, OREPA's
  ``weight_orepa_avg_*``);
* :class:`ScaledPriorConv`: a 1x1 conv whose every output channel is then filtered by a fixed
  cosine (frequency) prior (OREPA's ``weight_orepa_pfir_conv`` and ``weight_orepa_prior``);
* :class:`ScaledDepthwiseSeparable`: a depthwise kxk conv to 8x the input channels, then a 1x1 conv
  (OREPA's ``weight_orepa_gconv_dw`` and ``_pw``). OREPA's own fusion (``dwsc2full``) reads the 1x1's
  rows in another order when ``groups > 1`` (row ``o * groups + g`` for output ``g * out / groups + o``):
  the same family of functions, the rows permuted; this class is the grouped conv as written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DW_SEP_EXPANSION",
    "ScaledAvgPool",
    "ScaledAvgSequence",
    "ScaledBranch",
    "ScaledConv",
    "ScaledConvSequence",
    "ScaledDepthwiseSeparable",
    "ScaledIdentity",
    "ScaledPriorConv",
    "frequency_prior",
]

DW_SEP_EXPANSION = 8  # OREPA's expand_ratio: depthwise outputs per input channel


class ScaledBranch(nn.Module):
    """A branch of the online block: its kxk kernel times ``scale``, and its forward as the stages it stands for.

    Args:
        in_channels, out_channels, kernel_size, stride, groups: The block's geometry (its kernel is
            ``(out_channels, in_channels / groups, kernel_size, kernel_size)``).
        scale: The initial value of every output channel's scale.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, groups: int, scale: float
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.scale = nn.Parameter(torch.full((out_channels,), float(scale)))

    def kernel(self, dtype: torch.dtype) -> Tensor:
        """The branch's kxk kernel ``(C_out, C_in / groups, k, k)``, scale included, computed in ``dtype``."""
        return self.unscaled_kernel(dtype) * self.scale.to(dtype).reshape(-1, 1, 1, 1)

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The branch computed stage by stage (what the kernel stands for), scaled: ``(B, C_out, H', W')``."""
        return self.stages(x) * self.scale.reshape(1, -1, 1, 1)

    def stages(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _own_channel_kernel(self, taps: Tensor) -> Tensor:
        """A kxk kernel where output channel c reads only input channel ``c % (C_in / groups)``, with ``taps`` (k, k)."""
        in_per_group = self.in_channels // self.groups
        kernel = taps.new_zeros(self.out_channels, in_per_group, self.kernel_size, self.kernel_size)
        channels = torch.arange(self.out_channels, device=taps.device)
        kernel[channels, channels % in_per_group] = taps
        return kernel

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


def _kaiming(weight: nn.Parameter) -> nn.Parameter:
    # nn.Conv2d's own initialization, so an online branch starts from the kernels an offline one does.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class ScaledConv(ScaledBranch):
    """A bias-free conv of ``shape`` (``(k, k)``, ``(1, 1)``, ``(1, k)``, ``(k, 1)``), centred in the kxk window.

    Without the scale, the kxk and 1x1 kernels would only ever train as their sum, whatever their number.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, shape: tuple[int, int], stride, groups, scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, scale=scale)
        self.weight = _kaiming(nn.Parameter(torch.empty(out_channels, in_channels // groups, *shape)))

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        pad_h, pad_w = ((self.kernel_size - side) // 2 for side in self.weight.shape[-2:])
        return F.pad(self.weight.to(dtype), [pad_w, pad_w, pad_h, pad_h])

    def stages(self, x: Tensor) -> Tensor:
        padding = tuple(side // 2 for side in self.weight.shape[-2:])
        return F.conv2d(x, self.weight, None, self.stride, padding, 1, self.groups)


class ScaledIdentity(ScaledBranch):
    """The input itself (shapes allow it only at stride 1 with as many outputs as inputs)."""

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        centre = self.kernel_size // 2
        taps = torch.zeros(self.kernel_size, self.kernel_size, dtype=dtype, device=self.scale.device)
        taps[centre, centre] = 1
        return self._own_channel_kernel(taps)

    def stages(self, x: Tensor) -> Tensor:
        return x


class ScaledAvgPool(ScaledBranch):
    """A kxk average pool of the input, zero-padded by ``k // 2`` (padding counted), at the block's stride."""

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        size = self.kernel_size
        return self._own_channel_kernel(torch.full((size, size), 1 / size**2, dtype=dtype, device=self.scale.device))

    def stages(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.kernel_size // 2)


class ScaledConvSequence(ScaledBranch):
    """A 1x1 conv to ``middle`` channels, then the kxk conv (DBB's ``dbb_1x1_kxk``, OREPA's 1x1 -> kxk).

    With no BatchNorm between them (OREPA), zero padding of the middle map is the 1x1 conv of a
    zero-padded input, so the two are one kxk conv at the borders too. ``identity_based``: the 1x1
    kernel is a fixed identity plus ``weight_1x1`` (zero at init), middle channel m reading input
    ``m % (C_in / groups)`` of its group (DBB's ``IdentityBasedConv1x1``, OREPA's ``id_tensor``).
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, middle, identity_based, stride, groups, scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, scale=scale)
        self.identity_based = identity_based
        self.weight_1x1 = nn.Parameter(torch.empty(middle, in_channels // groups, 1, 1))
        if identity_based:
            nn.init.zeros_(self.weight_1x1)
        else:
            _kaiming(self.weight_1x1)
        self.weight_kxk = _kaiming(nn.Parameter(torch.empty(out_channels, middle // groups, kernel_size, kernel_size)))

    def first_kernel(self, dtype: torch.dtype) -> Tensor:
        """The 1x1 kernel ``(middle, C_in / groups, 1, 1)``, identity included, in ``dtype``."""
        kernel = self.weight_1x1.to(dtype)
        if not self.identity_based:
            return kernel
        middle, in_per_group = kernel.shape[:2]
        rows = torch.arange(middle, device=kernel.device)
        eye = torch.zeros_like(kernel)
        eye[rows, rows % in_per_group] = 1
        return kernel + eye

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        groups = self.groups
        first = self.first_kernel(dtype).flatten(1)  # (middle, C_in / g)
        second = self.weight_kxk.to(dtype)  # (C_out, middle / g, k, k)
        first = first.reshape(groups, -1, first.shape[1])  # (g, middle / g, C_in / g)
        second = second.reshape(groups, -1, *second.shape[1:])  # (g, C_out / g, middle / g, k, k)
        kernel = torch.einsum("gmi,gomhw->goihw", first, second)
        return kernel.reshape(self.out_channels, -1, self.kernel_size, self.kernel_size)

    def stages(self, x: Tensor) -> Tensor:
        middle = F.conv2d(x, self.first_kernel(self.weight_1x1.dtype), None, 1, 0, 1, self.groups)
        return F.conv2d(middle, self.weight_kxk, None, self.stride, self.kernel_size // 2, 1, self.groups)


class ScaledAvgSequence(ScaledBranch):
    """A 1x1 conv, then a kxk average pool at the block's stride (DBB's ``dbb_avg``, OREPA's avg branch).

    ``with_conv=False``: the pool of the input itself (DBB's depthwise case, where the scale is the
    per-channel map the 1x1 conv would add).
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, with_conv, stride, groups, scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, scale=scale)
        self.weight = None
        if with_conv:
            self.weight = _kaiming(nn.Parameter(torch.empty(out_channels, in_channels // groups, 1, 1)))

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        size = self.kernel_size
        if self.weight is None:
            return self._own_channel_kernel(
                torch.full((size, size), 1 / size**2, dtype=dtype, device=self.scale.device)
            )
        return (self.weight.to(dtype) / size**2).expand(-1, -1, size, size)

    def stages(self, x: Tensor) -> Tensor:
        if self.weight is not None:
            x = F.conv2d(x, self.weight, None, 1, 0, 1, self.groups)
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.kernel_size // 2)


def frequency_prior(
    channels: int, kernel_size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """OREPA's fixed cosine filters ``(channels, k, k)`` (``fre_init``): vertical frequencies, then horizontal.

    Channel i < channels / 2 holds ``cos(pi (h + 1/2) (i + 1) / k)``, the rest
    ``cos(pi (w + 1/2) (i + 1 - channels / 2) / k)``. OREPA writes k = 3 into the formula (and fills
    only 3x3 taps); this is the same for k = 3 and the same basis for any odd k.
    """
    half = channels / 2
    index = torch.arange(channels, dtype=torch.float64).reshape(-1, 1, 1)
    taps = torch.arange(kernel_size, dtype=torch.float64) + 0.5
    rows = torch.cos(math.pi * taps.reshape(1, -1, 1) * (index + 1) / kernel_size)
    cols = torch.cos(math.pi * taps.reshape(1, 1, -1) * (index + 1 - half) / kernel_size)
    prior = torch.where(index < half, rows.expand(-1, -1, kernel_size), cols.expand(-1, kernel_size, -1))
    return prior.to(device=device, dtype=dtype)


class ScaledPriorConv(ScaledBranch):
    """A 1x1 conv, then each output channel filtered by its fixed frequency prior (:func:`frequency_prior`).

    The prior is a function of the shape, not a weight: no state-dict entry (OREPA's
    ``weight_orepa_prior`` buffer is not needed to load its files), made once per dtype and device.
    A buffer would not do: a module built on the meta device and moved with ``to_empty`` (as weight
    loading builds its twins) would hold uninitialized memory there.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, stride, groups, scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, scale=scale)
        self.weight = _kaiming(nn.Parameter(torch.empty(out_channels, in_channels // groups, 1, 1)))
        self._priors: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def prior(self, dtype: torch.dtype) -> Tensor:
        """The fixed filters ``(C_out, k, k)`` in ``dtype`` on the weight's device."""
        key = (dtype, self.weight.device)
        if key not in self._priors:
            self._priors[key] = frequency_prior(self.out_channels, self.kernel_size, dtype=dtype, device=key[1])
        return self._priors[key]

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        return torch.einsum("oi,ohw->oihw", self.weight.to(dtype).flatten(1), self.prior(dtype))

    def stages(self, x: Tensor) -> Tensor:
        pointwise = F.conv2d(x, self.weight, None, 1, 0, 1, self.groups)  # (B, C_out, H, W)
        depthwise = self.prior(x.dtype).unsqueeze(1)  # (C_out, 1, k, k): channel o filtered by its prior
        return F.conv2d(pointwise, depthwise, None, self.stride, self.kernel_size // 2, 1, self.out_channels)


class ScaledDepthwiseSeparable(ScaledBranch):
    """A depthwise kxk conv to ``8 * C_in`` channels at the block's stride, then a 1x1 conv of the block's groups."""

    def __init__(self, in_channels, out_channels, kernel_size, *, stride, groups, scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, scale=scale)
        middle = DW_SEP_EXPANSION * in_channels
        self.weight_dw = _kaiming(nn.Parameter(torch.empty(middle, 1, kernel_size, kernel_size)))
        self.weight_pw = _kaiming(nn.Parameter(torch.empty(out_channels, middle // groups, 1, 1)))

    def unscaled_kernel(self, dtype: torch.dtype) -> Tensor:
        groups, size = self.groups, self.kernel_size
        in_per_group = self.in_channels // groups
        # Depthwise output i * 8 + t reads input i; input i = g * (C_in / g) + j is in group g.
        depthwise = self.weight_dw.to(dtype).reshape(groups, in_per_group, DW_SEP_EXPANSION, size, size)
        pointwise = self.weight_pw.to(dtype).reshape(groups, -1, in_per_group, DW_SEP_EXPANSION)  # (g, o, j, t)
        kernel = torch.einsum("gjthw,gojt->gojhw", depthwise, pointwise)
        return kernel.reshape(self.out_channels, in_per_group, size, size)

    def stages(self, x: Tensor) -> Tensor:
        middle = F.conv2d(x, self.weight_dw, None, self.stride, self.kernel_size // 2, 1, self.in_channels)
        return F.conv2d(middle, self.weight_pw, None, 1, 0, 1, self.groups)
