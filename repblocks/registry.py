"""The one model registry: names map to builder functions and to their pretrained configs.

Builders are keyword-only callables returning an ``nn.Module``; model families register theirs
when ``repblocks.models`` is imported, each with a ``pretrained_cfg`` (timm's keys: input size,
mean/std, crop, classes, where published weights live) that can be read without building the model.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from repblocks.pretrained import classifier_classes, load_pretrained, read_pretrained
from repblocks.provenance import recorded_metadata
from repblocks.weights import weights_form

__all__ = ["create_model", "get_pretrained_cfg", "list_models", "register_model"]

log = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED_CFGS: dict[str, dict[str, Any]] = {}


def register_model(
    name: str, builder: Callable[..., nn.Module], *, pretrained_cfg: Mapping[str, Any] | None = None
) -> None:
    """Register ``builder`` under ``name``; a name can be registered only once.

    Args:
        name: The model's name.
        builder: Keyword-only callable building the model.
        pretrained_cfg: How the model's weights expect images, with timm's keys (``input_size``,
            ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``num_classes``, ``first_conv``,
            ``classifier``, ``hf_hub_id``...).
    """
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    _PRETRAINED_CFGS[name] = dict(pretrained_cfg or {})


def list_models(
    filter: str | Sequence[str] = "",  # noqa: A002  (timm's name for it)
    *,
    pretrained: bool = False,
    exclude_filters: str | Sequence[str] = "",
) -> list[str]:
    """Registered model names, sorted, taking timm's ``list_models`` arguments.

    Args:
        filter: Shell wildcards (``"repvgg_b*"``), or a list of them: names matching any are kept.
        pretrained: Only the names ``create_model(name, pretrained=True)`` has weights for (timm
            publishes them: their ``pretrained_cfg`` names a Hub repository). Nothing is downloaded or
            looked up: whether the weights are in the local cache is not checked.
        exclude_filters: Wildcards (or a list) whose matches are left out.
    """
    names = sorted(_BUILDERS)
    if filter:
        patterns = [filter] if isinstance(filter, str) else list(filter)
        names = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    if exclude_filters:
        excluded = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
        names = [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in excluded)]
    if pretrained:
        names = [name for name in names if _PRETRAINED_CFGS[name].get("hf_hub_id")]
    return names


def get_pretrained_cfg(name: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a registered model (a copy), without building it.

    Raises:
        ValueError: If ``name`` is not registered; the message lists what is.
    """
    _check_registered(name)
    return copy.deepcopy(_PRETRAINED_CFGS[name])


def create_model(
    name: str,
    *,
    pretrained: bool | str | os.PathLike = False,
    num_classes: int | None = None,
    in_chans: int = 3,
    deploy: bool | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: A name from :func:`list_models`.
        pretrained: False for random weights; a path to load weights from, in any layout
            :func:`repblocks.load_weights` reads, train or deploy form; True for timm's published
            weights of this variant, from the Hugging Face download cache, else downloaded (needs timm;
            offline, it fails at once).
        num_classes: Classifier outputs (0 for no classifier: ``forward`` returns pooled features).
            By default that of the weights loaded, else ``pretrained_cfg["num_classes"]`` (1000).
            Another number than the weights' loads everything but the classifier, which stays fresh.
        in_chans: Input image channels.
        deploy: Build the plain deploy form (one conv per block); train-form weights are fused on loading.
            By default (None) the form of the weights: the deploy form for a file of deploy-form
            weights (``save_weights`` of a converted model), else the train form.
        features_only: A backbone: ``forward`` returns a list of feature maps, for detection/segmentation
            necks; ``model.feature_info`` describes them. Weights of a classifier load without its head.
        out_indices: With ``features_only``, which feature levels to return (0 = stem, 1-4 = stages;
            negative from the end; n for the last n).
        **kwargs: Passed to the model family's constructor (for RepVGG: ``drop_rate``, ``act``, ``bn_eps``).

    Raises:
        ValueError: An unknown name or argument (the message lists what exists), an invalid value,
            or weights that cannot be had or do not fit (one line saying what to do).
    """
    _check_registered(name)
    builder = _BUILDERS[name]
    _check_arguments(name, builder, kwargs)
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise ValueError(f"pretrained must be True, False or a path to weights, got {pretrained!r}")
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices) if isinstance(out_indices, Sequence) else out_indices
    pretrained_cfg = get_pretrained_cfg(name)
    weights = None
    if pretrained is True and not pretrained_cfg.get("hf_hub_id"):
        published = list_models(pretrained=True)
        raise ValueError(
            f"timm publishes no weights for {name} (it has weights for {', '.join(published)}); "
            f"pass pretrained=PATH to load weights from a file"
        )
    if pretrained is not False:
        weights = read_pretrained(name, pretrained, pretrained_cfg=pretrained_cfg)
        if num_classes is None:
            num_classes = classifier_classes(weights, pretrained_cfg.get("classifier"))
    if num_classes is None:
        num_classes = pretrained_cfg.get("num_classes", 1000)
    if deploy is None:
        deploy = weights is not None and pretrained is not True and weights_form(weights) == "deploy"
        if deploy:
            log.info("%s holds deploy-form weights: building %s in deploy form (deploy=True)", pretrained, name)
    model = builder(num_classes=num_classes, in_chans=in_chans, deploy=deploy, features_only=features_only, **kwargs)
    model.pretrained_cfg = pretrained_cfg
    if weights is not None:
        # A file of ours records what its weights need beyond the tensors (bn_eps, block kinds): checked on loading.
        metadata = recorded_metadata(pretrained) if pretrained is not True else {}
        load_pretrained(model, weights, classifier=pretrained_cfg.get("classifier"), metadata=metadata)
    return model


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
