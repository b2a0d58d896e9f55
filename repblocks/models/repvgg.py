"""RepVGG: Making VGG-style ConvNets Great Again; and QARepVGG, its quantization-friendly block.

Ding, Zhang, Ma, Han, Ding, Sun. CVPR 2021. https://arxiv.org/abs/2101.03697
Chu, Li, Zhang. "Make RepVGG Greater Again: A Quantization-aware Approach". AAAI 2024.
https://arxiv.org/abs/2212.01593

Five stages of ``RepBlock``s (the first block of each stage strides by 2), global average
pooling and a linear classifier. Every variant of the paper is one row of ``REPVGG_CONFIGS``;
the "g2"/"g4" variants use grouped convs on every second layer, as the official code does.
QARepVGG has the same shapes with another branch set (``repblocks.blocks.BRANCH_SETS``): its rows are RepVGG's
with ``block="qarepvgg"`` (or ``"qarepvgg_v2"``, which adds an average-pool branch).
Each row also says how the variant's published weights expect images (``pretrained_cfg``, timm's
keys) and which of timm's published weights it takes (``create_model(name, pretrained=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

from torch import nn

from repblocks.blocks import DEFAULT_BN_EPS, ActFactory, _relu, resolve_act, resolve_branch_set
from repblocks.models.base import RepNet, imagenet_pretrained_cfg
from repblocks.online import resolve_block_mode
from repblocks.registry import register_model

__all__ = ["REPVGG_CONFIGS", "RepVGG", "RepVGGConfig"]


@dataclass(frozen=True)
class RepVGGConfig:
    """Architecture of one RepVGG variant, and the images its published weights expect."""

    depths: tuple[int, int, int, int]  # blocks in stages 1-4 (stage 0 is the single stem block)
    widths: tuple[float, float, float, float]  # the paper's multipliers: a for stages 1-3, b for stage 4
    groups: int = 1  # groups on every even-numbered layer (paper's g2/g4); 1 keeps all convs dense
    use_se: bool = False  # squeeze-excitation in every block (RepVGG-D2se)
    base_channels: tuple[int, int, int, int] = (64, 128, 256, 512)  # widths before the multipliers
    image_size: int = 224  # side of the images the weights were evaluated at (D2se: 320)
    crop_pct: float = 0.875  # evaluation: resize to image_size / crop_pct, then centre-crop image_size
    timm_tag: str | None = None  # timm publishes weights as "<name>.<tag>"; None where it has none
    block: str = "repvgg"  # the branch set of every block: a key of repblocks.blocks.BRANCH_SETS

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(int(base * mult) for base, mult in zip(self.base_channels, self.widths, strict=True))

    @property
    def stem_channels(self) -> int:
        # The paper caps the stem at 64 channels: wide stems at full resolution are costly.
        return min(self.base_channels[0], self.stage_channels[0])


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
_TIMM = "rvgg_in1k"  # timm's ImageNet-1k weights, converted from the official release

REPVGG_CONFIGS: dict[str, RepVGGConfig] = {
    "repvgg_a0": RepVGGConfig(_A, (0.75, 0.75, 0.75, 2.5), timm_tag=_TIMM),
    "repvgg_a1": RepVGGConfig(_A, (1.0, 1.0, 1.0, 2.5), timm_tag=_TIMM),
    "repvgg_a2": RepVGGConfig(_A, (1.5, 1.5, 1.5, 2.75), timm_tag=_TIMM),
    "repvgg_b0": RepVGGConfig(_B, (1.0, 1.0, 1.0, 2.5), timm_tag=_TIMM),
    "repvgg_b1": RepVGGConfig(_B, (2.0, 2.0, 2.0, 4.0), timm_tag=_TIMM),
    "repvgg_b1g2": RepVGGConfig(_B, (2.0, 2.0, 2.0, 4.0), groups=2),
    "repvgg_b1g4": RepVGGConfig(_B, (2.0, 2.0, 2.0, 4.0), groups=4, timm_tag=_TIMM),
    "repvgg_b2": RepVGGConfig(_B, (2.5, 2.5, 2.5, 5.0), timm_tag=_TIMM),
    "repvgg_b2g2": RepVGGConfig(_B, (2.5, 2.5, 2.5, 5.0), groups=2),
    "repvgg_b2g4": RepVGGConfig(_B, (2.5, 2.5, 2.5, 5.0), groups=4, timm_tag=_TIMM),
    "repvgg_b3": RepVGGConfig(_B, (3.0, 3.0, 3.0, 5.0), timm_tag=_TIMM),
    "repvgg_b3g2": RepVGGConfig(_B, (3.0, 3.0, 3.0, 5.0), groups=2),
    "repvgg_b3g4": RepVGGConfig(_B, (3.0, 3.0, 3.0, 5.0), groups=4, timm_tag=_TIMM),
    "repvgg_d2se": RepVGGConfig(
        (8, 14, 24, 1), (2.5, 2.5, 2.5, 5.0), use_se=True, image_size=320, crop_pct=1.0, timm_tag=_TIMM
    ),
    # Tiny variants for tests and smoke runs: every code path (identity, stride, groups, SE) in a few ms,
    # on the 32x32 images of the digits and CIFAR recipes.
    "repvgg_tiny": RepVGGConfig((2, 2, 2, 1), (0.25, 0.25, 0.25, 0.25), image_size=32, crop_pct=1.0),
    "repvgg_tiny_g2se": RepVGGConfig(
        (2, 2, 2, 1), (0.25, 0.25, 0.25, 0.25), groups=2, use_se=True, image_size=32, crop_pct=1.0
    ),
}
# QARepVGG-A0..B3 (the paper's Table 6 variants) and v2; no published ImageNet weights to point at.
for _family in ("qarepvgg", "qarepvgg_v2"):
    for _variant in ("a0", "a1", "a2", "b0", "b1", "b2", "b3", "tiny"):
        REPVGG_CONFIGS[f"{_family}_{_variant}"] = replace(
            REPVGG_CONFIGS[f"repvgg_{_variant}"], block=_family, timm_tag=None
        )


def _pretrained_cfg(name: str, cfg: RepVGGConfig) -> dict:
    """timm's ``pretrained_cfg`` keys for a variant: what its weights are and how they expect images."""
    return imagenet_pretrained_cfg(
        name,
        tag=cfg.timm_tag,
        image_size=cfg.image_size,
        crop_pct=cfg.crop_pct,
        interpolation="bilinear",
        first_conv=_first_convs(cfg.block),
    )


