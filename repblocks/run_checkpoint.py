"""The contract of the files we write that say how to rebuild their network: train.py checkpoints, deploy metadata.

Both are written and read here, so the two sides cannot drift apart, and neither training nor
deployment has to import the other.

A train.py checkpoint is a Lightning checkpoint whose ``hyper_parameters`` hold what
:func:`run_record` writes (``model_name``, ``num_classes``, ``in_chans``, ``model_kwargs``,
``image_size``, ``data``: the data config, ``preprocessing``, ``class_names``), the
``weights_prefix`` of the LightningModule (``"model."``, or ``"ema.module."`` with EMA), and its
training settings (``loss``, ``rep_l2``, ``ema_decay``, for a resume); its ``state_dict`` holds
the network's weights under that prefix. :func:`read_run_checkpoint` reads it and
:func:`build_run_model` rebuilds its network. Deploy-form weights and every export carry
:func:`deploy_metadata`, which :func:`spec_from_deploy_metadata` and
:func:`class_names_from_metadata` read back.

What such a file says to build is data, never instructions: :func:`model_spec` is the one gate
every file-provided architecture passes. It admits only architecture arguments (no ``pretrained``,
which would download or open another file) and sizes in a range that cannot exhaust memory, and
says in one line which field was wrong. Class names are descriptive, never needed to rebuild anything:
:func:`check_class_names` keeps them only when they are one short printable string per class, and
otherwise warns once and drops them, so a file with odd names still loads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from repblocks.blocks import ACTIVATIONS
from repblocks.checkpoint import DEPLOY_FORM, PREPROCESSING_KEYS, StateDict, read_checkpoint
from repblocks.expand import resolve_branches
from repblocks.online import BLOCK_MODES
from repblocks.registry import create_model
from repblocks.weights import load_weights

__all__ = [
    "FILE_MODEL_ARGUMENTS",
    "MAX_CLASS_NAME",
    "MODEL_CONFIG_KEYS",
    "SIZE_LIMITS",
    "ModelSpec",
    "RunCheckpoint",
    "build_run_model",
    "check_class_names",
    "check_size",
    "class_names_from_metadata",
    "deploy_metadata",
    "model_arguments",
    "model_spec",
    "read_run_checkpoint",
    "resolve_run_checkpoint",
    "run_deploy_metadata",
    "run_record",
    "spec_from_deploy_metadata",
]

log = logging.getLogger(__name__)

# Inclusive ranges of the sizes a file may ask for: far beyond any real classifier, far below what
# would exhaust memory at construction (num_classes=1e11 is a 400 GB classifier).
SIZE_LIMITS = {"num_classes": (1, 100_000), "in_chans": (1, 1024), "image_size": (1, 4096)}
MAX_CLASS_NAME = 256  # characters: a folder name's limit on most file systems


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _branch_set(value: object) -> bool:
    if value is None:
        return True
    try:
        resolve_branches(value, online=True)  # the widest: building the model refuses what its mode has no form for
    except (ValueError, TypeError):
        return False
    return True


def _drop_rate(value: object) -> bool:
    return _number(value) and 0 <= value < 1


# The create_model arguments a file may carry: architecture only, each with what it accepts. Nothing
# here reads another file or the network (``pretrained``), or changes what the file's weights mean.
FILE_MODEL_ARGUMENTS = {
    "drop_rate": (_drop_rate, "a number in [0, 1)"),
    "act": (lambda value: value is None or value in ACTIVATIONS, f"null or one of {', '.join(ACTIVATIONS)}"),
    "keep_post_bn": (lambda value: isinstance(value, bool), "true or false"),
    # BatchNorm's eps (YOLOv6 trains with 1e-3), for the models that take it.
    "bn_eps": (lambda value: _number(value) and 0 < value < 1, "a number in (0, 1)"),
    # How the blocks were trained (OREPA's online form or the branches): the train-form weights' keys depend on it.
    "block_mode": (lambda value: value in BLOCK_MODES, f"one of {', '.join(BLOCK_MODES)}"),
    # A torchvision classifier trained expanded (repblocks.expand): its branch set, and whether online.
    "expand": (_branch_set, "null, a branch set name or a dict of branch keywords"),
    "online": (lambda value: isinstance(value, bool), "true or false"),
    # RepViT's second (distillation) classifier head: its train-form weights' keys depend on it.
    "distillation": (lambda value: isinstance(value, bool), "true or false"),
}
# Saved by older train.py runs (``+model.pretrained=...``): where the weights started, which the file's own replace.
# ``weights`` (a tv_* model's starting file) likewise: it would open another file.
_IGNORED_ARGUMENTS = ("pretrained", "weights")
# Keys of a model config (configs/model/*.yaml) that are no architecture argument, left out of a checkpoint's
# model_kwargs: where the weights started (pretrained=...) is no part of the network a checkpoint rebuilds,
# and reading it back would download or open another file.
MODEL_CONFIG_KEYS = ("_target_", "_partial_", "name", "pretrained")


@dataclass(frozen=True)
class ModelSpec:
    """What a file says to build, checked by :func:`model_spec`: a name, its sizes, architecture arguments."""

    name: str  # registry name (or ``torchvision:NAME`` in deploy metadata)
    num_classes: int
    in_chans: int
    model_kwargs: dict  # only keys of FILE_MODEL_ARGUMENTS

    def build(self, *, deploy: bool = False) -> nn.Module:
        """The registered model, with random weights; ``deploy`` builds its plain form."""
        return create_model(
            self.name, num_classes=self.num_classes, in_chans=self.in_chans, deploy=deploy, **self.model_kwargs
        )


def check_size(name: str, value: object, *, what: str) -> int:
    """``value`` as an int when it is an integer in ``SIZE_LIMITS[name]``; else a one-line ValueError naming it.

    Floats that hold an integer (``1e11`` from JSON or YAML) are read as that integer, then checked.
    """
    low, high = SIZE_LIMITS[name]
    integral_float = isinstance(value, float) and value.is_integer()
    integer_text = isinstance(value, str) and value.strip().lstrip("+-").isdigit()  # safetensors metadata is text
    number = int(value) if integral_float or integer_text else value
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise ValueError(f"{what}: {name}={value!r} is out of range; it must be an integer from {low} to {high}")
    return number


def model_spec(
    name: object, *, num_classes: object, in_chans: object = 3, model_kwargs: object = None, what: str
) -> ModelSpec:
    """The one check of an architecture read from a file, before anything is built or allocated.

    Args:
        name: The model's name, as the file says.
        num_classes, in_chans: Its sizes (ints, or their text as safetensors metadata holds them).
        model_kwargs: Further ``create_model`` arguments: only :data:`FILE_MODEL_ARGUMENTS` are
            admitted (``pretrained`` is dropped, with a warning: the file's own weights replace it).
        what: The file, for the messages.

    Raises:
        ValueError: One line naming the field, the value and what is allowed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: the model name must be a non-empty string, got {name!r}")
    kwargs = {} if model_kwargs is None else model_kwargs
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{what}: model_kwargs must be a mapping, got a {type(kwargs).__name__}")
    checked = {}
    for key, value in kwargs.items():
        if key in _IGNORED_ARGUMENTS:
            if value not in (False, None):
                log.warning("%s: ignoring model_kwargs %s=%r: the file's own weights are loaded", what, key, value)
            continue
        if key not in FILE_MODEL_ARGUMENTS:
            raise ValueError(
                f"{what}: model_kwargs {key!r} is not an architecture argument a file may set; "
                f"allowed: {', '.join(FILE_MODEL_ARGUMENTS)}"
            )
        accepts, expected = FILE_MODEL_ARGUMENTS[key]
        if not _accepts(accepts, value):
            raise ValueError(f"{what}: model_kwargs {key}={value!r} is invalid; it must be {expected}")
        checked[key] = value
    return ModelSpec(
        name=name,
        num_classes=check_size("num_classes", num_classes, what=what),
        in_chans=check_size("in_chans", in_chans, what=what),
        model_kwargs=checked,
    )


def _accepts(accepts, value: object) -> bool:
    try:
        return bool(accepts(value))
    except TypeError:  # a dict or a list where a name belongs: unhashable, so not one of the names
        return False


def model_arguments(model_config: Mapping, network: nn.Module) -> dict:
    """The ``model_kwargs`` a checkpoint records: the model config's architecture arguments, and ``bn_eps``.

    ``bn_eps`` is recorded for the models that have one, so the checkpoint rebuilds its model with
    the eps it trained with, whatever the default of a later version.
    """
    kwargs = {key: value for key, value in model_config.items() if key not in MODEL_CONFIG_KEYS}
    if hasattr(network, "bn_eps"):
        kwargs.setdefault("bn_eps", network.bn_eps)
    return kwargs


def run_record(
    network: nn.Module,
    *,
    model_name: str,
    model_kwargs: Mapping,
    in_chans: int,
    image_size: int,
    data: Mapping | None = None,
    preprocessing: Mapping | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """What a train.py checkpoint records about its network, as plain containers (``weights_only`` loads them).

    Args:
        network: The network trained (its ``num_classes`` is recorded).
        model_name: Its registry name.
        model_kwargs: The further ``create_model`` arguments it was built with (:func:`model_arguments`).
        in_chans, image_size: Its input channels, and the image size it trained at.
        data: The data config (``{"_target_": ..., **kwargs}``), so deployment can verify on the
            same validation images.
        preprocessing: How the data prepared images (``input_size``, ``mean``, ``std``,
            ``crop_pct``, ``interpolation``), so deployment prepares them the same way.
        class_names: The name of each class, by index, when the data names them.

    Raises:
        ValueError: The network has no classifier.
    """
    num_classes = getattr(network, "num_classes", None)
    if not num_classes:
        raise ValueError(f"model {model_name!r} has no classifier (num_classes={num_classes!r})")
    return {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "model_kwargs": dict(model_kwargs),
        "image_size": int(image_size),
        "data": dict(data or {}),
        "preprocessing": dict(preprocessing) if preprocessing is not None else None,
        "class_names": [str(name) for name in class_names] if class_names is not None else None,
    }


def deploy_metadata(
    *,
    model: str,
    num_classes: int,
    in_chans: int,
    model_kwargs: Mapping,
    preprocessing: Mapping | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, str]:
    """The header metadata of deploy-form weights we write: what rebuilds the model, and how its images are prepared.

    Training's end-of-run deploy weights and deploy.py's exports all carry it, so either
    file deploys again with nothing else (:func:`spec_from_deploy_metadata` reads it back). Values are
    strings, as safetensors requires: numbers as text, everything else as JSON. ``class_names`` (the
    name of each class, by index, when the training data named them) lets predictions say them.
    """
    metadata = {
        "model": model,
        "num_classes": str(num_classes),
        "in_chans": str(in_chans),
        "model_kwargs": json.dumps(dict(model_kwargs)),
        "form": DEPLOY_FORM,
    }
    for key in PREPROCESSING_KEYS:
        if preprocessing and key in preprocessing:
            metadata[key] = json.dumps(preprocessing[key])
    if class_names:
        metadata["class_names"] = json.dumps(list(class_names))
    return metadata


def run_deploy_metadata(hyper_parameters: Mapping) -> dict[str, str]:
    """:func:`deploy_metadata` for the network a train.py checkpoint's ``hyper_parameters`` (:func:`run_record`) describe."""
    return deploy_metadata(
        model=hyper_parameters["model_name"],
        num_classes=hyper_parameters["num_classes"],
        in_chans=hyper_parameters["in_chans"],
        model_kwargs=hyper_parameters["model_kwargs"],
        preprocessing=hyper_parameters.get("preprocessing"),
        class_names=hyper_parameters.get("class_names"),
    )


def spec_from_deploy_metadata(metadata: Mapping[str, str], *, what: str) -> ModelSpec:
    """What the metadata of deploy-form weights (:func:`deploy_metadata`) says to build.

    Raises:
        ValueError: A missing or malformed field; one line naming it.
    """
    if "num_classes" not in metadata:
        raise ValueError(f"{what}: malformed deploy metadata (no num_classes)")
    try:
        kwargs = json.loads(metadata.get("model_kwargs", "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: malformed deploy metadata (model_kwargs is not JSON: {err})") from None
    return model_spec(
        metadata.get("model"),
        num_classes=metadata["num_classes"],
        in_chans=metadata.get("in_chans", "3"),
        model_kwargs=kwargs,
        what=what,
    )


def check_class_names(names: object, *, num_classes: int, what: str) -> list[str] | None:
    """``names`` as a list when it is one printable string of 1 to :data:`MAX_CLASS_NAME` characters per class.

    Otherwise (a file's odd or stale names) one warning says why, and None is returned: predictions
    then give class indices alone. Printable only, because the names are printed to a terminal,
    where control characters would be obeyed.
    """
    if names is None:
        return None
    if not isinstance(names, list | tuple):
        reason = f"a {type(names).__name__}, not a list of strings"
    elif len(names) != num_classes:
        reason = f"{len(names)} names for {num_classes} classes"
    else:
        bad = next((name for name in names if not _class_name(name)), None)
        if bad is None:
            return list(names)
        reason = f"{_shorten(bad)} is not a printable string of 1 to {MAX_CLASS_NAME} characters"
    log.warning("%s: ignoring class_names (%s); predictions will give class indices only", what, reason)
    return None


def class_names_from_metadata(metadata: Mapping[str, str], *, num_classes: int, what: str) -> list[str] | None:
    """The ``class_names`` of deploy metadata (a JSON list), checked by :func:`check_class_names`; None when absent."""
    text = metadata.get("class_names")
    if text is None:
        return None
    try:
        names = json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        log.warning("%s: ignoring class_names (not JSON: %s)", what, err)
        return None
    return check_class_names(names, num_classes=num_classes, what=what)


def _class_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_CLASS_NAME and name.isprintable()


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


@dataclass(frozen=True)
class RunCheckpoint:
    """What a train.py checkpoint says about its network, and the network's own weights."""

    path: Path
    model_name: str  # registry name
    num_classes: int
    in_chans: int
    model_kwargs: dict  # further create_model arguments (drop_rate, ...), architecture only (model_spec)
    state_dict: StateDict  # the network's weights, prefix removed
    weights_prefix: str = "model."  # where they sat in the LightningModule's state ("ema.module." with EMA)
    image_size: int | None = None  # what it was trained at
    data: dict | None = None  # the data config, to rebuild its validation images
    # How images were prepared for it (input_size, mean, std, crop_pct, interpolation), when saved.
    preprocessing: dict | None = None
    class_names: list[str] | None = None  # by class index, when the run recorded them (check_class_names)
    hyper_parameters: dict = field(default_factory=dict)  # everything saved, for callers that need more

    @property
    def spec(self) -> ModelSpec:
        """What to build for these weights."""
        return ModelSpec(self.model_name, self.num_classes, self.in_chans, dict(self.model_kwargs))


def resolve_run_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file; for a train.py run folder, its best checkpoint, else its last.

    Raises:
        FileNotFoundError: Nothing at ``path``.
        ValueError: A folder that is not a train.py run.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"weights file not found: {path}")
    metrics = path / "metrics.json"
    if metrics.is_file():
        try:
            best = json.loads(metrics.read_text()).get("best_ckpt")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            best = None
        if isinstance(best, str) and best and Path(best).is_file():
            return Path(best)
    if (path / "checkpoints" / "last.ckpt").is_file():
        return path / "checkpoints" / "last.ckpt"
    raise ValueError(f"{path} is a folder but not a train.py run (no metrics.json best_ckpt, no checkpoints/last.ckpt)")


def read_run_checkpoint(path: str | os.PathLike, checkpoint: object | None = None) -> RunCheckpoint | None:
    """Read a train.py checkpoint (or run folder); None when the file is a checkpoint of another kind.

    Its architecture passes :func:`model_spec` (architecture arguments only, sizes in range).

    Args:
        path: The checkpoint file or a train.py run folder.
        checkpoint: Its contents, when the caller has already read them with :func:`read_checkpoint`.

    Raises:
        FileNotFoundError, ValueError: As :func:`read_checkpoint`, or a train.py checkpoint whose
            hyper-parameters or weights are malformed.
    """
    path = resolve_run_checkpoint(path)
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if not isinstance(hparams, Mapping) or "model_name" not in hparams:
        return None
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{path} is a train.py checkpoint without a state_dict")
    what = f"{path} hyper_parameters"
    if "num_classes" not in hparams:
        raise ValueError(f"{what}: no num_classes")
    spec = model_spec(
        hparams["model_name"],
        num_classes=hparams["num_classes"],
        in_chans=hparams.get("in_chans", 3),
        model_kwargs=hparams.get("model_kwargs"),
        what=what,
    )
    image_size = hparams.get("image_size")
    image_size = check_size("image_size", image_size, what=what) if image_size else None
    prefix = hparams.get("weights_prefix", "model.")
    if not isinstance(prefix, str):
        raise ValueError(f"{what}: weights_prefix must be a string, got {prefix!r}")
    # The LightningModule's state also holds loss buffers, an EMA copy, ...: keep the network's own weights.
    state = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} has no weights under its weights_prefix {prefix!r}")
    return RunCheckpoint(
        path=path,
        model_name=spec.name,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
        model_kwargs=spec.model_kwargs,
        state_dict=state,
        weights_prefix=prefix,
        image_size=image_size,
        data=dict(hparams["data"]) if isinstance(hparams.get("data"), Mapping) else None,
        preprocessing=dict(hparams["preprocessing"]) if isinstance(hparams.get("preprocessing"), Mapping) else None,
        class_names=check_class_names(hparams.get("class_names"), num_classes=spec.num_classes, what=what),
        hyper_parameters=dict(hparams),
    )


def build_run_model(run: RunCheckpoint) -> nn.Module:
    """The network of a train.py checkpoint (:func:`read_run_checkpoint`), with its weights, in eval mode.

    Raises:
        ValueError: The checkpoint names a model that is not registered, or its weights do not fit.
    """
    try:
        model = run.spec.build()
    except (TypeError, ValueError) as err:  # a name or model_kwargs this version does not know
        raise ValueError(
            f"{run.path}: cannot build {run.model_name} with model_kwargs {run.model_kwargs}: {err}"
        ) from None
    return load_weights(model, run.state_dict).eval()
