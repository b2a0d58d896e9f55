"""The network to deploy, from a train.py checkpoint, a weights file, the registry, or torchvision.

Files are read with ``weights_only=True`` only (:mod:`repblocks.checkpoint`): a checkpoint that
would need to run code to load is refused. A train.py checkpoint says how to rebuild its network
(:class:`repblocks.checkpoint.RunCheckpoint`); a bare weights file needs ``model=NAME``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from repblocks.checkpoint import (
    RunCheckpoint,
    read_checkpoint,
    read_run_checkpoint,
    read_state_dict,
    resolve_run_checkpoint,
)
from repblocks.convert import switch_to_deploy
from repblocks.errors import UserError, user_errors
from repblocks.layouts import to_repblocks_layout
from repblocks.numerics import randomize_bn_
from repblocks.registry import create_model
from repblocks.weights import build_run_model, load_weights

__all__ = ["TORCHVISION", "Network", "load_network"]

TORCHVISION = "torchvision:"


@dataclass
class Network:
    """A loaded network in train form and what is needed to rebuild and describe it."""

    name: str  # registry name, or "torchvision:NAME"
    model: nn.Module  # train form, eval mode, float32 on the CPU
    rebuild_deploy: Callable[[], nn.Module]  # an empty deploy-form model with the same structure
    num_classes: int
    in_chans: int = 3
    image_size: int | None = None  # what it was trained at, when known
    origin: str = ""  # where the weights came from, for the report
    model_kwargs: dict = field(default_factory=dict)
    data: Mapping | None = None  # the checkpoint's data config, for verification on real images


def load_network(
    *,
    ckpt: str | None = None,
    model: str | None = None,
    source: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Network:
    """Load the network to deploy, in train form and eval mode, from exactly one of these.

    Args:
        ckpt: A train.py checkpoint (architecture and classes read from it), a train.py run
            directory (its best checkpoint, from ``metrics.json``), or a weights file in
            any layout :func:`repblocks.load_weights` reads, then with ``model``.
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
            return _checkpoint_network(str(resolve_run_checkpoint(ckpt)), model, num_classes)
        if model:
            network = randomize_bn_(_build(model, num_classes=num_classes or 1000), seed=seed)
            return _registry_network(model, network.eval(), origin="random weights, random BN statistics")
    raise UserError("nothing to deploy: give ckpt=PATH, model=NAME or source=torchvision:NAME")


def _build(name: str, *, deploy: bool = False, **kwargs) -> nn.Module:
    if name.startswith(TORCHVISION):
        raise UserError(f"{name} is a torchvision model: pass it as source={name}")
    return create_model(name, deploy=deploy, **kwargs)


def _registry_network(name: str, model: nn.Module, *, origin: str, **extra) -> Network:
    kwargs = dict(extra.pop("model_kwargs", {}))
    num_classes, in_chans = model.num_classes, extra.pop("in_chans", 3)

    def rebuild() -> nn.Module:
        return create_model(name, deploy=True, num_classes=num_classes, in_chans=in_chans, **kwargs)

    return Network(name, model, rebuild, num_classes, in_chans, origin=origin, model_kwargs=kwargs, **extra)


def _checkpoint_network(ckpt: str, model: str | None, num_classes: int | None) -> Network:
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
    num_classes = num_classes or _classes_in(checkpoint) or 1000
    network = load_weights(_build(model, num_classes=num_classes), checkpoint).eval()
    return _registry_network(model, network, origin=f"weights file {ckpt}")


def _run_network(run: RunCheckpoint, model: str | None) -> Network:
    if model and model != run.model_name:
        raise UserError(f"{run.path} holds a {run.model_name}, but model={model} was given; leave model unset")
    if run.model_name.startswith(TORCHVISION):
        raise UserError(f"{run.path} names {run.model_name}: pass it as source={run.model_name}")
    return _registry_network(
        run.model_name,
        build_run_model(run),
        origin=f"train.py checkpoint {run.path} (weights under {run.weights_prefix!r})",
        model_kwargs=run.model_kwargs,
        in_chans=run.in_chans,
        image_size=run.image_size,
        data=run.data,
    )


def _classes_in(state_dict: Mapping) -> int | None:
    """The classifier's output count in weights of any layout, or None when there is none."""
    try:
        head = to_repblocks_layout(read_state_dict(state_dict)).get("head.fc.weight")
    except ValueError:  # no state dict in it; load_weights will say so
        return None
    return int(head.shape[0]) if isinstance(head, Tensor) and head.dim() == 2 else None


def _torchvision_network(source: str, num_classes: int, *, seed: int) -> Network:
    import torchvision  # ~1 s to import: only when asked for

    prefix, _, name = source.partition(":")
    if f"{prefix}:" != TORCHVISION or not name:
        raise UserError(f"unknown source {source!r}; known: torchvision:NAME")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UserError(f"unknown torchvision classification model {name!r}; known: {', '.join(known)}")

    def build() -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    model = randomize_bn_(build(), seed=seed).eval()
    # Folding a fresh model gives the structure of any folded one: where Conv+BN pairs become convs with bias.
    return Network(
        source,
        model,
        lambda: switch_to_deploy(build()),
        num_classes,
        origin="torchvision, random weights (weights=None), random BN statistics",
    )
