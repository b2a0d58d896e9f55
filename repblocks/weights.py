"""Weights in and out: safe reading, other code bases' layouts, train-to-deploy on load.

``load_weights`` takes our layout, the official RepVGG layout (``stage0..4``, ``rbr_dense``,
``rbr_1x1``, ``rbr_identity``, ``rbr_reparam``, ``linear``) and timm's (``stem``,
``stages.i.j``, ``conv_kxk``, ``conv_1x1``, ``identity``, ``reparam_conv``, ``head.fc``), in train
or deploy form, wrapped by DDP (``module.``), ``torch.compile`` (``_orig_mod.``) or a Lightning
module (``model.``). Pickles are read with ``weights_only=True`` only: a checkpoint that needs
arbitrary objects is refused, never executed. We write weights as safetensors.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from repblocks.blocks import RepBlock
from repblocks.files import atomic_path

__all__ = [
    "LAYOUTS",
    "convert_layout",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "save_weights",
    "to_repblocks_layout",
]

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
WeightsSource = str | os.PathLike | Mapping[str, Tensor]

# Keys under which checkpoints of various trainers keep the state dict.
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
# Prefixes that wrappers add to every key: DDP, torch.compile, a LightningModule's attribute.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

_Rename = tuple[str, str | Callable[[re.Match], str]]
_OFFICIAL_RENAMES: list[_Rename] = [
    (r"^stage0\.", "stem."),
    (r"^stage([1-9])\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}."),
    (r"\brbr_dense\.", "conv_kxk."),
    (r"\brbr_1x1\.", "conv_1x1."),
    (r"\brbr_identity\.", "identity."),
    (r"\brbr_reparam\.", "reparam."),
    (r"^linear\.", "head.fc."),
]
_TIMM_RENAMES: list[_Rename] = [
    (r"\breparam_conv\.", "reparam."),
    (r"\battn\.fc1\.", "se.down."),
    (r"\battn\.fc2\.", "se.up."),
]

# Ours -> theirs, for handing our weights to the official code or to timm.
_TO_OFFICIAL: list[_Rename] = [
    (r"^stem\.", "stage0."),
    (r"^stages\.(\d+)\.", lambda m: f"stage{int(m[1]) + 1}."),
    (r"\bconv_kxk\.", "rbr_dense."),
    (r"\bconv_1x1\.", "rbr_1x1."),
    (r"\bidentity\.", "rbr_identity."),
    (r"\breparam\.", "rbr_reparam."),
    (r"^head\.fc\.", "linear."),
]
_TO_TIMM: list[_Rename] = [
    (r"\breparam\.", "reparam_conv."),
    (r"\bse\.down\.", "attn.fc1."),
    (r"\bse\.up\.", "attn.fc2."),
]
LAYOUTS = ("repblocks", "official", "timm")


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

    Pickles are read with ``weights_only=True``; a ``.safetensors`` file gives its dict of tensors.
    Use this to see what a checkpoint holds beside its weights (a Lightning checkpoint's
    ``hyper_parameters``); use :func:`read_state_dict` for the weights alone.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a checkpoint, is truncated or corrupted, or would need to run
            code to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError and others on bad headers
            raise ValueError(f"cannot read {path}: not a valid safetensors file ({err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _is_pickle(path) or "Unsupported global" in str(err):
            raise ValueError(
                f"refusing to load {path}: it is a pickle that torch's safe loader (weights_only=True) does not "
                f"accept, and unpickling it fully could run code ({_unpickler_reason(err)})"
            ) from None
        raise ValueError(f"cannot read {path}: not a PyTorch checkpoint ({_unpickler_reason(err)})") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, zip and pickle errors for junk and truncation
        raise ValueError(f"cannot read {path}: not a PyTorch checkpoint, or truncated/corrupted ({err})") from None


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
            return dict(obj)
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], what)
        keys = ", ".join(map(str, list(obj)[:10]))
        raise ValueError(f"{what} holds no state dict of tensors (top-level keys: {keys or 'none'})")
    raise ValueError(f"{what} holds a {type(obj).__name__}, not a state dict")


def to_repblocks_layout(
    state_dict: Mapping[str, Tensor], roots: set[str] | None = None, keep: Collection[str] = ()
) -> StateDict:
    """Rename keys of the official RepVGG or timm layout to ours, dropping wrapper prefixes.

    Args:
        state_dict: Keys in any supported layout.
        roots: First key components of the target model (``{"stem", "stages", "head"}`` for
            RepVGG); wrapper prefixes are stripped until keys start with one of them.
        keep: Keys the target model has as they are; never renamed, so that loading into a
            model of another layout (a timm model with ``attn.fc1``, say) leaves its keys alone.
    """
    state_dict = _strip_wrappers(dict(state_dict), roots or {"stem", "stages", "head"})
    official = any(re.match(r"^stage\d\.|.*\brbr_", key) for key in state_dict)
    renames = _OFFICIAL_RENAMES if official else _TIMM_RENAMES
    return {key if key in keep else _rename(key, renames): value for key, value in state_dict.items()}


def convert_layout(state_dict: Mapping[str, Tensor], layout: str) -> StateDict:
    """Rename a state dict of our layout to ``layout`` (one of :data:`LAYOUTS`).

    The official RepVGG code and timm then load it with a plain ``load_state_dict``.
    """
    renames = {"repblocks": [], "official": _TO_OFFICIAL, "timm": _TO_TIMM}.get(layout)
    if renames is None:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    return {_rename(key, renames): value for key, value in state_dict.items()}


def _rename(key: str, renames: list[_Rename]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _strip_wrappers(state_dict: StateDict, roots: set[str]) -> StateDict:
    roots = roots | {"stage0", "linear"}  # the official layout's roots count as arrived too
    while state_dict and not any(key.split(".")[0] in roots for key in state_dict):
        for prefix in _WRAPPER_PREFIXES:
            inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            # A Lightning checkpoint may hold more than the model (an EMA copy, loss buffers): keep the model.
            if inner and (len(inner) == len(state_dict) or prefix == "model."):
                state_dict = inner
                break
        else:
            break
    return state_dict


def load_weights(model: nn.Module, source: WeightsSource, *, strict: bool = True) -> nn.Module:
    """Load weights from a file or state dict into ``model``, in place, and return it.

    Train-form weights loaded into a deploy-form model (``deploy=True``) are fused on the way.

    Args:
        model: The model to fill.
        source: A path (``.pth``, ``.pt``, ``.ckpt``, ``.safetensors``) or a state dict.
        strict: Raise when keys are missing or unexpected; otherwise log them and load the rest.

    Raises:
        ValueError: The weights do not fit the model (the message names the keys), or the file
            cannot be read safely (see :func:`read_state_dict`).
    """
    expected = model.state_dict()
    roots = {key.split(".")[0] for key in expected}
    state_dict = to_repblocks_layout(read_state_dict(source), roots, keep=expected.keys())
    state_dict = _fuse_train_form_into_deploy(model, state_dict)
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [
        f"{k}: {tuple(state_dict[k].shape)} in the weights, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    name = type(model).__name__
    if reshaped or (strict and (missing or unexpected)):
        raise ValueError(f"weights do not fit {name}: " + _describe(missing, unexpected, reshaped))
    if missing or unexpected:
        log.warning("loading into %s with strict=False: %s", name, _describe(missing, unexpected, []))
    for key in expected:  # older checkpoints lack BN's step counter; it does not affect outputs
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = expected[key]
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return model


def _describe(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} keys with another shape ({some(reshaped)})")
    hint = ""
    if any(k.endswith("reparam.weight") for k in unexpected) and any(".conv_kxk." in k for k in missing):
        hint = "; these are deploy-form weights: build the model with deploy=True"
    return "; ".join(parts) + hint


def _fuse_train_form_into_deploy(model: nn.Module, state_dict: StateDict) -> StateDict:
    """Where the model has a fused block and the weights have its branches, fuse them now."""
    for name, block in model.named_modules():
        if not isinstance(block, RepBlock) or not block.deploy:
            continue
        prefix = f"{name}." if name else ""
        branch_keys = [
            k
            for k in state_dict
            if k.startswith(prefix) and re.match(r"(conv_kxk|conv_1x1|identity)\.", k[len(prefix) :])
        ]
        if not branch_keys or f"{prefix}reparam.weight" in state_dict:
            continue
        train_block = RepBlock(
            block.in_channels,
            block.out_channels,
            stride=block.stride,
            groups=block.groups,
            kernel_size=block.kernel_size,
            act=None,
        )
        branches = {k[len(prefix) :]: state_dict.pop(k) for k in branch_keys}
        try:
            train_block.load_state_dict(branches, strict=False)
        except RuntimeError as err:
            raise ValueError(f"weights do not fit block {name!r}: {str(err).splitlines()[-1].strip()}") from None
        train_block.to(dtype=next(iter(branches.values())).dtype).switch_to_deploy()
        state_dict[f"{prefix}reparam.weight"] = train_block.reparam.weight.detach()
        state_dict[f"{prefix}reparam.bias"] = train_block.reparam.bias.detach()
    return state_dict


def save_weights(
    source: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write a model's (or a state dict's) weights to ``path`` as safetensors, atomically.

    The file is written under a temporary name in the same folder and renamed, so a failure
    never leaves half a file at ``path``.
    """
    state_dict = source.state_dict() if isinstance(source, nn.Module) else source
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return Path(path)
