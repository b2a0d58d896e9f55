"""RepViT: Revisiting Mobile CNN From ViT Perspective.

Wang, Chen, Lin, Pu, Ding. CVPR 2024. https://arxiv.org/abs/2307.09283
Code and weights: https://github.com/THU-MIG/RepViT (timm re-publishes them as ``repvit_*.dist_*_in1k``).

A MobileNetV3-style network with a ViT's block split: a stem of two 3x3 stride-2 Conv+BN (GELU
between), then four stages. Each stage but the first opens with a downsample (a block of the previous
width, a depthwise kxk stride-2 Conv+BN, a 1x1 Conv+BN to the new width and a residual MLP); every
block is a token mixer (RepVGG-style depthwise: kxk Conv+BN + 1x1 conv with bias + identity, one
BatchNorm after the sum), squeeze-excitation on every other block, and a residual MLP (1x1 Conv+BN,
GELU, 1x1 Conv+BN). The classifier is BatchNorm -> Linear, twice with a distillation head; at
evaluation the two are averaged.

Re-parameterized here, each by the module that holds it: every Conv+BN and the token mixer are
:class:`~repblocks.blocks.RepBlock` (the token mixer with the ``"repvit_dw"`` branch set), and the
classifier (:class:`RepVitHead`) folds its BatchNorms into its Linears and averages the two heads
into one. The deploy form is a plain network of convolutions, SE, GELU and one Linear.

Module names are timm's (``stem.conv1``, ``stages.i.downsample.pre_block``, ``token_mixer``,
``channel_mixer.conv1``, ...) with our branch names inside each block; ``repblocks.layouts`` renames
timm's and the authors' keys (layouts ``timm_repvit`` and ``thu_repvit``). Each variant is one row of
``REPVIT_CONFIGS``; timm's ``legacy`` variants (``repvit_m1/m2/m3``, a Conv+BN 1x1 in the token mixer
and no BatchNorm after the sum) are not registered. timm's published weights load from their file
(``create_model(name, pretrained=PATH)``, timm's layout); ``pretrained=True`` does not fetch them yet, as the
classifier refitting of :mod:`repblocks.pretrained` knows one classifier per model, not a second head.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from repblocks.blocks import (
    BRANCH_SETS,
    DEFAULT_BN_EPS,
    ActFactory,
    RepBlock,
    SqueezeExcite,
    check_bn_eps,
    resolve_act,
)
from repblocks.folds import DeployForm, checked_fold, conv_probe
from repblocks.fusion import average_linears, fold_bn_into_linear
from repblocks.models.base import ClassifierHead, RepNet, imagenet_pretrained_cfg
from repblocks.online import resolve_block_mode
from repblocks.registry import register_model

__all__ = ["REPVIT_CONFIGS", "RepVit", "RepVitConfig", "RepVitHead"]


@dataclass(frozen=True)
class RepVitConfig:
    """Architecture of one RepViT variant (timm's ``embed_dim``, ``depth``), and the images its weights expect."""

    widths: tuple[int, int, int, int]  # channels of stages 1-4 (timm's embed_dim)
    depths: tuple[int, int, int, int]  # blocks per stage after its downsample (timm's depth)
    mlp_ratio: int = 2  # hidden channels of every MLP, as a multiple of its input
    kernel_size: int = 3  # the token mixers' and the downsamples' depthwise kernel
    image_size: int = 224  # side of the images the weights were evaluated at
    crop_pct: float = 0.95  # evaluation: resize to image_size / crop_pct, then centre-crop image_size

    @property
    def stem_channels(self) -> int:
        return self.widths[0]


REPVIT_CONFIGS: dict[str, RepVitConfig] = {
    "repvit_m0_9": RepVitConfig((48, 96, 192, 384), (2, 2, 14, 2)),
    "repvit_m1_0": RepVitConfig((56, 112, 224, 448), (2, 2, 14, 2)),
    "repvit_m1_5": RepVitConfig((64, 128, 256, 512), (4, 4, 24, 4)),
    # For tests and smoke runs: SE and plain blocks, every downsample, in a few ms on 32x32 images.
    "repvit_tiny": RepVitConfig((8, 16, 16, 24), (2, 1, 1, 1), image_size=32, crop_pct=1.0),
}


def _pretrained_cfg(name: str, cfg: RepVitConfig) -> dict:
    """timm's ``pretrained_cfg`` keys for a variant (no ``hf_hub_id``: see the module docstring)."""
    return imagenet_pretrained_cfg(
        name,
        tag=None,
        image_size=cfg.image_size,
        crop_pct=cfg.crop_pct,
        interpolation="bicubic",
        first_conv="stem.conv1.conv_kxk.conv",  # deploy form: stem.conv1.reparam
    )


def _se_hidden(channels: int) -> int:
    """timm's SqueezeExcite(channels, 0.25): a quarter of the channels, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(channels * 0.25 + 4) // 8 * 8)


class RepVitMlp(nn.Module):
    """1x1 Conv+BN, activation, 1x1 Conv+BN: the channel mixer (the residual is added by the caller)."""

    def __init__(self, channels: int, hidden: int, conv_bn):
        super().__init__()
        self.conv1 = conv_bn(channels, hidden, 1, act=True)
        self.conv2 = conv_bn(hidden, channels, 1)
        # The residual starts as the identity, as timm's bn_weight_init=0 (the online block's one BN: post_bn).
        last_bn = None if self.conv2.deploy else getattr(self.conv2.conv_kxk, "bn", None) or self.conv2.post_bn
        if last_bn is not None:
            nn.init.zeros_(last_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class RepVitBlock(nn.Module):
    """Token mixer (re-parameterizable depthwise), optional SE, then a residual MLP."""

    def __init__(self, channels: int, *, mlp_ratio: int, use_se: bool, token_mixer, conv_bn):
        super().__init__()
        self.token_mixer = token_mixer(channels)
        self.se = SqueezeExcite(channels, hidden_channels=_se_hidden(channels)) if use_se else nn.Identity()
        self.channel_mixer = RepVitMlp(channels, channels * mlp_ratio, conv_bn)

    def forward(self, x: Tensor) -> Tensor:
        x = self.se(self.token_mixer(x))
        return x + self.channel_mixer(x)


class RepVitDownsample(nn.Module):
    """A block of the previous width, depthwise kxk stride 2, 1x1 to the new width, then a residual MLP."""

    def __init__(self, in_channels: int, out_channels: int, *, mlp_ratio: int, kernel_size: int, token_mixer, conv_bn):
        super().__init__()
        self.pre_block = RepVitBlock(
            in_channels, mlp_ratio=mlp_ratio, use_se=False, token_mixer=token_mixer, conv_bn=conv_bn
        )
        self.spatial_downsample = conv_bn(in_channels, in_channels, kernel_size, stride=2, groups=in_channels)
        self.channel_downsample = conv_bn(in_channels, out_channels, 1)
        self.ffn = RepVitMlp(out_channels, out_channels * mlp_ratio, conv_bn)

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.ffn(x)


class RepVitStage(nn.Module):
    """A downsample (none in the first stage), then blocks with SE on every other one, the first included."""

    def __init__(self, downsample: nn.Module | None, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class RepVitHead(ClassifierHead):
    """Global average pool, dropout, BatchNorm -> Linear, and with ``distillation`` a second one averaged with it.

    The deploy form (:meth:`deploy_form`) is :class:`~repblocks.models.base.ClassifierHead`'s: one Linear
    ``fc``, each BatchNorm folded into the Linear after it (``fold_bn_into_linear``) and the two heads
    averaged into one (``average_linears``), in float64, rounded once each. timm's ``distilled_training``
    (both heads' logits in training, for a distillation loss) is not offered: the heads are always averaged.

    Args:
        in_features: Channels of the last feature map.
        num_classes: Classifier outputs; 0 keeps pooled features.
        distillation: A second head ``fc_dist`` (with ``norm_dist``), as the published weights have.
        drop_rate: Dropout before the classifier.
        bn_eps: The eps of the BatchNorms.
        deploy: Build the plain deploy form (``fc`` only).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        distillation: bool = True,
        drop_rate: float = 0.0,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
    ):
        super().__init__(in_features, num_classes, drop_rate=drop_rate)
        self.distillation = distillation
        self.bn_eps = check_bn_eps(bn_eps)
        self._build(num_classes, deploy=deploy)

    def _build(self, num_classes: int, *, deploy: bool) -> None:
        self.is_deploy = deploy
        train = num_classes > 0 and not deploy
        norm = partial(nn.BatchNorm1d, self.in_features, eps=self.bn_eps)
        self.norm = norm() if train else None
        self.norm_dist = norm() if train and self.distillation else None
        self.fc_dist = nn.Linear(self.in_features, num_classes) if train and self.distillation else None
        if train:  # timm's NormLinear: weights from N(0, 0.02), zero bias
            for fc in (self.fc, self.fc_dist):
                if fc is not None:
                    nn.init.trunc_normal_(fc.weight, std=0.02)
                    nn.init.zeros_(fc.bias)

    @property
    def deploy(self) -> bool:
        """True once the BatchNorms are folded and the heads averaged into ``fc``."""
        return self.is_deploy

    def reset(self, num_classes: int) -> None:
        """A fresh classifier of ``num_classes`` outputs (0 removes it), in this head's form."""
        super().reset(num_classes)
        self._build(num_classes, deploy=self.deploy)

    def train_form(self) -> RepVitHead:
        """An empty twin of this head in train form, on the CPU: what ``load_weights`` fuses train-form weights through."""
        num_classes = self.fc.out_features if isinstance(self.fc, nn.Linear) else 0
        with torch.device("meta"):  # no init of weights about to be loaded
            twin = RepVitHead(self.in_features, num_classes, distillation=self.distillation, bn_eps=self.bn_eps)
        return twin.to_empty(device="cpu")

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))  # (B, C)
        if pre_logits or self.norm is None:
            return x if pre_logits else self.fc(x)
        logits = self.fc(self.norm(x))
        if self.fc_dist is not None:
            logits = (logits + self.fc_dist(self.norm_dist(x))) / 2
        return logits

    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm:
        """This head folded in place (:meth:`switch_to_deploy`), checked on a float64 feature map: the fold protocol."""
        if self.deploy or self.norm is None:  # folded, or no classifier to fold
            return DeployForm(self.switch_to_deploy())
        probe = conv_probe(self.in_features, (2, 2), (1, 1), device=self.fc.weight.device)  # (1, C, 2, 2)
        with checked_fold(self, verify=verify, probe=probe):
            self.switch_to_deploy()
        return DeployForm(self)

    @torch.no_grad()
    def switch_to_deploy(self) -> RepVitHead:
        """Fold the BatchNorms into the Linears and average the heads into ``fc``, in place. Calling it again does nothing."""
        if self.deploy:
            return self
        self.is_deploy = True
        if self.norm is None:  # no classifier: nothing to fold
            return self
        heads = [(self.norm, self.fc), (self.norm_dist, self.fc_dist)]
        weight, bias = average_linears([fold_bn_into_linear(norm, fc) for norm, fc in heads if norm is not None])
        requires_grad = self.fc.weight.requires_grad
        fused = nn.Linear(self.in_features, self.fc.out_features, device="meta")  # no init of weights replaced now
        fused.weight = nn.Parameter(weight, requires_grad=requires_grad)
        fused.bias = nn.Parameter(bias, requires_grad=requires_grad)
        self.fc = fused
        self.norm = self.norm_dist = self.fc_dist = None
        return self


