"""How a model's input images are prepared: size, normalization, crop and interpolation (timm's ``pretrained_cfg`` keys).

The deploy form ships with it: the report, ``model.safetensors``' metadata and ``model.onnx``'s
``metadata_props`` all carry ``input_size``, ``mean``, ``std``, ``crop_pct`` and ``interpolation``,
and the exports take ``input_size`` as their input shape. Each key is taken from the first of these
that has it, and the result says where each came from (``source``):

1. what the weights' file saved: a train.py checkpoint's ``hyper_parameters["preprocessing"]``
   (and its ``image_size``), or the metadata of a deploy.py ``model.safetensors``;
2. the model's own ``pretrained_cfg``, or for a torchvision model the transforms of its weights;
3. ImageNet's defaults at 224x224, said so in ``source``.

deploy.py's ``preprocessing.KEY=VALUE`` settings come before all of them (:func:`override`): for
weights whose file says nothing and whose model's defaults are not how they were trained.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

from torch import nn

from repblocks.checkpoint import PREPROCESSING_KEYS
from repblocks.datasets import IMAGENET_MEAN, IMAGENET_STD
from repblocks.errors import UserError

__all__ = [
    "DEFAULTS",
    "KEYS",
    "describe_sources",
    "from_metadata",
    "model_config",
    "override",
    "resolve",
    "torchvision_preprocessing",
]

log = logging.getLogger(__name__)

KEYS = PREPROCESSING_KEYS  # one definition, in the core: the deploy-form metadata contract
DEFAULT_IMAGE_SIZE = 224
DEFAULTS = {
    "input_size": DEFAULT_IMAGE_SIZE,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "crop_pct": 0.875,  # resize to size / 0.875, centre-crop size: the ImageNet evaluation convention
    "interpolation": "bilinear",
}
_MAX_SIDE = 4096  # as bench.image_size: a larger side is a malformed file, not an image classifier


def resolve(*, in_chans: int, found: list[tuple[str, Mapping | None]], what: str = "the weights") -> dict:
    """The preprocessing of a model, each key from the first mapping in ``found`` that has it, else the defaults.

    Args:
        in_chans: The model's input channels: the first entry of ``input_size``.
        found: ``(where, mapping)`` pairs, most trusted first (``("the checkpoint", {...})``); None entries are skipped.
        what: What the values describe, for error messages.

    Returns:
        ``input_size`` as ``[C, H, W]``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, and
        ``source``: ``{key: where}``, which of ``found`` (or ImageNet's defaults) each key came from.

    Raises:
        UserError: A saved value is malformed (a file is untrusted input).
    """
    values, sources = {}, {}
    for where, mapping in [*found, ("ImageNet defaults (nothing names its own)", _defaults(in_chans))]:
        for key in KEYS:
            if key not in values and mapping is not None and mapping.get(key) is not None:
                values[key], sources[key] = mapping[key], where
    try:
        result = {
            "input_size": _input_size(values["input_size"], in_chans),
            "mean": _numbers(values["mean"], in_chans),
            "std": _numbers(values["std"], in_chans, positive=True),
            "crop_pct": _crop_pct(values["crop_pct"]),
            "interpolation": _interpolation(values["interpolation"]),
        }
    except (TypeError, ValueError) as err:
        raise UserError(f"malformed preprocessing in {what}: {err}") from None
    result["source"] = sources
    return result


def override(resolved: Mapping, settings: Mapping | None, *, in_chans: int) -> dict:
    """``resolved`` (what :func:`resolve` gave) with the keys ``settings`` sets (not None) taken from it instead.

    Raises:
        UserError: An unknown key, or a malformed value.
    """
    given = {key: value for key, value in (settings or {}).items() if value is not None}
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise UserError(f"unknown setting preprocessing.{unknown[0]}; known: {', '.join(KEYS)}")
    if not given:
        return dict(resolved)
    kept = [(where, {key: resolved[key]}) for key, where in resolved["source"].items()]
    return resolve(
        in_chans=in_chans, found=[("deploy.py's preprocessing settings", given), *kept], what="preprocessing"
    )


def describe_sources(preprocessing: Mapping) -> str:
    """``"input_size: the checkpoint's image_size; mean, std, crop_pct, interpolation: ImageNet defaults ..."``."""
    by_source: dict[str, list[str]] = {}
    for key, where in preprocessing["source"].items():
        by_source.setdefault(where, []).append(key)
    return "; ".join(f"{', '.join(keys)}: {where}" for where, keys in by_source.items())


def model_config(model: nn.Module) -> Mapping | None:
    """The model's timm-style ``pretrained_cfg`` (``input_size``, ``mean``, ...), when it has one."""
    config = getattr(model, "pretrained_cfg", None)
    return config if isinstance(config, Mapping) else None


def torchvision_preprocessing(name: str) -> tuple[str, dict | None]:
    """``(where, values)`` from the transforms of torchvision's default weights for model ``name`` (nothing downloaded)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        transforms = weights.transforms()  # builds the transform object only: no weights are fetched
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        log.info("no torchvision weights transforms for %s: %s", name, err)
        return "torchvision has no weights for it", None
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    values = {
        "input_size": crop,
        "mean": list(transforms.mean),
        "std": list(transforms.std),
        "crop_pct": round(crop / resize, 4),
        "interpolation": transforms.interpolation.value,
    }
    return f"the transforms of torchvision's {weights}", values


def from_metadata(metadata: Mapping[str, str]) -> dict | None:
    """What :func:`repblocks.run_checkpoint.deploy_metadata` wrote, read back (None when there is none).

    Raises:
        UserError: A value is not JSON.
    """
    found = {}
    for key in KEYS:
        if key in metadata:
            try:
                found[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise UserError(f"malformed metadata {key}={metadata[key]!r}: not a JSON value") from None
    return found or None


def _defaults(in_chans: int) -> dict:
    if in_chans == len(IMAGENET_MEAN):
        return DEFAULTS
    # Another channel count (grey digits, say): ImageNet's statistics averaged over its channels, as timm does.
    mean, std = sum(IMAGENET_MEAN) / len(IMAGENET_MEAN), sum(IMAGENET_STD) / len(IMAGENET_STD)
    return {**DEFAULTS, "mean": [mean] * in_chans, "std": [std] * in_chans}


def _input_size(value: object, in_chans: int) -> list[int]:
    sides = [value, value] if _is_int(value) else list(value)
    if len(sides) == 3:
        sides = sides[1:]  # (C, H, W): the model's own in_chans is what counts
    if len(sides) != 2 or not all(_is_int(side) and 1 <= side <= _MAX_SIDE for side in sides):
        raise ValueError(f"input_size must be a side, (H, W) or (C, H, W) of 1 to {_MAX_SIDE}, got {value!r}")
    return [in_chans, *sides]


def _numbers(value: object, channels: int, *, positive: bool = False) -> list[float]:
    numbers = [value] * channels if isinstance(value, int | float) else list(value)
    if len(numbers) == 1:
        numbers *= channels
    valid = all(isinstance(x, int | float) and math.isfinite(x) and (x > 0 or not positive) for x in numbers)
    if len(numbers) != channels or not valid:
        raise ValueError(f"mean and std need one finite number per channel ({channels}), got {value!r}")
    return [float(x) for x in numbers]


def _crop_pct(value: object) -> float:
    if not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"crop_pct must be a fraction in (0, 1], got {value!r}")
    return float(value)


def _interpolation(value: object) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"interpolation must be a name such as bilinear or bicubic, got {value!r}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
