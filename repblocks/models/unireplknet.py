"""UniRepLKNet: a large-kernel ConvNet whose depthwise kernels train with small and dilated kernels beside them.

Ding, Zhang, Ge, Zhao, Song, Yue, Shan. "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for
Audio, Video, Point Cloud, Time-Series and Image Recognition", CVPR 2024, https://arxiv.org/abs/2311.15599.
Code and weights: https://github.com/AILab-CVC/UniRepLKNet (``unireplknet.py``).

A ConvNeXt-like network: a stride-4 stem (two 3x3 stride-2 convs with channels-first LayerNorms),
three 3x3 stride-2 downsampling convs, and stages of blocks

    x + gamma * BN(Linear(GRN(GELU(Linear(SE(BN(dwconv(x))))))))

whose depthwise ``dwconv`` of kernel k >= 7 is the paper's Dilated Reparam Block: a kxk Conv+BN beside
depthwise Conv+BN branches of smaller kernels and dilations (the ``unireplk`` branch set of
:class:`~repblocks.blocks.RepBlock`), and the BN after it (upstream's ``norm``) is the RepBlock's
``post_bn``. Kernels 3 and 5 are a plain depthwise conv and that BN. Every dwconv fuses into one conv; the
block's FFN fuses too, as upstream's ``reparameterize()`` does it: the GRN's bias goes through the second
Linear, and the BN and layer scale after it fold into it (:meth:`UniRepLKNetBlock.deploy_form`).

The stem's first conv is level 0 (stride 2) and its second opens stage 1, so the levels are those of
every family here. Each variant is one row of ``UNIREPLKNET_CONFIGS``; upstream's weights load with
:func:`repblocks.load_weights` (the ``unireplknet`` layout, :mod:`repblocks.unireplknet_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblocks.blocks import DEFAULT_BN_EPS, RepBlock, SqueezeExcite, resolve_branch_set
from repblocks.folds import DeployForm, checked_fold, conv_probe
from repblocks.fusion import fold_bn, wide_dtype
from repblocks.models.base import ClassifierHead, RepNet, imagenet_pretrained_cfg
from repblocks.online import resolve_block_mode
from repblocks.registry import register_model
from repblocks.unireplknet_layout import DILATED_FROM  # a plain dwconv below it, a Dilated Reparam Block from it on

__all__ = ["UNIREPLKNET_CONFIGS", "UniRepLKNet", "UniRepLKNetBlock", "UniRepLKNetConfig"]

# Upstream's kernel sizes for its A/F/P variants (depths 2, 2, 6, 2): 3x3 in stage 1, 13x13 after.
_AFP_KERNELS = ((3, 3), (13, 13), (13,) * 6, (13, 13))


@dataclass(frozen=True)
class UniRepLKNetConfig:
    """Architecture of one UniRepLKNet variant, and the images its published weights expect."""

    dims: tuple[int, int, int, int]  # channels of stages 1-4 (the stem's first conv has half of stage 1's)
    kernel_sizes: tuple[tuple[int, ...], ...]  # each block's depthwise kernel, per stage: its length is the depth
    ffn_factor: int = 4  # the FFN's hidden width, times the stage's channels
    layer_scale: float = 1e-6  # the initial gamma of every block (upstream's layer_scale_init_value)
    image_size: int = 224  # side of the images the weights were evaluated at
    crop_pct: float = 0.875  # evaluation: resize to image_size / crop_pct, then centre-crop image_size
    upstream_file: str | None = None  # the file of AILab-CVC's weights on the Hugging Face hub (DingXiaoH/UniRepLKNet)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(kernels) for kernels in self.kernel_sizes)


UNIREPLKNET_CONFIGS: dict[str, UniRepLKNetConfig] = {
    "unireplknet_a": UniRepLKNetConfig(
        (40, 80, 160, 320), _AFP_KERNELS, upstream_file="unireplknet_a_in1k_224_acc77.03.pth"
    ),
    "unireplknet_f": UniRepLKNetConfig(
        (48, 96, 192, 384), _AFP_KERNELS, upstream_file="unireplknet_f_in1k_224_acc78.58.pth"
    ),
    # For tests and smoke runs: every dwconv kind (plain 3 and 5, dilated 7 and 9) in a few ms on 32x32 images.
    "unireplknet_tiny": UniRepLKNetConfig((16, 24, 32, 48), ((3,), (7,), (9, 5), (7,)), image_size=32, crop_pct=1.0),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (upstream's ``LayerNorm(data_format="channels_first")``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2) on ``(B, H, W, C)`` or ``(B, H * W, C)``: each channel scaled by its
    share of the L2 energy over the pixels.

    ``bias=False`` is the deploy form: the bias ``beta`` is then folded into the Linear after it.
    """

    def __init__(self, channels: int, *, bias: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        energy = torch.norm(x, p=2, dim=tuple(range(1, x.dim() - 1)), keepdim=True)  # (B, 1, [1,] C)
        share = energy / (energy.mean(dim=-1, keepdim=True) + 1e-6)
        out = (self.gamma.flatten() * share + 1) * x  # gamma and beta: (C,), whatever x's rank
        return out if self.beta is None else out + self.beta.flatten()


def dwconv_branches(kernel_size: int) -> dict:
    """RepBlock's branches for a UniRepLKNet dwconv of ``kernel_size``: dilated branches from 7 on, else the kxk alone.

    Both have upstream's ``norm`` BN after the kernel: the post-sum BN with dilated branches, the kxk's own BN without.
    """
    if kernel_size >= DILATED_FROM:
        return {**resolve_branch_set("unireplk"), "post_bn": True}
    return dict(scale_branch=None, identity_branch=None)


class UniRepLKNetBlock(nn.Module):
    """UniRepLKNet's block: re-parameterizable depthwise conv, BN, SE, a GRN FFN and layer scale, with a residual.

    Args:
        dim: Channels (in and out).
        kernel_size: The depthwise kernel: 3 or 5 a plain conv (+BN), 7 or more a Dilated Reparam Block.
        ffn_factor: The FFN's hidden width, times ``dim``.
        layer_scale: The initial per-channel scale of the residual branch.
        bn_eps: The eps of every BatchNorm.
        deploy: Build the fused form: one depthwise conv with a bias, an FFN whose second Linear holds the BN,
            the layer scale and the GRN's bias (upstream's form after ``reparameterize()``).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        *,
        ffn_factor: int = 4,
        layer_scale: float = 1e-6,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.bn_eps = bn_eps
        self.dwconv = RepBlock(
            dim, dim, groups=dim, kernel_size=kernel_size, act=None, bn_eps=bn_eps, deploy=deploy,
            **dwconv_branches(kernel_size),
        )  # fmt: skip
        self.se = SqueezeExcite(dim, reduction=4)  # upstream's SEBlock(dim, dim // 4): the same keys and maths
        hidden = int(ffn_factor * dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden, bias=not deploy)
        self.pwconv2 = nn.Linear(hidden, dim, bias=deploy)
        self.bn = None if deploy else nn.BatchNorm2d(dim, eps=bn_eps)
        self.gamma = None if deploy else nn.Parameter(torch.full((dim,), float(layer_scale)))

    @property
    def deploy(self) -> bool:
        """True once the FFN's BN and layer scale are folded into ``pwconv2`` (the dwconv is folded too then)."""
        return self.bn is None

    def forward(self, x: Tensor) -> Tensor:
        y = self.se(self.dwconv(x))
        batch, channels, height, width = y.shape
        # The FFN's Linears on (B, H * W, C), not upstream's (B, H, W, C): the same products, and a 3-D batched
        # matmul is what LiteRT's converter takes (a 4-D one it refuses).
        y = y.flatten(2).transpose(1, 2)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))
        y = y.transpose(1, 2).reshape(batch, channels, height, width)
        if self.bn is not None:
            y = self.gamma.view(1, -1, 1, 1) * self.bn(y)
        return x + y

    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm:
        """The block fused in place and checked against its train form (the fold protocol of :mod:`repblocks.folds`).

        The dwconv fuses as every RepBlock; the FFN as upstream's ``reparameterize()``: ``pwconv2(grn(h) + beta)``
        is ``pwconv2(grn(h)) + W beta``, and the BN and ``gamma`` after it are a per-channel affine map of its output.
        """
        self.dwconv.deploy_form(keep_post_bn=keep_post_bn, verify=verify)
        if self.deploy:
            return DeployForm(self)
        probe = conv_probe(self.dim, (3, 3), (1, 1), device=self.pwconv2.weight.device)
        with checked_fold(self, verify=verify, probe=probe), torch.no_grad():
            weight, bias = _fold_ffn(self.pwconv2.weight, self.grn.beta, self.bn, self.gamma)
            linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
            self.pwconv2 = linear.requires_grad_(self.pwconv2.weight.requires_grad)
            self.grn.beta = None
            self.bn = None
            self.gamma = None
        return DeployForm(self)

    def fold_train_weights(self, given: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """This deploy-form block's weights from train-form ones (keys below the block), for :func:`repblocks.load_weights`.

        The dwconv's branches are fused by the loader as every RepBlock's; this folds the FFN's BN, layer scale and
        GRN bias. None when there is nothing to fold (the block's own form, or keys missing: reported as usual).
        """
        train_keys = {"pwconv2.weight", "grn.beta", "gamma", *(f"bn.{k}" for k in _BN_KEYS)}
        if not self.deploy or not train_keys <= given.keys() or "pwconv2.bias" in given:
            return None
        bn = nn.BatchNorm2d(self.dim, eps=self.bn_eps, dtype=torch.float64)
        bn.load_state_dict({k: given[f"bn.{k}"].double() for k in _BN_KEYS}, strict=False)
        weight, bias = _fold_ffn(given["pwconv2.weight"], given["grn.beta"], bn.eval(), given["gamma"])
        dtype = self.pwconv2.weight.dtype
        kept = {k: v for k, v in given.items() if k not in train_keys and k != "bn.num_batches_tracked"}
        return {**kept, "pwconv2.weight": weight.to(dtype), "pwconv2.bias": bias.to(dtype)}

    def switch_to_deploy(self) -> UniRepLKNetBlock:
        """:meth:`deploy_form`, returning the block (fused in place; calling it again does nothing)."""
        return self.deploy_form().module


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _fold_ffn(weight: Tensor, beta: Tensor, bn: nn.Module, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``gamma * bn(Linear(h + beta))`` as one Linear with a bias (``weight``: the bias-free Linear's), in ``weight``'s dtype.

    ``Linear(h + beta) = Linear(h) + W beta``; a Linear is a 1x1 conv, so its BN folds as a conv's, and the layer
    scale after it scales each output channel. In float64, rounded once.
    """
    wide = wide_dtype(weight.device)
    shift = weight.to(wide) @ beta.reshape(-1).to(wide)  # (C,): the GRN's bias through the Linear
    kernel, bias = fold_bn(weight[:, :, None, None].to(wide), bn, shift)
    scale = gamma.to(wide)
    return (kernel[:, :, 0, 0] * scale[:, None]).to(weight.dtype), (bias * scale).to(weight.dtype)


class UniRepLKNetStage(nn.Module):
    """A downsampling conv (stride 2) with a LayerNorm, then the stage's blocks."""

    def __init__(self, in_channels: int, out_channels: int, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), LayerNorm2d(out_channels, eps=1e-6)
        )
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class NormClassifierHead(ClassifierHead):
    """Global average pool, LayerNorm, dropout, linear: upstream's ``head(norm(x.mean([-2, -1])))``."""

    def __init__(self, in_features: int, num_classes: int, *, drop_rate: float = 0.0):
        super().__init__(in_features, num_classes, drop_rate=drop_rate)
        self.norm = nn.LayerNorm(in_features, eps=1e-6)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.norm(self.pool(x).flatten(1)))  # (B, C)
        return x if pre_logits else self.fc(x)


def _pretrained_cfg(name: str, cfg: UniRepLKNetConfig) -> dict:
    """timm's ``pretrained_cfg`` keys for a variant: what its weights are and how they expect images."""
    return imagenet_pretrained_cfg(
        name,
        tag=None,  # timm publishes none; AILab-CVC's files (upstream_weights) load with pretrained=PATH
        image_size=cfg.image_size,
        crop_pct=cfg.crop_pct,
        interpolation="bicubic",
        first_conv="stem.0",
        upstream_weights=f"https://huggingface.co/DingXiaoH/UniRepLKNet/blob/main/{cfg.upstream_file}"
        if cfg.upstream_file
        else None,
        block_modes=("offline",),  # the dilated branches have no online form (repblocks.online) yet
    )


class UniRepLKNet(RepNet):
    """UniRepLKNet classifier or backbone.

    Feature levels: 0 = the stem's first conv (stride 2), 1-4 = the four stages (stride 4, 8, 16, 32).

    Args:
        cfg: The architecture (a row of ``UNIREPLKNET_CONFIGS``).
        num_classes: Classifier outputs; 0 keeps pooled (and LayerNorm-ed) features.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        bn_eps: The eps of every BatchNorm (the LayerNorms keep upstream's 1e-6).
        deploy: Build the fused form directly (upstream's form after ``reparameterize_unireplknet()``).
        block_mode: ``"offline"`` only: the dilated branches have no online form (:mod:`repblocks.online`) yet.
        features_only: A backbone: no classifier, no stages past the last level in ``out_indices``.
        out_indices: With ``features_only``, the levels to return (see :class:`~repblocks.models.base.RepNet`).
    """

    def __init__(
        self,
        cfg: UniRepLKNetConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
        block_mode: str = "offline",
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
    ):
        if resolve_block_mode(block_mode) is not RepBlock:
            raise ValueError(
                f"UniRepLKNet trains in block_mode 'offline' only: its dilated branches have no online form yet, "
                f"got block_mode={block_mode!r}"
            )
        stem_channels = cfg.dims[0] // 2
        super().__init__(
            (stem_channels, *cfg.dims),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            features_only=features_only,
            out_indices=out_indices,
        )
        self.cfg = cfg
        self.bn_eps = bn_eps  # recorded with the weights we save, so they are rebuilt with it
        block = partial(
            UniRepLKNetBlock,
            ffn_factor=cfg.ffn_factor,
            layer_scale=cfg.layer_scale,
            bn_eps=bn_eps,
            deploy=deploy,
        )
        stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_channels, 3, stride=2, padding=1), LayerNorm2d(stem_channels, eps=1e-6), nn.GELU()
        )
        stages, channels = [], stem_channels
        for dim, kernels in list(zip(cfg.dims, cfg.kernel_sizes, strict=True))[: self.num_stages_to_build]:
            stages.append(UniRepLKNetStage(channels, dim, [block(dim, k) for k in kernels]))
            channels = dim
        self._assemble(stem, stages)
        if self.head is not None:
            self.head = NormClassifierHead(self.num_features, num_classes, drop_rate=drop_rate)

    def switch_to_deploy(self, keep_post_bn: bool = False) -> UniRepLKNet:
        """Fuse every block in place (idempotent) and return the model: each dwconv, then each FFN."""
        for module in self.modules():
            if isinstance(module, UniRepLKNetBlock):
                module.deploy_form(keep_post_bn=keep_post_bn)
        return self


for _name, _cfg in UNIREPLKNET_CONFIGS.items():
    register_model(_name, partial(UniRepLKNet, _cfg), pretrained_cfg=_pretrained_cfg(_name, _cfg))