class RepVit(RepNet):
    """RepViT classifier or backbone.

    Feature levels: 0 = the stem (stride 4), 1-4 = the four stages (stride 4, 8, 16, 32); the stem and
    the first stage share a stride, as the first stage does not downsample.

    Args:
        cfg: The architecture (a row of ``REPVIT_CONFIGS``).
        num_classes: Classifier outputs; 0 keeps pooled features.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        act: Activation of the stem and of every MLP: a name (``"gelu"``, see ``repblocks.blocks.ACTIVATIONS``)
            or a factory (``nn.GELU``).
        distillation: A second (distillation) classifier head averaged with the first, as the published
            weights have; it folds into one Linear at deploy.
        bn_eps: The eps of every BatchNorm (the classifier's included).
        deploy: Build the plain deploy form directly.
        block_mode: ``"offline"`` or ``"online"`` (repblocks.online: every Conv+BN trains as OREPA's online
            block; the token mixers stay offline, as the online block has no form for their 1x1 conv's bias).
        features_only: A backbone: no classifier, no stages past the last level in ``out_indices``,
            and ``forward`` returns the feature maps of ``out_indices``.
        out_indices: With ``features_only``, the levels to return: a sequence (negative counts from
            the end, as in timm) or n for the last n levels. All five by default.
    """

    def __init__(
        self,
        cfg: RepVitConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        act: str | ActFactory | None = "gelu",
        distillation: bool = True,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
        block_mode: str = "offline",
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
    ):
        block_class = resolve_block_mode(block_mode)
        super().__init__(
            (cfg.stem_channels, *cfg.widths),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            features_only=features_only,
            out_indices=out_indices,
        )
        self.feature_info.info[0]["reduction"] = 4  # the stem's two stride-2 convs
        self.cfg = cfg
        self.bn_eps = bn_eps  # recorded with the weights we save, so they are rebuilt with it
        activation = resolve_act(act)
        block = partial(block_class, bn_eps=bn_eps, deploy=deploy)

        def conv_bn(in_channels, out_channels, kernel_size, *, stride=1, groups=1, act=False):
            # One Conv+BN: a RepBlock with its kxk branch only, so that it folds (and loads) like every block.
            only_kxk = dict(scale_branch=None, identity_branch=None)
            shape = dict(kernel_size=kernel_size, stride=stride, groups=groups)
            return block(in_channels, out_channels, **shape, **only_kxk, act=activation if act else None)

        def token_mixer(channels):
            # Offline in either block mode: the online block refuses the 1x1's bias before its one BatchNorm.
            shape = dict(kernel_size=cfg.kernel_size, groups=channels, bn_eps=bn_eps, deploy=deploy)
            return RepBlock(channels, channels, **shape, **BRANCH_SETS["repvit_dw"], act=None)

        stem = nn.Sequential(
            OrderedDict(
                conv1=conv_bn(in_chans, cfg.stem_channels // 2, 3, stride=2, act=True),
                conv2=conv_bn(cfg.stem_channels // 2, cfg.stem_channels, 3, stride=2),
            )
        )
        parts = dict(mlp_ratio=cfg.mlp_ratio, token_mixer=token_mixer, conv_bn=conv_bn)
        stages, channels = [], cfg.stem_channels
        for index, (depth, width) in enumerate(
            list(zip(cfg.depths, cfg.widths, strict=True))[: self.num_stages_to_build]
        ):
            downsample = RepVitDownsample(channels, width, kernel_size=cfg.kernel_size, **parts) if index > 0 else None
            blocks = [RepVitBlock(width, use_se=block_idx % 2 == 0, **parts) for block_idx in range(depth)]
            stages.append(RepVitStage(downsample, blocks))
            channels = width
        self._assemble(stem, stages)
        if self.head is not None:
            self.head = RepVitHead(
                self.num_features,
                num_classes,
                distillation=distillation,
                drop_rate=drop_rate,
                bn_eps=bn_eps,
                deploy=deploy,
            )

    def switch_to_deploy(self, keep_post_bn: bool = False) -> RepVit:
        """Fuse every block and the classifier in place (idempotent) and return the model."""
        super().switch_to_deploy(keep_post_bn=keep_post_bn)
        if isinstance(self.head, RepVitHead):
            self.head.deploy_form()
        return self


for _name, _cfg in REPVIT_CONFIGS.items():
    register_model(_name, partial(RepVit, _cfg), pretrained_cfg=_pretrained_cfg(_name, _cfg))
