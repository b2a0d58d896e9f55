"""The one model registry: names map to builder functions.

Builders are keyword-only callables returning an ``nn.Module``; model families register theirs
when ``repblocks.models`` is imported.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder`` under ``name``; a name can be registered only once."""
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters with shell wildcards (``"repvgg_b*"``)."""
    names = sorted(_BUILDERS)
    return fnmatch.filter(names, pattern) if pattern else names


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    deploy: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: A name from :func:`list_models`.
        num_classes: Classifier outputs (0 for no classifier: ``forward`` returns pooled features).
        in_chans: Input image channels.
        deploy: Build the plain deploy form (one conv per block), e.g. to load fused weights.
        features_only: Return a list of feature maps instead of logits, for detection/segmentation necks.
        out_indices: With ``features_only``, which feature levels to return (0 = stem, 1-4 = stages).
        **kwargs: Passed to the model family's constructor (for RepVGG: ``drop_rate``, ``act``).

    Raises:
        ValueError: If ``name`` is not registered; the message lists what is.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    return _BUILDERS[name](
        num_classes=num_classes, in_chans=in_chans, deploy=deploy, features_only=features_only, **kwargs
    )
