"""RepVGG: Making VGG-style ConvNets Great Again.

Ding, Zhang, Ma, Han, Ding, Sun. CVPR 2021. https://arxiv.org/abs/2101.03697

Five stages of ``RepBlock``s (the first block of each stage strides by 2), global average
pooling and a linear classifier. Every variant of the paper is one row of ``REPVGG_CONFIGS``;
the "g2"/"g4" variants use grouped convs on every second layer, as the official code does.
Each row also says how the variant's published weights expect images (``pretrained_cfg``, timm's
keys) and which of timm's published weights it takes (``create_model(name, pretrained=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from repblocks.blocks import ActFactory, RepBlock, _relu, check_int, resolve_act
from repblocks.features import FeatureInfo, resolve_indices
from repblocks.registry import register_model

__all__ = ["REPVGG_CONFIGS", "RepVGG", "RepVGGConfig"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _pretrained_cfg(name: str, cfg: RepVGGConfig) -> dict:
    """timm's ``pretrained_cfg`` keys for a variant: what its weights are and how they expect images."""
    return dict(
        architecture=name,
        tag=cfg.timm_tag,
        hf_hub_id=f"timm/{name}.{cfg.timm_tag}" if cfg.timm_tag else None,  # where timm's weights live
        input_size=(3, cfg.image_size, cfg.image_size),
        interpolation="bilinear",
        crop_pct=cfg.crop_pct,
        crop_mode="center",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=1000,
        pool_size=(cfg.image_size // 32, cfg.image_size // 32),
        first_conv=("stem.conv_kxk.conv", "stem.conv_1x1.conv"),  # in the train form; deploy form: stem.reparam
        classifier="head.fc",
    )


class ClassifierHead(nn.Module):
    """Global average pool, dropout, linear. ``num_classes=0`` leaves the pooled features."""

    def __init__(self, in_features: int, num_classes: int, *, drop_rate: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))  # (B, C)
        return x if pre_logits else self.fc(x)


class RepVGG(nn.Module):
    """RepVGG classifier or backbone.

    Feature levels: 0 = the stem (stride 2), 1-4 = the four stages (stride 4, 8, 16, 32).
    ``feature_info`` (a :class:`~repblocks.features.FeatureInfo`) describes them as timm does.

    Args:
        cfg: The architecture (a row of ``REPVGG_CONFIGS``).
        num_classes: Classifier outputs; 0 keeps pooled features.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier (R-Drop needs one).
        act: Activation of every block: a name (``"relu"``, ``"gelu"``, see ``repblocks.blocks.ACTIVATIONS``)
            or a factory (``nn.GELU``).
        deploy: Build the plain deploy form directly.
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
        deploy: bool = False,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
    ):
        super().__init__()
        check_int(num_classes, "num_classes", minimum=0)
        check_int(in_chans, "in_chans", minimum=1)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if out_indices is not None and not features_only:
            raise ValueError("out_indices chooses the levels a backbone returns: pass features_only=True with it")
        levels = [dict(num_chs=cfg.stem_channels, reduction=2, module="stem", stage=0, index=0)]
        for stage_idx, width in enumerate(cfg.stage_channels, start=1):
            levels.append(dict(num_chs=width, reduction=2 ** (stage_idx + 1), module=f"stages.{stage_idx - 1}"))
            levels[-1].update(stage=stage_idx, index=stage_idx)
        self.feature_info = FeatureInfo(levels, out_indices)
        self.cfg = cfg
        self.features_only = features_only
        self.out_indices = self.feature_info.out_indices
        block = partial(RepBlock, use_se=cfg.use_se, act=resolve_act(act), deploy=deploy)

        self.stem = block(in_chans, cfg.stem_channels, stride=2)
        # A backbone stops at its last returned level: stages past it would hold unused parameters
        # (which DDP refuses) and cost memory, as in timm.
        num_stages = max(self.out_indices) if features_only else len(cfg.depths)
        stages, channels, layer = [], cfg.stem_channels, 1
        for depth, width in zip(cfg.depths[:num_stages], cfg.stage_channels, strict=False):
            blocks = []
            for block_idx in range(depth):
                groups = cfg.groups if layer % 2 == 0 else 1  # official layout: layers 2, 4, 6, ...
                blocks.append(block(channels, width, stride=2 if block_idx == 0 else 1, groups=groups))
                channels, layer = width, layer + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = channels
        self.drop_rate = drop_rate
        self.head = None if features_only else ClassifierHead(channels, num_classes, drop_rate=drop_rate)

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features if self.head is not None and isinstance(self.head.fc, nn.Linear) else 0

    def forward_features(self, x: Tensor) -> Tensor:
        """Image batch ``(B, C, H, W)`` to the last feature map ``(B, num_features, H/32, W/32)``."""
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Last feature map to logits (or pooled features with ``pre_logits``)."""
        if self.head is None:
            raise RuntimeError("this model was built with features_only=True and has no head")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Logits ``(B, num_classes)``; with ``features_only``, the feature maps of ``out_indices``."""
        if self.features_only:
            return self.forward_intermediates(x, indices=self.out_indices, stop_early=True, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The last feature map and the feature maps of the chosen levels, as timm's ``forward_intermediates``.

        Args:
            x: Image batch ``(B, C, H, W)``.
            indices: Levels to return (0 = stem, 1-4 = stages): None for all the model has, n for the
                last n, or a sequence (negative counts from the end).
            norm: Accepted for timm compatibility; RepVGG has no final norm.
            stop_early: Stop after the last chosen level; the "last feature map" is then that level's.
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the list of intermediates.

        Returns:
            ``(final, intermediates)``, or ``intermediates`` with ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (RepVGG's features are NCHW), got {output_fmt!r}")
        take = resolve_indices(1 + len(self.stages), indices)
        x = self.stem(x)
        intermediates = [x] if 0 in take else []
        for level, stage in enumerate(self.stages, start=1):
            if stop_early and level > max(take):
                break
            x = stage(x)
            if level in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last level in ``indices`` (and the classifier), as timm's method.

        Returns:
            The absolute levels kept for :meth:`forward_intermediates`.
        """
        take = resolve_indices(1 + len(self.stages), indices)
        if self.features_only and max(take) < max(self.out_indices):
            raise ValueError(f"this backbone returns levels {self.out_indices}: it cannot be pruned to {max(take)}")
        pruned = max(take) < len(self.stages)
        self.stages = self.stages[: max(take)]
        if pruned:
            self.num_features = self.feature_info.channels(max(take))
        if self.head is not None and (prune_head or pruned):
            self.head = ClassifierHead(self.num_features, 0, drop_rate=self.drop_rate)
        return take

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0 removes it)."""
        if self.head is None:
            raise RuntimeError("this model was built with features_only=True and has no head")
        self.head.reset(check_int(num_classes, "num_classes", minimum=0))

    def switch_to_deploy(self) -> RepVGG:
        """Fuse every block in place (idempotent) and return the model."""
        for module in self.modules():
            if isinstance(module, RepBlock):
                module.switch_to_deploy()
        return self


for _name, _cfg in REPVGG_CONFIGS.items():
    register_model(_name, partial(RepVGG, _cfg), pretrained_cfg=_pretrained_cfg(_name, _cfg))
