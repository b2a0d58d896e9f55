"""What every family of the zoo shares: a stem and four stages of re-parameterizable blocks, and timm's surface.

``RepNet`` is the classifier/backbone shell around a family's blocks: feature levels (0 = the stem at
stride 2, 1-4 = the stages at stride 4, 8, 16, 32), ``features_only`` backbones that build no stage
past their last level, ``forward_features`` / ``forward_head`` / ``forward_intermediates`` /
``prune_intermediate_layers`` / ``reset_classifier`` as timm spells them, and ``switch_to_deploy``.
A family (``repvgg.py``, ``mobileone.py``) only says how its stem and stages are built.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from repblocks.blocks import RepBlock, check_int
from repblocks.features import FeatureInfo, resolve_indices

__all__ = ["ClassifierHead", "RepNet", "imagenet_pretrained_cfg"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_pretrained_cfg(
    name: str,
    *,
    tag: str | None,
    image_size: int,
    crop_pct: float,
    interpolation: str,
    first_conv: str | tuple[str, ...],
    **extra,
) -> dict:
    """timm's ``pretrained_cfg`` keys for an ImageNet-1k variant: what its weights are and how they expect images.

    ``tag`` names timm's weights (``timm/{name}.{tag}`` on the Hugging Face hub; None: timm publishes
    none); ``first_conv`` is in the train form; ``extra`` keys are the family's own.
    """
    return dict(
        architecture=name,
        tag=tag,
        hf_hub_id=f"timm/{name}.{tag}" if tag else None,  # where timm's weights live
        input_size=(3, image_size, image_size),
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode="center",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=1000,
        pool_size=(image_size // 32, image_size // 32),
        first_conv=first_conv,
        classifier="head.fc",
        **extra,
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


class RepNet(nn.Module):
    """A stem and stages of re-parameterizable blocks, then a classifier head: the surface of every family.

    A family's ``__init__`` calls this one with the channels of its five feature levels, builds its
    stem and the stages :attr:`num_stages_to_build` asks for, and hands them to :meth:`_assemble`.

    Args:
        level_channels: Channels of the stem and of each stage.
        num_classes: Classifier outputs; 0 keeps pooled features.
        drop_rate: Dropout before the classifier (R-Drop needs one).
        features_only: A backbone: no classifier, no stages past the last level in ``out_indices``,
            and ``forward`` returns the feature maps of ``out_indices``.
        out_indices: With ``features_only``, the levels to return: a sequence (negative counts from
            the end, as in timm) or n for the last n levels. All five by default.
        reductions: Output stride of each level; by default 2 for the stem and 4 to 32 for the stages
            (FastViT's stem already strides by 4).
    """

    def __init__(
        self,
        level_channels: Sequence[int],
        *,
        num_classes: int,
        in_chans: int,
        drop_rate: float,
        features_only: bool,
        out_indices: int | Sequence[int] | None,
        reductions: Sequence[int] | None = None,
    ):
        super().__init__()
        check_int(num_classes, "num_classes", minimum=0)
        check_int(in_chans, "in_chans", minimum=1)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if out_indices is not None and not features_only:
            raise ValueError("out_indices chooses the levels a backbone returns: pass features_only=True with it")
        reductions = reductions or [2 ** (level + 1) for level in range(len(level_channels))]
        levels = [dict(num_chs=level_channels[0], reduction=reductions[0], module="stem", stage=0, index=0)]
        for stage_idx, width in enumerate(level_channels[1:], start=1):
            levels.append(dict(num_chs=width, reduction=reductions[stage_idx], module=f"stages.{stage_idx - 1}"))
            levels[-1].update(stage=stage_idx, index=stage_idx)
        self.feature_info = FeatureInfo(levels, out_indices)
        self.features_only = features_only
        self.out_indices = self.feature_info.out_indices
        self.drop_rate = drop_rate
        self._num_classes = num_classes

    @property
    def num_stages_to_build(self) -> int:
        """Stages a family builds: a backbone stops at its last returned level, as in timm (stages past it
        would hold unused parameters, which DDP refuses, and cost memory)."""
        return max(self.out_indices) if self.features_only else len(self.feature_info) - 1

    def _assemble(self, stem: nn.Module, stages: Sequence[nn.Module]) -> None:
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.num_features = self.feature_info.channels(len(stages))  # the last level built
        self.head = (
            None
            if self.features_only
            else ClassifierHead(self.num_features, self._num_classes, drop_rate=self.drop_rate)
        )

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
            norm: Accepted for timm compatibility; these networks have no final norm.
            stop_early: Stop after the last chosen level; the "last feature map" is then that level's.
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the list of intermediates.

        Returns:
            ``(final, intermediates)``, or ``intermediates`` with ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (the features are NCHW), got {output_fmt!r}")
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

    def switch_to_deploy(self, keep_post_bn: bool = False) -> RepNet:
        """Fuse every block in place (idempotent) and return the model; see :meth:`RepBlock.switch_to_deploy`."""
        for module in self.modules():
            if isinstance(module, RepBlock):
                module.deploy_form(keep_post_bn=keep_post_bn)  # fused in place, checked
        return self
