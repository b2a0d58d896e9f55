"""Reading checkpoints safely: a file is data, never code.

Every file is read with ``torch.load(..., weights_only=True)`` (or as safetensors): a checkpoint
that needs arbitrary objects to unpickle is refused, never executed. A state dict is checked as it
is read: only real (not ``meta``) floating-point or integer tensors are weights. What our own files
say to rebuild their network (train.py checkpoints, deploy metadata) is read by
:mod:`repblocks.run_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from torch import Tensor

__all__ = [
    "DEPLOY_FORM",
    "PREPROCESSING_KEYS",
    "StateDict",
    "WeightsSource",
    "read_checkpoint",
    "read_safetensors_metadata",
    "read_state_dict",
]

StateDict = dict[str, Tensor]
WeightsSource = str | os.PathLike | Mapping[str, Tensor]

DEPLOY_FORM = "deploy"  # the ``form`` in the metadata of deploy-form weights we write
# How a model's images are prepared: the keys of timm's pretrained_cfg that say so.
PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")

# Keys under which checkpoints of various trainers keep the state dict.
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")

# Plain attribute bags that are safe to rebuild: timm's training script saves its argparse arguments
# beside the weights (timm reads its own checkpoints allowing exactly this class).
_SAFE_CLASSES = [argparse.Namespace]


class _TrainerPickle(NamedTuple):
    """A trainer's checkpoint that pickles a class of its own beside the weights, which the safe loader refuses."""

    description: str  # what the file is
    extract: str  # Python expression giving its state dict from the fully unpickled ``ckpt``
    package: str  # what unpickling it needs installed
    suffix: str  # of the extracted file's name


# Keyed by the class the unpickler names, so the refusal can say how to extract the weights from a trusted file.
_TRAINER_PICKLES = {
    "yacs.config.CfgNode": _TrainerPickle(
        "a checkpoint of the official RepVGG training script", 'ckpt["model"]', "yacs", "model"
    ),
    # meituan/YOLOv6 (yolov6/core/engine.py) saves whole fp16 modules under 'model' and 'ema';
    # its own loader (yolov6/utils/checkpoint.py) takes ckpt['ema' if ckpt.get('ema') else 'model'].float().
    "yolov6.models.yolo.Model": _TrainerPickle(
        "a YOLOv6 training checkpoint",
        'ckpt["ema" if ckpt.get("ema") else "model"].float().state_dict()',
        "YOLOv6's yolov6 package (a clone of meituan/YOLOv6 on PYTHONPATH)",
        "state_dict",
    ),
}


def read_state_dict(source: WeightsSource) -> StateDict:
    """Read a state dict from a ``.safetensors``/``.pth``/``.pt``/``.ckpt`` file, or pass a mapping through.

    Checkpoints that wrap the state dict (Lightning's ``state_dict``, ``model``, ...) are unwrapped.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: The file is not a checkpoint, is truncated or corrupted, would need to run
            code to unpickle, or holds no state dict.
    """
    if isinstance(source, Mapping):
        return _unwrap(source, "the given mapping")
    return _unwrap(read_checkpoint(source), str(source))


def read_checkpoint(path: str | os.PathLike) -> object:
    """Read a whole checkpoint file safely, as it was saved: tensors, dicts, lists, numbers, strings.

    Pickles are read with ``weights_only=True`` (which also admits ``argparse.Namespace``, as in timm's
    training checkpoints); a safetensors file, whatever its suffix, gives its dict of tensors.
    Use this to see what a checkpoint holds beside its weights (a Lightning checkpoint's
    ``hyper_parameters``); use :func:`read_state_dict` for the weights alone.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a folder.
        ValueError: The file is not a checkpoint, is truncated or corrupted, or would need to run
            code to unpickle (for a known trainer's checkpoint, the message says how to extract
            the weights where the file is trusted).
    """
    path = _existing_file(path)
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read {path}: the file is empty")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError and others on bad headers
            raise ValueError(f"cannot read {path}: not a valid safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(_SAFE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        known = next(((name, trainer) for name, trainer in _TRAINER_PICKLES.items() if name in str(err)), None)
        if known is not None:
            raise ValueError(_extraction_hint(path, *known)) from None
        if _is_pickle(path) or "Unsupported global" in str(err):
            raise ValueError(
                f"refusing to load {path}: it is a pickle that torch's safe loader (weights_only=True) does not "
                f"accept, and unpickling it fully could run code ({_unpickler_reason(err)})"
            ) from None
        raise ValueError(f"cannot read {path}: not a PyTorch checkpoint ({_unpickler_reason(err)})") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, zip and pickle errors for junk and truncation
        raise ValueError(f"cannot read {path}: not a PyTorch checkpoint, or truncated/corrupted ({err})") from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a ``.safetensors`` file's header (``{}`` when it has none), without reading tensors.

    :func:`repblocks.save_weights` writes it; deployment reads it back to rebuild the model a file is for.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a folder.
        ValueError: The file is not a valid safetensors file (truncated, corrupted, another format).
    """
    path = _existing_file(path)
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own SafetensorError and others on bad headers
        raise ValueError(f"cannot read {path}: not a valid safetensors file ({err})") from None


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def _extraction_hint(path: Path, class_name: str, trainer: _TrainerPickle) -> str:
    """One line: why the file is refused, and the command that extracts its weights where the user trusts it."""
    target = path.with_name(f"{path.stem}_{trainer.suffix}.pth")
    code = (
        f'import torch; ckpt = torch.load({json.dumps(str(path))}, map_location="cpu", weights_only=False); '
        f"torch.save({trainer.extract}, {json.dumps(str(target))})"
    )
    return (
        f"refusing to unpickle {path}: it looks like {trainer.description}, and its {class_name} is not a class "
        f"torch's safe loader accepts (unpickling it fully could run code); if you trust the file, extract its weights "
        f"once, with {trainer.package} installed: python -c {shlex.quote(code)} then load {target}"
    )


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors do: its header's length (8 bytes, little-endian), then ``{``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _is_pickle(path: Path) -> bool:
    """Whether the file starts as a pickle of protocol 2 or later does (PROTO opcode, then the protocol)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    # torch wraps the reason in paragraphs of advice; keep the reason's first sentence.
    text = str(err)
    _, marker, reason = text.partition("WeightsUnpickler error:")
    reason = reason.strip() if marker else text.strip()
    return reason.split(". ")[0].splitlines()[0][:200] if reason else "no reason given"


def _unwrap(obj: object, what: str) -> StateDict:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            if not all(isinstance(k, str) for k in obj):
                keys = ", ".join(repr(k) for k in list(obj)[:5])
                raise ValueError(f"{what} holds tensors under keys that are not parameter names ({keys})")
            _check_weights(obj, what)
            return dict(obj)
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], what)
        keys = ", ".join(map(str, list(obj)[:10]))
        raise ValueError(f"{what} holds no state dict of tensors (top-level keys: {keys or 'none'})")
    raise ValueError(f"{what} holds a {type(obj).__name__}, not a state dict")


def _check_weights(state_dict: Mapping[str, Tensor], what: str) -> None:
    """Refuse what no network's weights are: tensors without data (``meta``), complex or boolean values.

    Loaded, a meta tensor fails deep in ``load_state_dict``, and complex or boolean values would be
    cast into the model without a word.
    """
    for key, tensor in state_dict.items():
        if tensor.is_meta:
            raise ValueError(f"{what}: {key} is a meta tensor (a shape without values): the file holds no weights")
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(
                f"{what}: {key} holds {str(tensor.dtype).removeprefix('torch.')} values, not weights "
                "(floating-point or integer tensors)"
            )
