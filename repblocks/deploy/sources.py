"""The network to deploy, from a train.py checkpoint, deploy.py's own export, a weights file, the registry, or torchvision.

Files are read with ``weights_only=True`` only (:mod:`repblocks.checkpoint`): a checkpoint that
would need to run code to load is refused. A train.py checkpoint says how to rebuild its network
(:class:`repblocks.run_checkpoint.RunCheckpoint`), and so does the metadata of a ``model.safetensors``
that deploy.py wrote; a bare weights file needs ``model=NAME``. What a file says to build passes
:func:`repblocks.run_checkpoint.model_spec`: architecture arguments only (a file never makes us
download or open anything else), sizes checked before anything is allocated. Weights already in deploy form
(ours, the official code's ``rbr_reparam`` or timm's ``reparam_conv``) are loaded into a model
built in deploy form, and there is nothing left to convert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from repblocks.checkpoint import DEPLOY_FORM, StateDict, read_checkpoint, read_safetensors_metadata, read_state_dict
from repblocks.convert import switch_to_deploy
from repblocks.deploy import preprocessing
from repblocks.errors import UserError, user_errors
from repblocks.layouts import to_repblocks_layout
from repblocks.numerics import randomize_bn_
from repblocks.pretrained import classifier_classes
from repblocks.registry import create_model, list_models
from repblocks.run_checkpoint import (
    RunCheckpoint,
    build_run_model,
    class_names_from_metadata,
    read_run_checkpoint,
    resolve_run_checkpoint,
    spec_from_deploy_metadata,
)
from repblocks.weights import load_weights

__all__ = ["DEPLOY_FORM", "TORCHVISION", "Network", "check_model_names", "load_network", "read_deploy_metadata"]

TORCHVISION = "torchvision:"


@dataclass
class Network:
    """A loaded network and what is needed to rebuild, describe and feed it."""

    name: str  # registry name, or "torchvision:NAME"
    model: nn.Module  # train form (deploy form when the weights were), eval mode, float32 on the CPU
    rebuild_deploy: Callable[[], nn.Module]  # an empty deploy-form model with the same structure
    num_classes: int
    preprocessing: dict  # input_size [C, H, W], mean, std, crop_pct, interpolation, source (deploy.preprocessing)
    in_chans: int = 3
    origin: str = ""  # where the weights came from, for the report
    model_kwargs: dict = field(default_factory=dict)
    data: Mapping | None = None  # the checkpoint's data config, for verification on real images
    form: str = "train"  # "deploy": the weights were already in deploy form, nothing to convert
    class_names: list[str] | None = None  # by class index, when the training run recorded them

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image: what the exports take."""
        channels, height, width = self.preprocessing["input_size"]
        return channels, height, width


