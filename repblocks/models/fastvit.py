"""FastViT: A Fast Hybrid Vision Transformer using Structural Reparameterization.

Vasu, Gabriel, Zhu, Tuzel, Ranjan. ICCV 2023. https://arxiv.org/abs/2303.14189
Code and weights: https://github.com/apple/ml-fastvit (timm re-publishes them as ``fastvit_*.apple_in1k``).

A stem of three MobileOne blocks (3x3 stride 2, depthwise 3x3 stride 2, 1x1: stride 4 in all), then
four stages. Stages 2-4 start with a patch embedding (a depthwise 7x7 stride-2 conv with a 3x3 beside it,
RepLKNet's re-parameterizable large kernel, then a 1x1 MobileOne block); SA variants add a conditional
positional encoding (``x + dwconv7x7(x)``) before the last stage's blocks. A block is a token mixer
(RepMixer: ``x + gamma * (mixer(x) - norm(x))``, or attention after a BatchNorm) and a conv FFN (depthwise
7x7 Conv+BN, 1x1, GELU, 1x1), each behind a layer scale. A depthwise-multiplier MobileOne block with SE
(``final_conv``) doubles the channels before the classifier.

Every re-parameterizable part folds into one conv through the one algebra of :mod:`repblocks.fusion`:
the MobileOne blocks and the large-kernel conv are :class:`~repblocks.blocks.RepBlock` s (the large
kernel's 3x3 as an ``extra_kernels`` branch), RepMixer is a plain identity plus its mixer's branches scaled
by ``gamma`` minus its norm's BN identity scaled by ``gamma``, RepCPE a plain identity plus a biased conv,
the FFN's depthwise Conv+BN a one-branch RepBlock. Attention stays as it is; the BatchNorm before it folds
into its ``qkv`` projection (timm keeps that BatchNorm, and the FFN's, unfused).

Module names are timm's (``stem.0``, ``stages.i.downsample.proj.0``, ``blocks.j.token_mixer.mixer``,
``mlp.conv``, ``pos_emb.pos_enc``, ``final_conv``, ``head.fc``) but for RepBlock's branch names:
``conv_1x1`` (timm's ``conv_scale``), ``reparam`` (``reparam_conv``), ``se.down/up`` (``se.fc1/fc2``), the
large kernel's ``conv_kxk``/``conv_extra.0`` (``large_conv``/``small_conv``) and the FFN's ``conv.conv_kxk``
(``conv``): the ``timm_fastvit`` layout of :mod:`repblocks.layouts` renames them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblocks.blocks import DEFAULT_BN_EPS, ActFactory, ConvBN, RepBlock, check_int, resolve_act
from repblocks.features import resolve_indices
from repblocks.folds import DeployForm, Reparameterizable, checked_fold, conv_probe
from repblocks.fusion import ConvBranch, IdentityBranch, equivalent_kernel_bias, fold_bn_into_linear
from repblocks.models.base import ClassifierHead, RepNet, imagenet_pretrained_cfg
from repblocks.online import resolve_block_mode
from repblocks.registry import register_model

__all__ = [
    "FASTVIT_CONFIGS",
    "AttentionBlock",
    "FastViT",
    "FastViTConfig",
    "RepConditionalPosEnc",
    "RepMixer",
    "RepMixerBlock",
]


@dataclass(frozen=True)
class FastViTConfig:
    """Architecture of one FastViT variant, and the images its published weights expect."""

    depths: tuple[int, int, int, int]  # blocks per stage
    widths: tuple[int, int, int, int]  # channels of each stage (timm's embed_dims); the stem has the first
    mlp_ratio: float  # hidden channels of every conv FFN, as a multiple of its stage's width
    token_mixers: tuple[str, str, str, str] = ("repmixer",) * 4  # "repmixer" or "attention", per stage
    pos_embs: tuple[bool, bool, bool, bool] = (False,) * 4  # a RepCPE before the stage's blocks (SA variants)
    head_dim: int = 32  # channels per attention head
    cls_ratio: float = 2.0  # final_conv's channels, as a multiple of the last stage's width
    image_size: int = 256  # side of the images the weights were evaluated at
    crop_pct: float = 0.9  # evaluation: resize to image_size / crop_pct, then centre-crop image_size
    timm_tag: str | None = "apple_in1k"  # timm publishes apple's weights as "<name>.<tag>"; None where none


_SA = dict(token_mixers=("repmixer", "repmixer", "repmixer", "attention"), pos_embs=(False, False, False, True))
FASTVIT_CONFIGS: dict[str, FastViTConfig] = {
    "fastvit_t8": FastViTConfig((2, 2, 4, 2), (48, 96, 192, 384), mlp_ratio=3),
    "fastvit_t12": FastViTConfig((2, 2, 6, 2), (64, 128, 256, 512), mlp_ratio=3),
    "fastvit_s12": FastViTConfig((2, 2, 6, 2), (64, 128, 256, 512), mlp_ratio=4),
    "fastvit_sa12": FastViTConfig((2, 2, 6, 2), (64, 128, 256, 512), mlp_ratio=4, **_SA),
    # For tests and smoke runs: every kind of part (RepMixer, RepCPE, attention, SE) in a few ms on 32x32 images.
    "fastvit_tiny": FastViTConfig(
        (1, 1, 1, 1), (16, 32, 32, 64), mlp_ratio=2, image_size=32, crop_pct=1.0, timm_tag=None, **_SA
    ),
}


def _pretrained_cfg(name: str, cfg: FastViTConfig) -> dict:
    """timm's ``pretrained_cfg`` keys for a variant: what its weights are and how they expect images."""
    return imagenet_pretrained_cfg(
        name,
        tag=cfg.timm_tag,
        image_size=cfg.image_size,
        crop_pct=cfg.crop_pct,
        interpolation="bicubic",
        first_conv=("stem.0.conv_kxk.0.conv", "stem.0.conv_1x1.conv"),  # deploy form: stem.0.reparam
    )


