"""torchvision's classifiers in the registry, as ``tv_<name>``, plain or expanded with re-parameterizable branches.

``create_model("tv_resnet18", num_classes=10, expand="repvgg")`` builds torchvision's ResNet-18 with
every eligible kxk Conv+BN replaced by a training block (:func:`repblocks.expand`); its deploy form
(``switch_to_deploy``, or ``deploy=True``) is torchvision's own class, whose state dict loads into
``torchvision.models.resnet18(num_classes=10)``. Without ``expand`` the model is torchvision's, and its
deploy form folds every Conv+BN pair, as for any plain network.

torchvision is imported when such a model is built, never when the registry loads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial

from torch import nn

from repblocks.convert import switch_to_deploy
from repblocks.expand import expand as expand_model
from repblocks.models.base import IMAGENET_MEAN, IMAGENET_STD
from repblocks.pretrained import load_pretrained
from repblocks.registry import register_model

__all__ = ["TORCHVISION_CLASSIFIERS"]

# torchvision's name -> its classifier's module name (timm's pretrained_cfg "classifier").
TORCHVISION_CLASSIFIERS: dict[str, str] = {
    "resnet18": "fc",
    "resnet50": "fc",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3_small": "classifier.3",
    "regnet_x_400mf": "fc",
    "efficientnet_b0": "classifier.1",
}


def _create_torchvision(
    tv_name: str,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    deploy: bool = False,
    features_only: bool = False,
    expand: str | Mapping | None = None,
    online: bool = False,
    weights: str | os.PathLike | None = None,
) -> nn.Module:
    """torchvision's ``tv_name``, expanded with the branch set ``expand`` (None: plain).

    Args:
        weights: A file of weights for torchvision's own class (e.g. from torchvision's download cache),
            loaded before expanding, so the expanded model starts as the pretrained one; a classifier
            of another size is left fresh. (``create_model(pretrained=PATH)`` loads after the builder,
            into the expanded model, whose keys differ.) Not read for ``deploy=True``: those weights
            are replaced anyway.
        expand: A branch-set name (``"repvgg"``...) or dict for :func:`repblocks.expand`; None for the plain model.
        online: Online re-parameterization blocks instead of RepBlock (with ``expand``).
        deploy: The deploy form: torchvision's class itself when expanded, else Conv+BN folded.
    """
    if features_only:
        raise ValueError(f"tv_{tv_name}: features_only is not offered for torchvision models; use the classifier")
    if in_chans != 3:
        raise ValueError(f"tv_{tv_name} takes 3-channel images (in_chans=3), got in_chans={in_chans}")
    if online and expand is None:
        raise ValueError(f"tv_{tv_name}: online=True needs a branch set to expand with (expand=repvgg, ...)")
    try:
        import torchvision
    except ImportError:
        raise ValueError(f"tv_{tv_name} needs torchvision: pip install torchvision") from None
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    model.num_classes = num_classes  # what the trainer and deploy read, as on every model of the zoo
    if weights is not None and not deploy:
        load_pretrained(model, weights, classifier=TORCHVISION_CLASSIFIERS[tv_name])
    if deploy:
        # An expanded model collapses back to torchvision's class itself; a plain one has its Conv+BN folded.
        return model if expand is not None else switch_to_deploy(model, inplace=True)
    if expand is None:
        return model
    return expand_model(model, expand, online=online, inplace=True).model


def _pretrained_cfg(tv_name: str, classifier: str) -> dict:
    return dict(
        architecture=f"tv_{tv_name}",
        tag=None,
        hf_hub_id=None,  # torchvision publishes its own: pass their file as weights=PATH
        input_size=(3, 224, 224),
        interpolation="bilinear",
        crop_pct=0.875,
        crop_mode="center",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=1000,
        classifier=classifier,
    )


for _name, _classifier in TORCHVISION_CLASSIFIERS.items():
    register_model(
        f"tv_{_name}", partial(_create_torchvision, _name), pretrained_cfg=_pretrained_cfg(_name, _classifier)
    )
