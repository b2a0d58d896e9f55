"""The re-parameterization arithmetic, as pure functions on tensors.

Everything here is exact algebra on linear maps:

* a convolution followed by an eval-mode BatchNorm is one convolution with a bias;
* a 1x1 (or 1xk, kx1) kernel is a kxk kernel that is zero outside its centre (row, column);
* a kernel at dilation d is the dense kernel with d - 1 zeros between its taps (at dilation 1);
* a branch scaled per output channel (or by -1) scales its kernel and bias, after its BN;
* the identity map is a kxk kernel with a single 1 per output channel (for any ``groups``);
* a stride-1 average pool is a kxk kernel with ``1 / k**2`` at every tap of a channel's own input;
* a BatchNorm after a sum of convolutions folds into the summed kernel like any Conv+BN pair;
* convolutions over the same input with the same stride add up kernel-wise;
* a 1x1 conv, a BN, then a kxk conv (or a kxk average pool) and a BN is one kxk conv, provided the
  second stage's padding carries what the first BN gives a zero input (DBB's sequences);
* a BN before a Linear folds into the Linear, and the mean of Linears over one input is one Linear.

The arithmetic runs in float64 and is cast back once at the end, so a model that is already
in fp16/bf16 converts as accurately as its own dtype allows. (``torch.nn.utils.fusion`` does
the BN fold in the weight's own dtype and returns detached ``Parameter`` objects, which rules it
out here: training differentiates through ``equivalent_kernel_bias`` for the RepVGG L2 penalty.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConvBranch",
    "IdentityBranch",
    "SequenceBranch",
    "average_linears",
    "bn_scale_shift",
    "dilate_kernel",
    "equivalent_kernel_bias",
    "fold_bn",
    "fold_bn_into_linear",
    "fused_kernel_bias",
    "fuse_conv_bn",
    "identity_kernel",
    "pad_kernel",
    "scaled_sum",
    "wide_dtype",
]


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype the folding arithmetic runs in: float64, except where the device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def bn_scale_shift(bn: nn.Module, conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(y + conv_bias) == y * scale + shift`` in eval mode, in float64.

    Args:
        bn: A BatchNorm-like module with ``running_mean``, ``running_var``, ``eps`` and
            optional affine ``weight``/``bias`` (``nn.BatchNorm*d``, ``SyncBatchNorm``,
            torchvision's ``FrozenBatchNorm2d``).
        conv_bias: Bias added before the BatchNorm, if any.
    """
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError(f"cannot fold {type(bn).__name__}: it has no running statistics (track_running_stats=False?)")
    wide = wide_dtype(bn.running_mean.device)
    mean = bn.running_mean.to(wide)
    std = (bn.running_var.to(wide) + bn.eps).sqrt()
    gamma = bn.weight.to(wide) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(wide) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / std  # (C,)
    centred = conv_bias.to(wide) - mean if conv_bias is not None else -mean
    return scale, centred * scale + beta