class LayerScale2d(nn.Module):
    """A learned per-channel factor ``gamma`` (timm's name), started small so a residual branch starts near zero."""

    def __init__(self, channels: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Folding(nn.Module):
    """What FastViT's own re-parameterizable parts share: a fused conv ``reparam`` and the fold protocol."""

    reparam: nn.Conv2d | None
    _train_kwargs: dict = {}  # what train_form's twin is built with beside channels and kernel size

    @property
    def deploy(self) -> bool:
        return self.reparam is not None

    def train_form(self) -> _Folding:
        """An empty twin in train form, on the CPU: what ``load_weights`` fuses train-form weights through."""
        with torch.device("meta"):  # no init of weights about to be loaded
            twin = type(self)(self.channels, self.kernel_size, **self._train_kwargs)
        return twin.to_empty(device="cpu")

    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm:
        """This module fused in place (:meth:`switch_to_deploy`), checked against its train form: the fold protocol."""
        if self.deploy:
            return DeployForm(self)
        weight = next(self.parameters())
        probe = conv_probe(self.channels, (self.kernel_size,) * 2, (1, 1), device=weight.device)
        with checked_fold(self, verify=verify, probe=probe):
            self.switch_to_deploy()
        return DeployForm(self)

    @torch.no_grad()
    def switch_to_deploy(self) -> _Folding:
        """Replace the branches by one fused depthwise conv, in place. Calling it again does nothing."""
        if self.deploy:
            return self
        kernel, bias = self.get_equivalent_kernel_bias()
        fused = self._fused_conv(device="meta")
        requires_grad = next(self.parameters()).requires_grad
        fused.weight = nn.Parameter(kernel.detach(), requires_grad=requires_grad)
        fused.bias = nn.Parameter(bias.detach(), requires_grad=requires_grad)
        self._drop_branches()
        self.reparam = fused
        return self

    def _fused_conv(self, device: str | None = None) -> nn.Conv2d:
        size = self.kernel_size
        return nn.Conv2d(self.channels, self.channels, size, padding=size // 2, groups=self.channels, device=device)


class _IdentityNorm(nn.Module):
    """RepMixer's ``norm``: a BatchNorm of the input (timm's MobileOne block with only its identity branch)."""

    def __init__(self, channels: int, *, bn_eps: float):
        super().__init__()
        self.identity = nn.BatchNorm2d(channels, eps=bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.identity(x)


class _MixerBranches(nn.Module):
    """RepMixer's ``mixer``: a depthwise MobileOne block without activation, its branches held for RepMixer to fold.

    Not a RepBlock on purpose: RepMixer folds these branches, scaled by its ``gamma``, together with its
    identities in one float64 sum; a RepBlock here would be fused (and rounded) on its own first.
    """

    def __init__(self, channels: int, kernel_size: int, *, num_conv_branches: int, bn_eps: float):
        super().__init__()
        conv_bn = partial(ConvBN, channels, channels, groups=channels, bn_eps=bn_eps)
        self.conv_kxk = nn.ModuleList(conv_bn(kernel_size) for _ in range(num_conv_branches))
        self.conv_1x1 = conv_bn(1)
        self.identity = nn.BatchNorm2d(channels, eps=bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_1x1(x) + self.identity(x)
        for branch in self.conv_kxk:
            out = out + branch(x)
        return out

    def conv_branches(self, scale: Tensor) -> list[ConvBranch]:
        branches = [*self.conv_kxk, self.conv_1x1]
        return [ConvBranch(branch.conv.weight, branch.bn, scale=scale) for branch in branches]


class RepMixer(_Folding):
    """FastViT's token mixer ``x + gamma * (mixer(x) - norm(x))``, one depthwise conv in deploy form.

    Args:
        channels: Input and output channels.
        kernel_size: The mixer's depthwise kernel.
        layer_scale_init: ``gamma``'s initial value.
        bn_eps: The eps of every BatchNorm.
        deploy: Build only the fused conv ``reparam``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        layer_scale_init: float = 1e-5,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
    ):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self._train_kwargs = dict(bn_eps=bn_eps)
        self.reparam = self._fused_conv() if deploy else None
        if not deploy:
            self.norm = _IdentityNorm(channels, bn_eps=bn_eps)
            self.mixer = _MixerBranches(channels, kernel_size, num_conv_branches=1, bn_eps=bn_eps)
            self.layer_scale = LayerScale2d(channels, layer_scale_init)

    def _drop_branches(self) -> None:
        del self.norm, self.mixer, self.layer_scale

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam is not None:
            return self.reparam(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the one depthwise conv equal to the mixer in eval mode (differentiable)."""
        if self.reparam is not None:
            return self.reparam.weight, self.reparam.bias
        gamma = self.layer_scale.gamma.flatten()  # (C,)
        identities = [
            IdentityBranch(self.mixer.identity, scale=gamma),
            IdentityBranch(self.norm.identity, scale=-gamma),
        ]
        branches = self.mixer.conv_branches(gamma)
        return equivalent_kernel_bias(branches, nn.Identity(), identities=identities, kernel_size=self.kernel_size)


class RepConditionalPosEnc(_Folding):
    """Conditional positional encoding ``x + dwconv(x)`` (Chu et al. 2021), one depthwise conv in deploy form."""

    def __init__(self, channels: int, kernel_size: int = 7, *, deploy: bool = False):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.reparam = self._fused_conv() if deploy else None
        self.pos_enc = None if deploy else self._fused_conv()

    def _drop_branches(self) -> None:
        self.pos_enc = None

    def forward(self, x: Tensor) -> Tensor:
        return self.reparam(x) if self.reparam is not None else x + self.pos_enc(x)

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        if self.reparam is not None:
            return self.reparam.weight, self.reparam.bias
        branch = ConvBranch(self.pos_enc.weight, bias=self.pos_enc.bias)
        return equivalent_kernel_bias([branch], nn.Identity(), kernel_size=self.kernel_size)


class ConvMlp(nn.Module):
    """FastViT's conv FFN: a depthwise 7x7 Conv+BN (a one-branch RepBlock), 1x1, activation, 1x1."""

    def __init__(self, channels: int, hidden: int, *, act: ActFactory, bn_eps: float, drop: float, deploy: bool):
        super().__init__()
        self.conv = RepBlock(
            channels,
            channels,
            groups=channels,
            kernel_size=7,
            scale_branch=None,
            identity_branch=None,
            act=None,
            bn_eps=bn_eps,
            deploy=deploy,
        )
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.conv(x))))))


