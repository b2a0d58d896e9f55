"""MobileOne: An Improved One millisecond Mobile Backbone.

Vasu, Gabriel, Zhu, Tuzel, Ranjan. CVPR 2023. https://arxiv.org/abs/2206.04040
Code and weights: https://github.com/apple/ml-mobileone (timm re-publishes them as ``mobileone_s*.apple_in1k``).

A stem block (3x3, stride 2, one conv branch), then four stages of block pairs: a depthwise 3x3
block (k 3x3 Conv+BN branches, a 1x1 Conv+BN "scale" branch and an identity BN), then a pointwise
1x1 block (k 1x1 Conv+BN branches and an identity BN, no scale branch: its kxk already is 1x1).
The identity exists where shapes allow; the first depthwise block of each stage strides by 2. k
over-parameterizes the training form only: every block fuses into one conv. S0 trains with k=4,
S1-S4 with k=1; S4 adds squeeze-excitation to the last half of stage 3 and all of stage 4.
Each variant is one row of ``MOBILEONE_CONFIGS``. Blocks hold their k branches as a list (``conv_kxk.0``
...) even for k=1, so train-form keys are timm's, but for its ``conv_scale`` (our ``conv_1x1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from torch import nn

from repblocks.blocks import DEFAULT_BN_EPS, ActFactory, _relu, resolve_act
from repblocks.models.base import RepNet, imagenet_pretrained_cfg
from repblocks.online import resolve_block_mode
from repblocks.registry import register_model

__all__ = ["MOBILEONE_CONFIGS", "MobileOne", "MobileOneConfig"]


@dataclass(frozen=True)
class MobileOneConfig:
    """Architecture of one MobileOne variant, and the images its published weights expect."""

    widths: tuple[float, float, float, float]  # the paper's width multipliers of stages 1-4
    num_conv_branches: int = 1  # k, the kxk branches of every block after the stem (S0: 4)
    se_blocks: tuple[int, int, int, int] = (0, 0, 0, 0)  # the last n block pairs of each stage with SE (S4)
    depths: tuple[int, int, int, int] = (2, 8, 10, 1)  # block pairs (depthwise + pointwise) per stage
    base_channels: tuple[int, int, int, int] = (64, 128, 256, 512)  # widths before the multipliers
    image_size: int = 224  # side of the images the weights were evaluated at
    crop_pct: float = 0.9  # evaluation: resize to image_size / crop_pct, then centre-crop image_size
    timm_tag: str | None = "apple_in1k"  # timm publishes apple's weights as "<name>.<tag>"; None where none

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(int(base * mult) for base, mult in zip(self.base_channels, self.widths, strict=True))

    @property
    def stem_channels(self) -> int:
        # apple's code caps the stem at 64 channels, as RepVGG does.
        return min(self.base_channels[0], self.stage_channels[0])


MOBILEONE_CONFIGS: dict[str, MobileOneConfig] = {
    "mobileone_s0": MobileOneConfig((0.75, 1.0, 1.0, 2.0), num_conv_branches=4, crop_pct=0.875),
    "mobileone_s1": MobileOneConfig((1.5, 1.5, 2.0, 2.5)),
    "mobileone_s2": MobileOneConfig((1.5, 2.0, 2.5, 4.0)),
    "mobileone_s3": MobileOneConfig((2.0, 2.5, 3.0, 4.0)),
    # apple's use_se: SE in the last half of stage 3's blocks and in all of stage 4's.
    "mobileone_s4": MobileOneConfig((3.0, 3.5, 3.5, 4.0), se_blocks=(0, 0, 5, 1)),
    # For tests and smoke runs: k > 1, SE, identities and strides in a few ms on 32x32 images.
    "mobileone_tiny": MobileOneConfig(
        (0.25, 0.25, 0.25, 0.5),
        num_conv_branches=2,
        se_blocks=(0, 0, 1, 1),
        depths=(2, 2, 2, 1),
        image_size=32,
        crop_pct=1.0,
        timm_tag=None,
    ),
}


def _pretrained_cfg(name: str, cfg: MobileOneConfig) -> dict:
    """timm's ``pretrained_cfg`` keys for a variant: what its weights are and how they expect images."""
    return imagenet_pretrained_cfg(
        name,
        tag=cfg.timm_tag,
        image_size=cfg.image_size,
        crop_pct=cfg.crop_pct,
        interpolation="bilinear",
        first_conv=("stem.conv_kxk.0.conv", "stem.conv_1x1.conv"),  # deploy form: stem.reparam
    )


class MobileOne(RepNet):
    """MobileOne classifier or backbone.

    Feature levels: 0 = the stem (stride 2), 1-4 = the four stages (stride 4, 8, 16, 32).
    ``feature_info`` (a :class:`~repblocks.features.FeatureInfo`) describes them as timm does.

    Args:
        cfg: The architecture (a row of ``MOBILEONE_CONFIGS``).
        num_classes: Classifier outputs; 0 keeps pooled features.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        act: Activation of every block: a name (``"relu"``, ``"gelu"``, see ``repblocks.blocks.ACTIVATIONS``)
            or a factory (``nn.GELU``).
        bn_eps: The eps of every BatchNorm (stem included): 1e-5, BatchNorm's default; weights trained with
            another (YOLOv6's: 1e-3) need theirs, which a state dict does not record.
        deploy: Build the plain deploy form directly.
        block_mode: ``"offline"`` (apple's blocks) or ``"online"`` (OREPA's training form: the k kxk,
            the 1x1 and the identity branches scaled and fused into one conv every step, one BatchNorm).
        features_only: A backbone: no classifier, no stages past the last level in ``out_indices``,
            and ``forward`` returns the feature maps of ``out_indices``.
        out_indices: With ``features_only``, the levels to return: a sequence (negative counts from
            the end, as in timm) or n for the last n levels. All five by default.
    """

    def __init__(
        self,
        cfg: MobileOneConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        act: str | ActFactory | None = _relu,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
        block_mode: str = "offline",
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
    ):
        block_class = resolve_block_mode(block_mode)
        super().__init__(
            (cfg.stem_channels, *cfg.stage_channels),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            features_only=features_only,
            out_indices=out_indices,
        )
        self.cfg = cfg
        self.bn_eps = bn_eps  # recorded with the weights we save, so they are rebuilt with it
        block = partial(block_class, act=resolve_act(act), bn_eps=bn_eps, deploy=deploy)
        # apple's stem has one 3x3 branch whatever k is, and no identity (it changes the shape).
        stem = block(in_chans, cfg.stem_channels, stride=2, num_conv_branches=1)
        k = cfg.num_conv_branches
        depthwise = partial(block, kernel_size=3, num_conv_branches=k)  # scale branch and identity BN: the defaults
        pointwise = partial(block, kernel_size=1, num_conv_branches=k, scale_branch=None)
        stages, channels = [], cfg.stem_channels
        stage_rows = zip(cfg.depths, cfg.stage_channels, cfg.se_blocks, strict=True)
        for depth, width, se_blocks in list(stage_rows)[: self.num_stages_to_build]:
            blocks = []
            for pair_idx in range(depth):
                use_se = pair_idx >= depth - se_blocks
                stride = 2 if pair_idx == 0 else 1
                blocks.append(depthwise(channels, channels, stride=stride, groups=channels, use_se=use_se))
                blocks.append(pointwise(channels, width, use_se=use_se))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self._assemble(stem, stages)


for _name, _cfg in MOBILEONE_CONFIGS.items():
    register_model(_name, partial(MobileOne, _cfg), pretrained_cfg=_pretrained_cfg(_name, _cfg))