def fold_bn(kernel: Tensor, bn: nn.Module, conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a convolution into the convolution.

    ``bn(conv(x)) == conv(x; kernel * s) + (conv_bias - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)``, per output channel.

    Args:
        kernel: Convolution weight, ``(C_out, C_in / groups, *kernel_dims)``.
        bn: The BatchNorm (see :func:`bn_scale_shift` for what qualifies).
        conv_bias: The convolution's own bias, if it has one.

    Returns:
        ``(kernel, bias)`` in float64 (the wide dtype); callers cast once when done.
    """
    scale, shift = bn_scale_shift(bn, conv_bias)
    # A float32 kernel times a float64 vector promotes to float64 in one pass, with no float64 copy first.
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1))), shift


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Weight and bias of the single convolution equal to ``bn(conv(x))`` in eval mode.

    Returned in the convolution weight's dtype.
    """
    kernel, bias = fold_bn(conv.weight, bn, conv.bias)
    return kernel.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def pad_kernel(kernel: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad an odd kernel, e.g. 1x1 or 1xk, to ``kernel_size`` x ``kernel_size`` around its centre."""
    pad_h, pad_w = ((kernel_size - side) // 2 for side in kernel.shape[-2:])
    if min(pad_h, pad_w) < 0 or any(side % 2 != kernel_size % 2 for side in kernel.shape[-2:]):
        size = "x".join(str(side) for side in kernel.shape[-2:])
        raise ValueError(f"cannot centre a {size} kernel in {kernel_size}x{kernel_size}")
    return F.pad(kernel, [pad_w, pad_w, pad_h, pad_h]) if pad_h or pad_w else kernel


def dilate_kernel(kernel: Tensor, dilation: int) -> Tensor:
    """The dense kernel of a conv at ``dilation``: its taps ``dilation`` apart, zeros between (differentiable).

    A ``(O, I, k, k)`` kernel at dilation d with padding ``d * (k // 2)`` is the ``(O, I, d * (k - 1) + 1, ...)``
    kernel returned here at dilation 1, padding unchanged (UniRepLKNet's dilated branches).
    """
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")
    if dilation == 1:
        return kernel
    height, width = kernel.shape[-2:]
    dense = kernel.new_zeros(*kernel.shape[:-2], dilation * (height - 1) + 1, dilation * (width - 1) + 1)
    dense[..., ::dilation, ::dilation] = kernel  # an in-place copy autograd differentiates through
    return dense


def identity_kernel(
    channels: int,
    kernel_size: int = 3,
    *,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The kxk kernel of a (grouped) convolution that maps its input to itself.

    Output channel ``c`` reads input channel ``c % (channels // groups)`` of its own group,
    with a 1 at the kernel centre. Built in the requested dtype and device, so an fp16 or
    CUDA model never sees a float32 CPU tensor (a known bug of the official code).
    """
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    out_idx = torch.arange(channels, device=device)
    centre = kernel_size // 2
    kernel[out_idx, out_idx % per_group, centre, centre] = 1
    return kernel


@dataclass(frozen=True)
class SequenceBranch:
    """A 1x1 conv and its BN, then a kxk conv or a kxk average pool and its BN: a branch of DBB (Ding et al. 2021).

    The second stage pads the first BN's output with what that BN gives a zero input (its shift),
    not with zeros: then the branch equals one kxk conv over the zero-padded input, at the borders
    too (DBB's ``BNAndPadLayer``). The fused bias is the second kernel's taps times that shift.
    """

    first_kernel: Tensor | None  # (M, C_in / groups, 1, 1); None: every channel passes as is (no first stage)
    first_bn: nn.Module | None  # None: no BN after the 1x1 (or no first stage)
    second: Tensor | int  # (C_out, M / groups, k, k) kernel; or k, for a kxk average pool over each channel
    second_bn: nn.Module | None


@dataclass(frozen=True)
class ConvBranch:
    """A convolution branch: ``scale * bn(conv(x; kernel, dilation) + bias)``; a ``(kernel, bn)`` pair means ``ConvBranch(kernel, bn)``.

    ``scale`` is a float or a per-output-channel tensor (any shape of ``C_out`` or 1 elements: timm's layer
    scales are ``(C, 1, 1)``): -1 for a signed branch, a layer scale for RepMixer's. None: 1.
    """

    kernel: Tensor  # (C_out, C_in / groups, kh, kw), odd sides
    bn: nn.Module | None = None  # a BatchNorm after the conv; None for none
    bias: Tensor | None = None  # the conv's own bias (before the BN, folded through it)
    dilation: int = 1
    scale: Tensor | float | None = None


@dataclass(frozen=True)
class IdentityBranch:
    """The input itself as a branch: ``scale * bn(x)`` (``bn`` None: ``scale * x``; both None: ``x``).

    RepMixer's ``x + ls * mixer_bn(x) - ls * norm_bn(x)`` is three of them.
    """

    bn: nn.Module | None = None
    scale: Tensor | float | None = None


def equivalent_kernel_bias(
    conv_branches: Sequence[ConvBranch | tuple[Tensor, nn.Module | None]],
    identity: nn.Module | IdentityBranch | None = None,
    *,
    kernel_size: int,
    avg_pool: int | None = None,
    post_bn: nn.Module | None = None,
    sequences: Sequence[SequenceBranch] = (),
    identities: Sequence[IdentityBranch] = (),
) -> tuple[Tensor, Tensor]:
    """Sum parallel convolution branches (and identity, average pool, a BN after the sum) into one kernel and bias.

    The result equals padding every kernel to ``kernel_size`` (:func:`pad_kernel`), folding each
    branch's BN (:func:`fold_bn`), adding the identity (:func:`identity_kernel`, through its BN if
    it has one), the average pool (``1 / size**2`` at every tap of each channel's own input) and
    each sequence (:class:`SequenceBranch`), summing it all and folding ``post_bn`` into the sum.
    Smaller kernels, the identity and the pool are added into the centre instead of being materialized.

    Differentiable with respect to the kernels and the BN affine parameters (the RepVGG L2
    penalty needs that). The sum is formed in float64 and cast back to the first kernel's dtype.

    Args:
        conv_branches: :class:`ConvBranch` items, or ``(kernel, bn)`` pairs, of odd kernels up to
            ``kernel_size`` on each side once dilated, square or not (ACNet's 1xk and kx1); ``bn`` is None
            for a plain convolution (QARepVGG's 1x1 branch; with ``bias``, RepViT's).
        identity: The identity branch: a BatchNorm applied to the input (RepVGG, MobileOne),
            ``nn.Identity`` for the plain identity (QARepVGG), an :class:`IdentityBranch` (scaled), or None.
        identities: More identity terms, for blocks with several (RepMixer).
        kernel_size: Size of the fused square kernel. The groups need no argument: the kernels'
            second dimension (input channels per group) says where the identity's 1s go.
        avg_pool: Side of a stride-1 average pool over each channel (padding ``size // 2``, padded
            zeros counted, as ``nn.AvgPool2d``'s default): QARepVGG v2's branch. None for none.
        post_bn: A BatchNorm applied to the branch sum (QARepVGG), or None.
        sequences: DBB's 1x1 -> kxk and 1x1 -> average-pool branches.
    """
    parts = _Parts.of(conv_branches, identity, avg_pool, post_bn, sequences, identities)
    first = parts.convs[0].kernel
    kernel, bias = parts.sum(range(first.shape[0]), kernel_size)
    return kernel.to(first.dtype), bias.to(first.dtype)


@torch.no_grad()
def fused_kernel_bias(
    conv_branches: Sequence[ConvBranch | tuple[Tensor, nn.Module | None]],
    identity: nn.Module | IdentityBranch | None = None,
    *,
    kernel_size: int,
    avg_pool: int | None = None,
    post_bn: nn.Module | None = None,
    sequences: Sequence[SequenceBranch] = (),
    identities: Sequence[IdentityBranch] = (),
    rows_per_chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """The same values as :func:`equivalent_kernel_bias`, without autograd, for conversion.

    Works through the output channels a chunk at a time, so the float64 intermediates stay small
    and reuse memory: converting a large model is dominated by fresh page allocations otherwise
    (RepVGG-B3: several seconds unchunked, a fraction of a second chunked).
    """
    parts = _Parts.of(conv_branches, identity, avg_pool, post_bn, sequences, identities)
    first_kernel = parts.convs[0].kernel
    out_channels = first_kernel.shape[0]
    kernel = first_kernel.new_empty(out_channels, first_kernel.shape[1], kernel_size, kernel_size)
    bias = first_kernel.new_empty(out_channels)
    for start in range(0, out_channels, rows_per_chunk):
        rows = range(start, min(start + rows_per_chunk, out_channels))
        kernel[start : rows.stop], bias[start : rows.stop] = parts.sum(rows, kernel_size)
    return kernel, bias


def scaled_sum(
    terms: Sequence[tuple[Tensor | float, Tensor, Tensor | None]], *, kernel_size: int
) -> tuple[Tensor, Tensor]:
    """``sum(coefficient * conv(x; kernel) + coefficient * bias)`` as one conv: fused sub-blocks composed.

    Each term is ``(coefficient, kernel, bias)``: a float or a per-output-channel tensor, an odd kernel up
    to ``kernel_size`` (centred in it), a bias or None. Float64, rounded once to the first kernel's dtype;
    differentiable. RepMixer: ``[(1, identity, None), (ls, mixer_kernel, mixer_bias), (-ls, norm_kernel, norm_bias)]``.
    """
    if not terms:
        raise ValueError("scaled_sum needs at least one (coefficient, kernel, bias) term")
    branches = [ConvBranch(kernel, bias=bias, scale=coefficient) for coefficient, kernel, bias in terms]
    return equivalent_kernel_bias(branches, kernel_size=kernel_size)


def fold_bn_into_linear(bn: nn.Module, linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one Linear equal to ``linear(bn(x))`` in eval mode (RepViT's BN -> Linear head).

    ``bn`` normalizes ``C`` channels: a BatchNorm1d over the Linear's features, or a BatchNorm2d whose
    output is globally average-pooled (pooling commutes with a per-channel affine map) or flattened
    channel-major (``in_features = C * H * W``: each channel's scale repeats over its ``H * W`` features).
    Float64, rounded once to the Linear's dtype; differentiable.
    """
    scale, shift = bn_scale_shift(bn)  # (C,)
    in_features = linear.weight.shape[1]
    if in_features % len(scale):
        raise ValueError(
            f"a BatchNorm of {len(scale)} channels cannot precede a Linear of {in_features} input features "
            "(it needs C features, or C * H * W flattened)"
        )
    repeats = in_features // len(scale)
    scale, shift = scale.repeat_interleave(repeats), shift.repeat_interleave(repeats)  # (in_features,)
    weight = linear.weight.to(scale.dtype)
    bias = weight @ shift + (linear.bias.to(scale.dtype) if linear.bias is not None else 0)
    return (weight * scale).to(linear.weight.dtype), bias.to(linear.weight.dtype)


def average_linears(linears: Sequence[nn.Linear | tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of the one Linear equal to the mean of ``linears`` over the same input.

    RepViT's and LeViT's distillation heads: ``(head(x) + head_dist(x)) / 2`` at eval. Items are Linears or
    ``(weight, bias)`` pairs (a folded :func:`fold_bn_into_linear`). The bias is None only if no item has one.
    Float64, rounded once to the first weight's dtype; differentiable.
    """
    pairs = [(item.weight, item.bias) if isinstance(item, nn.Module) else tuple(item) for item in linears]
    if not pairs:
        raise ValueError("average_linears needs at least one Linear")
    shapes = {tuple(weight.shape) for weight, _ in pairs}
    if len(shapes) != 1:
        raise ValueError(f"Linears averaged must have one weight shape, got {', '.join(map(str, sorted(shapes)))}")
    dtype, wide = pairs[0][0].dtype, wide_dtype(pairs[0][0].device)
    weight = sum(w.to(wide) for w, _ in pairs) / len(pairs)
    biases = [b.to(wide) for _, b in pairs if b is not None]
    bias = sum(biases) / len(pairs) if biases else None
    return weight.to(dtype), bias.to(dtype) if bias is not None else None


Affine = tuple[Tensor, Tensor] | None  # per-channel (scale, shift) in float64; None for the plain map


def _affine(module: nn.Module | None) -> Affine:
    return None if module is None or isinstance(module, nn.Identity) else bn_scale_shift(module)


def _scaled_affine(affine: Affine, bias: Tensor | None, scale: Tensor | float | None, channels: int, like: Tensor):
    """``scale * affine(y + bias)`` as one per-channel Affine (None when it is the plain map)."""
    if affine is None and bias is None and scale is None:
        return None
    wide = wide_dtype(like.device)
    if affine is None:
        ones = torch.ones(channels, dtype=wide, device=like.device)
        affine = (ones, bias.to(wide) if bias is not None else torch.zeros_like(ones))
    if scale is None:
        return affine
    factor = torch.as_tensor(scale, device=like.device).to(wide).reshape(-1)  # (C,) or (1,)
    if factor.numel() not in (1, channels):
        raise ValueError(
            f"a branch scale must be a number or have one value per output channel ({channels}), "
            f"got {factor.numel()} values"
        )
    return affine[0] * factor, affine[1] * factor


@dataclass
class _Conv:
    """A :class:`ConvBranch` reduced to what fusion needs: its kernel, dilation and one per-channel affine map."""

    kernel: Tensor
    affine: Affine
    dilation: int

    @classmethod
    def of(cls, branch: ConvBranch | tuple) -> _Conv:
        if not isinstance(branch, ConvBranch):
            branch = ConvBranch(*branch)
        kernel, dilation = branch.kernel, branch.dilation
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")
        with_bn = _affine(branch.bn) is not None
        affine = bn_scale_shift(branch.bn, branch.bias) if with_bn else None
        bias = None if with_bn else branch.bias  # with a BN, the bias went through it
        return cls(kernel, _scaled_affine(affine, bias, branch.scale, kernel.shape[0], kernel), dilation)

    def span(self) -> int:
        """Taps the dilated kernel covers: the larger it is, the earlier it starts the sum."""
        height, width = self.kernel.shape[-2:]
        return (self.dilation * (height - 1) + 1) * (self.dilation * (width - 1) + 1)


def _identity_affine(identity: nn.Module | IdentityBranch | None, channels: int, like: Tensor) -> Affine:
    if isinstance(identity, IdentityBranch):
        return _scaled_affine(_affine(identity.bn), None, identity.scale, channels, like)
    return _affine(identity)


def _scaled(kernel: Tensor, affine: Affine, rows: slice) -> tuple[Tensor, Tensor | None]:
    """Rows of ``kernel`` in float64 with ``affine``'s scale folded in, and its shift (None without one)."""
    if affine is None:
        return kernel[rows].to(wide_dtype(kernel.device), copy=True), None  # never a view of the weight
    scale, shift = affine[0][rows], affine[1][rows]
    return kernel[rows].to(scale.dtype) * scale.reshape(-1, *([1] * (kernel.dim() - 1))), shift


@dataclass
class _Sequence:
    """A :class:`SequenceBranch` with its BNs reduced to affine maps."""

    first_kernel: Tensor | None
    first: Affine
    second: Tensor | int
    second_affine: Affine

    def rows(self, rows: range, like: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel ``(len(rows), C_in / groups, k, k)`` and bias of output channels ``rows``, as ``like`` (float64)."""
        out_slice = slice(rows.start, rows.stop)
        out_idx = torch.arange(rows.start, rows.stop, device=like.device)
        if isinstance(self.second, int):
            kernel, bias = self._pooled(rows, like)
        else:
            second = self.second[out_slice].to(wide_dtype(self.second.device))  # (R, M / groups, k, k)
            middle, per_group = self.first_kernel.shape[0], second.shape[1]
            first, shift = self._first(slice(0, middle))  # (M, C_in / groups), (M,)
            out_per_group = self.second.shape[0] // (middle // per_group)
            group = out_idx // out_per_group  # each output row's group
            first = first.reshape(-1, per_group, first.shape[-1])[group]  # (R, M / groups, C_in / groups)
            kernel = torch.einsum("rmhw,rmi->rihw", second, first)
            # The padding carries the first BN's shift, so every tap of the second kernel sees it.
            bias = torch.einsum("rmhw,rm->r", second, shift.reshape(-1, per_group)[group])
        if self.second_affine is not None:
            scale, shift = self.second_affine[0][out_slice], self.second_affine[1][out_slice]
            kernel, bias = kernel * scale.reshape(-1, 1, 1, 1), bias * scale + shift
        return kernel, bias

    def _first(self, rows: slice) -> tuple[Tensor, Tensor]:
        kernel = self.first_kernel[..., 0, 0]  # (M, C_in / groups)
        folded, shift = _scaled(kernel, self.first, rows)
        return folded, shift if shift is not None else folded.new_zeros(folded.shape[0])

    def _pooled(self, rows: range, like: Tensor) -> tuple[Tensor, Tensor]:
        size, count = self.second, len(rows)
        if self.first_kernel is None:  # the pool reads each channel's own input: c % (inputs per group)
            kernel = like.new_zeros(count, like.shape[1], size, size)
            out_idx = torch.arange(rows.start, rows.stop, device=like.device)
            kernel[torch.arange(count, device=like.device), out_idx % like.shape[1]] = 1.0 / size**2
            return kernel, kernel.new_zeros(count)
        # The pool averages the 1x1's output channel by channel: its window, over the padded shift, keeps the shift.
        first, shift = self._first(slice(rows.start, rows.stop))  # (R, C_in / groups)
        kernel = (first / size**2).reshape(count, -1, 1, 1).expand(-1, -1, size, size)
        return kernel, shift


@dataclass
class _Parts:
    """A block's branches reduced to what fusion needs: kernels with their per-channel affine maps."""

    convs: list[_Conv]
    identities: list[Affine]  # each an identity term; None: the plain identity
    avg_pool: int | None
    post: Affine
    sequences: list[_Sequence]

    @classmethod
    def of(cls, conv_branches, identity, avg_pool, post_bn, sequences=(), identities=()) -> _Parts:
        if not conv_branches:
            raise ValueError("a re-parameterizable block needs at least one convolution branch")
        convs = [_Conv.of(branch) for branch in conv_branches]
        out_channels, like = convs[0].kernel.shape[0], convs[0].kernel
        terms = ([identity] if identity is not None else []) + list(identities)
        for seq in sequences:
            if seq.first_kernel is not None and tuple(seq.first_kernel.shape[-2:]) != (1, 1):
                raise ValueError(f"a sequence starts with a 1x1 conv, got a {tuple(seq.first_kernel.shape)} kernel")
            if seq.first_kernel is None and not isinstance(seq.second, int):
                raise ValueError("a sequence without a first 1x1 conv must end in an average pool")
            if isinstance(seq.second, int) and seq.first_kernel is not None and len(seq.first_kernel) != out_channels:
                raise ValueError(
                    f"an average pool keeps channels: its 1x1 conv must give the block's {out_channels}, "
                    f"got {len(seq.first_kernel)}"
                )
        return cls(
            convs=convs,
            identities=[_identity_affine(term, out_channels, like) for term in terms],
            avg_pool=avg_pool,
            post=_affine(post_bn),
            sequences=[
                _Sequence(seq.first_kernel, _affine(seq.first_bn), seq.second, _affine(seq.second_bn))
                for seq in sequences
            ],
        )

    def sum(self, rows: range, kernel_size: int) -> tuple[Tensor, Tensor]:
        """Float64 kernel and bias of output channels ``rows``."""
        out_slice = slice(rows.start, rows.stop)
        kernel = bias = None
        for conv in sorted(self.convs, key=lambda conv: -conv.span()):
            folded, shift = _scaled(conv.kernel, conv.affine, out_slice)
            folded = dilate_kernel(folded, conv.dilation)
            if kernel is None:  # the largest branch; a fresh tensor, so adding into it in place is safe
                kernel = pad_kernel(folded, kernel_size)
                bias = shift if shift is not None else kernel.new_zeros(len(rows))
            else:
                _add_centred(kernel, folded)
                bias = bias + shift if shift is not None else bias
        for seq in self.sequences:
            seq_kernel, seq_bias = seq.rows(rows, kernel)
            _add_centred(kernel, seq_kernel)
            bias = bias + seq_bias
        # Identity and average pool read each output channel's own input channel: c % (inputs per group).
        centre = kernel_size // 2
        out_idx = torch.arange(rows.start, rows.stop, device=kernel.device)
        local_idx, in_idx = out_idx - rows.start, out_idx % kernel.shape[1]
        for identity in self.identities:
            centre_idx = torch.full_like(out_idx, centre)
            scale = identity[0][out_slice] if identity is not None else kernel.new_ones(len(rows))
            kernel.index_put_((local_idx, in_idx, centre_idx, centre_idx), scale, accumulate=True)
            bias = bias + identity[1][out_slice] if identity is not None else bias
        if self.avg_pool is not None:
            size = self.avg_pool
            if size % 2 != 1 or size > kernel_size:
                raise ValueError(f"cannot centre a {size}x{size} average pool in {kernel_size}x{kernel_size}")
            lo, hi = centre - size // 2, centre + size // 2 + 1
            kernel[local_idx, in_idx, lo:hi, lo:hi] += 1.0 / size**2  # (rows, size, size): one window per channel
        if self.post is not None:
            scale, shift = self.post[0][out_slice], self.post[1][out_slice]
            kernel, bias = kernel * scale.reshape(-1, 1, 1, 1), bias * scale + shift
        return kernel, bias


def _add_centred(kernel: Tensor, part: Tensor) -> None:
    """Add an odd ``part`` (``(R, C, h, w)``) into the centre of the square ``kernel``, in place."""
    size, (height, width) = kernel.shape[-1], part.shape[-2:]
    if height % 2 != 1 or width % 2 != 1 or height > size or width > size:
        raise ValueError(f"cannot centre a {height}x{width} kernel in {size}x{size}")
    top, left = (size - height) // 2, (size - width) // 2
    kernel[..., top : top + height, left : left + width] += part