class RepMixerBlock(nn.Module):
    """A MetaFormer block with RepMixer as its token mixer: ``x = mixer(x); x + gamma * mlp(x)``."""

    def __init__(self, channels: int, hidden: int, *, act: ActFactory, bn_eps: float, drop: float, deploy: bool):
        super().__init__()
        self.token_mixer = RepMixer(channels, bn_eps=bn_eps, deploy=deploy)
        self.mlp = ConvMlp(channels, hidden, act=act, bn_eps=bn_eps, drop=drop, deploy=deploy)
        self.layer_scale = LayerScale2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a ``(B, C, H, W)`` map (timm's FastViT ``Attention``)."""

    def __init__(self, channels: int, head_dim: int, *, qkv_bias: bool = False):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.head_dim = head_dim
        self.num_heads = channels // head_dim
        self.qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(-2, -1)  # (B, N, C)
        qkv = self.qkv(tokens).reshape(batch, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # (B, heads, N, head_dim) each
        out = F.scaled_dot_product_attention(query, key, value)
        out = self.proj(out.transpose(1, 2).reshape(batch, -1, channels))  # (B, N, C)
        return out.transpose(-2, -1).reshape(batch, channels, height, width)


class AttentionBlock(nn.Module):
    """A MetaFormer block with attention: ``x + gamma1 * attn(norm(x))``, then ``x + gamma2 * mlp(x)``.

    Its deploy form folds the BatchNorm ``norm`` into the attention's ``qkv`` projection (which gains a
    bias): a per-channel affine map before a per-token linear one is one linear map.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        *,
        head_dim: int,
        act: ActFactory,
        bn_eps: float,
        drop: float,
        deploy: bool,
    ):
        super().__init__()
        self.bn_eps = bn_eps  # norm's: what train-form weights loaded into the deploy form are folded with
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(channels, eps=bn_eps)
        self.token_mixer = Attention(channels, head_dim, qkv_bias=deploy)
        self.layer_scale_1 = LayerScale2d(channels)
        self.mlp = ConvMlp(channels, hidden, act=act, bn_eps=bn_eps, drop=drop, deploy=deploy)
        self.layer_scale_2 = LayerScale2d(channels)

    @property
    def deploy(self) -> bool:
        return isinstance(self.norm, nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))

    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm:
        """The norm folded into ``qkv`` in place, checked against the block before (the fold protocol)."""
        if self.deploy:
            return DeployForm(self)
        qkv = self.token_mixer.qkv
        probe = conv_probe(qkv.in_features, (3, 3), (1, 1), device=qkv.weight.device)
        with checked_fold(self, verify=verify, probe=probe), torch.no_grad():
            weight, bias = fold_bn_into_linear(self.norm, qkv)
            qkv.weight = nn.Parameter(weight, requires_grad=qkv.weight.requires_grad)
            qkv.bias = nn.Parameter(bias, requires_grad=qkv.weight.requires_grad)
            self.norm = nn.Identity()
        return DeployForm(self)

    def fold_train_weights(self, given: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """This deploy-form block's weights from train-form ones (keys below the block), for :func:`repblocks.load_weights`.

        The MLP's RepBlocks are fused by the loader as every RepBlock's; this folds ``norm`` into ``qkv``, in
        float64, rounded once. None when there is nothing to fold (the block's own form, or keys missing:
        reported as usual).
        """
        train_keys = {
            "token_mixer.qkv.weight",
            *(f"norm.{k}" for k in ("weight", "bias", "running_mean", "running_var")),
        }
        if not self.deploy or not train_keys <= given.keys() or "token_mixer.qkv.bias" in given:
            return None
        qkv = self.token_mixer.qkv
        norm = nn.BatchNorm2d(qkv.in_features, eps=self.bn_eps, dtype=torch.float64)
        norm.load_state_dict(
            {k: given[f"norm.{k}"].double() for k in ("weight", "bias", "running_mean", "running_var")}, strict=False
        )
        linear = nn.Linear(qkv.in_features, qkv.out_features, bias=False, dtype=torch.float64)
        linear.weight.data.copy_(given["token_mixer.qkv.weight"].double())
        with torch.no_grad():
            weight, bias = fold_bn_into_linear(norm.eval(), linear)
        kept = {k: v for k, v in given.items() if not k.startswith("norm.") and k != "token_mixer.qkv.weight"}
        dtype = qkv.weight.dtype
        return {**kept, "token_mixer.qkv.weight": weight.to(dtype), "token_mixer.qkv.bias": bias.to(dtype)}


class PatchEmbed(nn.Module):
    """FastViT's downsampling: a re-parameterizable large depthwise kernel (RepLKNet's, with a 3x3 beside it)
    at stride 2 that widens the channels, then a 1x1 MobileOne block."""

    def __init__(self, in_channels: int, out_channels: int, *, block: partial, bn_eps: float, deploy: bool):
        super().__init__()
        large_kernel = RepBlock(
            in_channels,
            out_channels,
            stride=2,
            groups=in_channels,
            kernel_size=7,
            scale_branch=None,
            identity_branch=None,
            extra_kernels=((3, 1),),
            act=None,  # apple's weights were trained without it (timm: lkc_use_act=False)
            bn_eps=bn_eps,
            deploy=deploy,
        )
        self.proj = nn.Sequential(large_kernel, block(out_channels, out_channels, kernel_size=1, scale_branch=None))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class FastViTStage(nn.Module):
    """A stage: an optional patch embedding and positional encoding, then its blocks (timm's ``FastVitStage``)."""

    def __init__(self, downsample: nn.Module, pos_emb: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.pos_emb = pos_emb
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pos_emb(self.downsample(x)))


class FastViT(RepNet):
    """FastViT classifier or backbone.

    Feature levels: 0 = the stem (stride 4), 1-4 = the four stages (stride 4, 8, 16, 32); the classifier
    reads ``final_conv`` of the last one. ``feature_info`` describes them as timm does.

    Args:
        cfg: The architecture (a row of ``FASTVIT_CONFIGS``).
        num_classes: Classifier outputs; 0 keeps pooled features.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout in every conv FFN.
        act: Activation of every block and FFN: a name (``"gelu"``, FastViT's) or a factory.
        bn_eps: The eps of every BatchNorm.
        deploy: Build the plain deploy form directly.
        block_mode: ``"offline"`` or ``"online"`` for the MobileOne blocks (stem, patch embeddings,
            ``final_conv``); RepMixer, RepCPE and the large kernels train as they are either way.
        features_only: A backbone: no ``final_conv`` or classifier, no stages past the last level in
            ``out_indices``, and ``forward`` returns the feature maps of ``out_indices``.
        out_indices: With ``features_only``, the levels to return (all five by default).
    """

    def __init__(
        self,
        cfg: FastViTConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        act: str | ActFactory | None = "gelu",
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
        block_mode: str = "offline",
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
    ):
        super().__init__(
            (cfg.widths[0], *cfg.widths),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            features_only=features_only,
            out_indices=out_indices,
            reductions=(4, 4, 8, 16, 32),
        )
        self.cfg = cfg
        self.bn_eps = bn_eps  # recorded with the weights we save, so they are rebuilt with it
        act = resolve_act(act) or nn.Identity
        block = partial(resolve_block_mode(block_mode), act=act, bn_eps=bn_eps, deploy=deploy, num_conv_branches=1)
        width = cfg.widths[0]
        stem = nn.Sequential(
            block(in_chans, width, stride=2),
            block(width, width, stride=2, groups=width),
            block(width, width, kernel_size=1, scale_branch=None),
        )
        parts = dict(act=act, bn_eps=bn_eps, drop=proj_drop_rate, deploy=deploy)
        stages, channels = [], width
        for index in range(self.num_stages_to_build):
            width = cfg.widths[index]
            downsample = (
                PatchEmbed(channels, width, block=block, bn_eps=bn_eps, deploy=deploy) if index > 0 else nn.Identity()
            )
            pos_emb = RepConditionalPosEnc(width, deploy=deploy) if cfg.pos_embs[index] else nn.Identity()
            hidden = int(width * cfg.mlp_ratio)
            if cfg.token_mixers[index] == "attention":
                make = partial(AttentionBlock, width, hidden, head_dim=cfg.head_dim, **parts)
            else:
                make = partial(RepMixerBlock, width, hidden, **parts)
            stages.append(FastViTStage(downsample, pos_emb, [make() for _ in range(cfg.depths[index])]))
            channels = width
        self._assemble(stem, stages)
        if not features_only:
            self.num_features = int(cfg.widths[-1] * cfg.cls_ratio)
            self.final_conv = block(channels, self.num_features, groups=channels, use_se=True)
            self.head = ClassifierHead(self.num_features, num_classes, drop_rate=drop_rate)
        else:
            self.final_conv = None

    def forward_features(self, x: Tensor) -> Tensor:
        """Image batch ``(B, C, H, W)`` to ``final_conv``'s map ``(B, num_features, H/32, W/32)``."""
        x = super().forward_features(x)
        return self.final_conv(x) if self.final_conv is not None else x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """As :meth:`RepNet.forward_intermediates`; the last map passes ``final_conv`` once the last stage ran."""
        out = super().forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)
        if intermediates_only:
            return out
        final, intermediates = out
        ran_all = not stop_early or max(resolve_indices(1 + len(self.stages), indices)) == len(self.stages)
        if self.final_conv is not None and ran_all:
            final = self.final_conv(final)
        return final, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True) -> list[int]:
        """As :meth:`RepNet.prune_intermediate_layers`; ``final_conv`` goes with the head, as in timm."""
        head = self.head
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if self.final_conv is not None and self.head is not head:
            self.final_conv = None
            self.num_features = self.feature_info.channels(len(self.stages))
            self.head = ClassifierHead(self.num_features, 0, drop_rate=self.drop_rate)
        return take

    def switch_to_deploy(self, keep_post_bn: bool = False) -> FastViT:
        """Fold every part in place (idempotent), children first, and return the model."""
        for module in reversed(list(self.modules())):
            if isinstance(module, Reparameterizable):
                module.deploy_form(keep_post_bn=keep_post_bn)
        return self


def _check_config(cfg: FastViTConfig) -> FastViTConfig:
    for index, mixer in enumerate(cfg.token_mixers):
        if mixer not in ("repmixer", "attention"):
            raise ValueError(f"stage {index + 1}'s token mixer must be 'repmixer' or 'attention', got {mixer!r}")
    for depth in cfg.depths:
        check_int(depth, "depth", minimum=1)
    return cfg


for _name, _cfg in FASTVIT_CONFIGS.items():
    register_model(_name, partial(FastViT, _check_config(_cfg)), pretrained_cfg=_pretrained_cfg(_name, _cfg))
