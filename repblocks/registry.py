"""The one model registry: names map to builder functions.

Builders are keyword-only callables returning an ``nn.Module``; model families register theirs
when ``repblocks.models`` is imported.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
    out_indices: int | Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: A name from :func:`list_models`.
        num_classes: Classifier outputs (0 for no classifier: ``forward`` returns pooled features).
        in_chans: Input image channels.
        deploy: Build the plain deploy form (one conv per block), e.g. to load fused weights.
        features_only: A backbone: ``forward`` returns a list of feature maps, for detection/segmentation
            necks; ``model.feature_info`` describes them.
        out_indices: With ``features_only``, which feature levels to return (0 = stem, 1-4 = stages;
            negative from the end; n for the last n).
        **kwargs: Passed to the model family's constructor (for RepVGG: ``drop_rate``, ``act``).

    Raises:
        ValueError: An unknown name or argument (the message lists what exists), or an invalid value.
    """
    _check_registered(name)
    builder = _BUILDERS[name]
    _check_arguments(name, builder, kwargs)
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices) if isinstance(out_indices, Sequence) else out_indices
    return builder(num_classes=num_classes, in_chans=in_chans, deploy=deploy, features_only=features_only, **kwargs)


def _check_registered(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")


def _check_arguments(name: str, builder: Callable[..., nn.Module], kwargs: Mapping[str, Any]) -> None:
    """Unknown keywords (a config's ``+model.foo=1``) fail here, naming the ones the model takes."""
    parameters = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # the builder takes anything: it checks for itself
    accepted = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    own = {p.name for p in inspect.signature(create_model).parameters.values() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{name} got unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"it accepts: {', '.join(sorted(accepted | own))}"
        )