def _first_convs(block: str) -> tuple[str, ...]:
    """The stem's convs that read the image, in the train form (deploy form: ``stem.reparam``)."""
    branches = resolve_branch_set(block)
    scale_branch = branches.get("scale_branch", "bn")
    convs = ["stem.conv_kxk.conv"]
    if scale_branch is not None:
        convs.append("stem.conv_1x1" if scale_branch == "conv" else "stem.conv_1x1.conv")  # QARepVGG's: a plain conv
    if branches.get("asym_branches"):
        convs += ["stem.conv_1xk.conv", "stem.conv_kx1.conv"]
    if branches.get("seq_conv_branch"):
        convs.append("stem.conv_1x1_kxk.conv1")
    if branches.get("seq_avg_branch"):
        convs.append("stem.conv_1x1_avg.conv")
    return tuple(convs)


class RepVGG(RepNet):
    """RepVGG (or QARepVGG) classifier or backbone.

    Feature levels: 0 = the stem (stride 2), 1-4 = the four stages (stride 4, 8, 16, 32).
    ``feature_info`` (a :class:`~repblocks.features.FeatureInfo`) describes them as timm does.

    Args:
        cfg: The architecture (a row of ``REPVGG_CONFIGS``).
        num_classes: Classifier outputs; 0 keeps pooled features.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier (R-Drop needs one).
        act: Activation of every block: a name (``"relu"``, ``"gelu"``, see ``repblocks.blocks.ACTIVATIONS``)
            or a factory (``nn.GELU``).
        bn_eps: The eps of every BatchNorm (stem included): 1e-5, BatchNorm's default; weights trained with
            another (YOLOv6's: 1e-3) need theirs, which a state dict does not record.
        deploy: Build the plain deploy form directly.
        keep_post_bn: QARepVGG: keep each block's BatchNorm after the sum in the deploy form, unfolded
            (for quantization-aware training); RepVGG's blocks have none.
        block_mode: ``"offline"``: every branch its own Conv+BN, summed (the papers' blocks);
            ``"online"``: OREPA's training form, the branches scaled and fused into one conv on every
            step, then one BatchNorm (:class:`~repblocks.online.OnlineRepBlock`). The deploy form is the same.
        features_only: A backbone: no classifier, no stages past the last level in ``out_indices``,
            and ``forward`` returns the feature maps of ``out_indices``.
        out_indices: With ``features_only``, the levels to return: a sequence (negative counts from
            the end, as in timm) or n for the last n levels. All five by default.
    """

    def __init__(
        self,
        cfg: RepVGGConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        act: str | ActFactory | None = _relu,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
        keep_post_bn: bool = False,
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
        block = partial(
            block_class,
            **resolve_branch_set(cfg.block),
            use_se=cfg.use_se,
            act=resolve_act(act),
            bn_eps=bn_eps,
            deploy=deploy,
            keep_post_bn=keep_post_bn,
        )
        stem = block(in_chans, cfg.stem_channels, stride=2)
        stages, channels, layer = [], cfg.stem_channels, 1
        for depth, width in zip(cfg.depths[: self.num_stages_to_build], cfg.stage_channels, strict=False):
            blocks = []
            for block_idx in range(depth):
                groups = cfg.groups if layer % 2 == 0 else 1  # official layout: layers 2, 4, 6, ...
                blocks.append(block(channels, width, stride=2 if block_idx == 0 else 1, groups=groups))
                channels, layer = width, layer + 1
            stages.append(nn.Sequential(*blocks))
        self._assemble(stem, stages)


for _name, _cfg in REPVGG_CONFIGS.items():
    register_model(_name, partial(RepVGG, _cfg), pretrained_cfg=_pretrained_cfg(_name, _cfg))