def load_network(
    *,
    ckpt: str | None = None,
    model: str | None = None,
    source: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Network:
    """Load the network to deploy, in eval mode, from exactly one of these.

    Args:
        ckpt: A train.py checkpoint (architecture and classes read from it), a train.py run
            directory (its best checkpoint, from ``metrics.json``), deploy.py's ``model.safetensors``
            (architecture read from its metadata), or a weights file in any layout
            :func:`repblocks.load_weights` reads, in train or deploy form, then with ``model``.
        model: A registry name: the architecture of ``ckpt``'s bare weights, or, alone, random
            weights with random BN statistics (to time an architecture).
        source: ``torchvision:NAME``, a torchvision classifier with random weights and BN statistics.
        num_classes: Classifier outputs; None: from the checkpoint or the weights, else 1000.
        seed: Seed of the random BN statistics.

    Raises:
        UserError: A missing or unreadable file, weights that do not fit, an unknown name (the
            message lists what exists), or not exactly one thing to load.
    """
    if (ckpt and source) or (source and model):
        raise UserError("give one of ckpt=PATH, model=NAME, source=torchvision:NAME (ckpt with model for bare weights)")
    with user_errors():
        if source:
            return _torchvision_network(source, num_classes or 1000, seed=seed)
        if ckpt:
            return _checkpoint_network(resolve_run_checkpoint(ckpt), model, num_classes)
        if model:
            network = randomize_bn_(_build(model, num_classes=num_classes or 1000), seed=seed)
            return _registry_network(model, network.eval(), origin="random weights, random BN statistics")
    raise UserError("nothing to deploy: give ckpt=PATH, model=NAME or source=torchvision:NAME")


def check_model_names(names: Sequence[str]) -> None:
    """Check registry and ``torchvision:NAME`` names before any is built.

    Raises:
        UserError: An unknown name; the message lists what exists.
    """
    for name in names:
        if name.startswith(TORCHVISION):
            _torchvision_name(name)
        elif name not in list_models():
            raise UserError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")


def read_deploy_metadata(path: str | Path) -> dict[str, str] | None:
    """The header metadata of a ``.safetensors`` file that deploy.py wrote (``form=deploy``), else None."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        metadata = read_safetensors_metadata(path)
    except (FileNotFoundError, ValueError):  # missing or not safetensors: read_checkpoint says so in its own words
        return None
    return metadata if metadata.get("form") == DEPLOY_FORM and "model" in metadata else None


def _build(name: str, *, deploy: bool = False, **kwargs) -> nn.Module:
    if name.startswith(TORCHVISION):
        raise UserError(f"{name} is a torchvision model: pass it as source={name}")
    try:
        return create_model(name, deploy=deploy, **kwargs)
    except (TypeError, ValueError) as err:  # model_kwargs read from a file that the constructor does not take
        raise UserError(f"cannot build {name} with {kwargs}: {err}") from None


def _registry_network(
    name: str,
    model: nn.Module,
    *,
    origin: str,
    found: Sequence[tuple[str, Mapping | None]] = (),
    form: str = "train",
    **extra,
) -> Network:
    kwargs = dict(extra.pop("model_kwargs", {}))
    num_classes, in_chans = model.num_classes, extra.pop("in_chans", 3)

    def rebuild() -> nn.Module:
        return create_model(name, deploy=True, num_classes=num_classes, in_chans=in_chans, **kwargs)

    found = [*found, ("the model's pretrained_cfg", preprocessing.model_config(model))]
    return Network(
        name=name,
        model=model,
        rebuild_deploy=rebuild,
        num_classes=num_classes,
        preprocessing=preprocessing.resolve(in_chans=in_chans, found=found, what=origin),
        in_chans=in_chans,
        origin=origin,
        model_kwargs=kwargs,
        form=form,
        **extra,
    )


def _checkpoint_network(ckpt: Path, model: str | None, num_classes: int | None) -> Network:
    metadata = read_deploy_metadata(ckpt)
    if metadata is not None:
        return _deployed_network(ckpt, metadata, model, num_classes)
    checkpoint = read_checkpoint(ckpt)
    run = read_run_checkpoint(ckpt, checkpoint)
    if run is not None:
        return _run_network(run, model)
    if not model:
        raise UserError(
            f"{ckpt} is not a train.py checkpoint (no hyper_parameters.model_name); "
            "for a bare weights file, name its architecture: model=NAME"
        )
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{ckpt} holds a {type(checkpoint).__name__}, not a state dict")
    state = read_state_dict(checkpoint)
    num_classes = num_classes or classifier_classes(state, "head.fc") or 1000
    deploy = _in_deploy_form(state)
    network = load_weights(_build(model, num_classes=num_classes, deploy=deploy), state).eval()
    if deploy:
        origin = f"weights file {ckpt}, already in deploy form"
        return _registry_network(model, network, origin=origin, form=DEPLOY_FORM)
    return _registry_network(model, network, origin=f"weights file {ckpt}")


def _deployed_network(path: Path, metadata: Mapping[str, str], model: str | None, num_classes: int | None) -> Network:
    """deploy.py's own ``model.safetensors``: its metadata says what to build."""
    spec = spec_from_deploy_metadata(metadata, what=str(path))
    name, saved_classes, in_chans, kwargs = spec.name, spec.num_classes, spec.in_chans, spec.model_kwargs
    if model and model != name:
        raise UserError(f"{path} holds a {name} (its metadata says so), but model={model} was given; leave model unset")
    if num_classes is not None and num_classes != saved_classes:
        raise UserError(f"{path} holds a {saved_classes}-class {name}, but num_classes={num_classes} was given")
    found = [(f"{path.name}'s metadata", preprocessing.from_metadata(metadata))]
    origin = f"{path}, written by deploy.py, already in deploy form"
    names = class_names_from_metadata(metadata, num_classes=saved_classes, what=str(path))
    if name.startswith(TORCHVISION):
        network = _torchvision_network(name, saved_classes, seed=0, weights=path, found=found)
        network.class_names = names
        return network
    plain = _build(name, num_classes=saved_classes, in_chans=in_chans, deploy=True, **kwargs)
    plain = load_weights(plain, path).eval()
    return _registry_network(
        name,
        plain,
        origin=origin,
        found=found,
        form=DEPLOY_FORM,
        model_kwargs=kwargs,
        in_chans=in_chans,
        class_names=names,
    )


def _run_network(run: RunCheckpoint, model: str | None) -> Network:
    if model and model != run.model_name:
        raise UserError(f"{run.path} holds a {run.model_name}, but model={model} was given; leave model unset")
    if run.model_name.startswith(TORCHVISION):
        raise UserError(f"{run.path} names {run.model_name}: pass it as source={run.model_name}")
    model = build_run_model(run)
    return _registry_network(
        run.model_name,
        model,
        origin=f"train.py checkpoint {run.path} (weights under {run.weights_prefix!r})",
        found=[
            ("the checkpoint's preprocessing", run.preprocessing),
            ("the checkpoint's image_size", {"input_size": run.image_size}),
        ],
        model_kwargs=run.model_kwargs,
        in_chans=run.in_chans,
        data=run.data,
        class_names=run.class_names,
    )


def _in_deploy_form(state_dict: StateDict) -> bool:
    """Whether weights of any layout hold fused convs (``reparam``, ``rbr_reparam``, ``reparam_conv``) and no branches."""
    keys = list(to_repblocks_layout(state_dict))
    fused = any(key.endswith("reparam.weight") for key in keys)
    return fused and not any(part == "conv_kxk" for key in keys for part in key.split("."))


def _torchvision_network(
    source: str, num_classes: int, *, seed: int, weights: Path | None = None, found: list = ()
) -> Network:
    import torchvision  # ~1 s to import: only when asked for

    name = _torchvision_name(source)

    def build() -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    def rebuild() -> nn.Module:
        # Folding a fresh model gives the structure of any folded one: where Conv+BN pairs become convs with bias.
        return switch_to_deploy(build())

    if weights is None:
        model, form = randomize_bn_(build(), seed=seed).eval(), "train"
        origin = "torchvision, random weights (weights=None), random BN statistics"
    else:
        model, form = load_weights(rebuild(), weights).eval(), DEPLOY_FORM
        origin = f"{weights}, written by deploy.py, already in deploy form (Conv+BN folded)"
    return Network(
        name=source,
        model=model,
        rebuild_deploy=rebuild,
        num_classes=num_classes,
        preprocessing=preprocessing.resolve(
            in_chans=3, found=[*found, preprocessing.torchvision_preprocessing(name)], what=origin
        ),
        origin=origin,
        form=form,
    )


def _torchvision_name(source: str) -> str:
    """``resnet18`` for ``torchvision:resnet18``; an unknown name is a :class:`UserError` that lists the known ones."""
    import torchvision

    prefix, _, name = source.partition(":")
    if f"{prefix}:" != TORCHVISION or not name:
        raise UserError(f"unknown source {source!r}; known: torchvision:NAME")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UserError(f"unknown torchvision classification model {name!r}; known: {', '.join(known)}")
    return name
