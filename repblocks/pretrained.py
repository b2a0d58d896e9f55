"""Weights for ``create_model(name, pretrained=...)``: a file in any layout we read, or timm's published weights.

A classifier's weights fit a model with another number of classes, or a backbone without a head:
everything else loads and the classifier stays fresh (as in timm), and the log says so. timm is
imported only when its weights are asked for, so the core does not need it.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from collections.abc import Mapping

from torch import Tensor, nn

from repblocks.checkpoint import StateDict, WeightsSource, read_state_dict
from repblocks.layouts import to_repblocks_layout
from repblocks.provenance import recorded_metadata
from repblocks.weights import load_weights

__all__ = ["classifier_classes", "load_pretrained", "read_pretrained", "timm_state_dict"]

log = logging.getLogger(__name__)


def read_pretrained(name: str, pretrained: bool | str | os.PathLike, *, pretrained_cfg: Mapping) -> StateDict | None:
    """The state dict ``pretrained`` asks for (None for False): a file's, or timm's (True).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be read safely, or timm's weights cannot be had (one line: why, and what to do).
    """
    if pretrained is False:
        return None
    if pretrained is True:
        return timm_state_dict(name, pretrained_cfg=pretrained_cfg)
    return read_state_dict(pretrained)


def timm_state_dict(name: str, *, pretrained_cfg: Mapping) -> StateDict:
    """timm's published weights for ``name`` (train form, timm's layout): from the Hugging Face cache, else downloaded.

    A download starts only after one connection to the Hub has succeeded: offline, huggingface_hub
    retries a failing connection for about a minute, so without the Hub (or with ``HF_HUB_OFFLINE=1``)
    this fails at once, saying how to fetch the file.

    Raises:
        ValueError: timm has no weights for this variant, timm is not installed, the weights are not
            in the cache, or they cannot be read: the message says where to get the file, to pass as
            ``pretrained=PATH``.
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        raise ValueError(f"timm publishes no weights for {name}; pass pretrained=PATH to load weights from a file")
    where = f"https://huggingface.co/{hub_id} (model.safetensors)"
    try:
        import timm
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        raise ValueError(
            f"pretrained=True reads timm's weights and needs timm (pip install timm); "
            f"or download {where} and pass pretrained=PATH"
        ) from None
    cached = [try_to_load_from_cache(hub_id, filename) for filename in ("model.safetensors", "pytorch_model.bin")]
    cached = next((path for path in cached if isinstance(path, str)), None)  # reads the cache's folders only
    if cached is None and (unreachable := _hub_unreachable(constants)):
        raise ValueError(
            f"timm's weights for {name} are not in the download cache ({constants.HF_HUB_CACHE}) and {unreachable}: "
            f"fetch them once with `hf download {hub_id} model.safetensors`, "
            f"or download {where} and pass pretrained=PATH"
        )
    # timm reads the cached file itself ("file" comes first among its sources), with its own key fixes; else it downloads
    overlay = {"file": cached} if cached else None
    try:
        model = timm.create_model(f"{name}.{pretrained_cfg['tag']}", pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as err:  # a truncated file, an older timm: each means "no weights from timm"
        reason = (str(err).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise ValueError(
            f"could not get timm's weights for {name} from {cached or hub_id} ({type(err).__name__}: {reason}); "
            f"download {where} and pass pretrained=PATH"
        ) from None
    return model.state_dict()


def classifier_classes(state_dict: Mapping[str, Tensor], classifier: str | None) -> int | None:
    """The number of classes of the classifier in ``state_dict`` (any layout we read), or None if it has none."""
    if classifier is None:
        return None
    weight = to_repblocks_layout(state_dict).get(f"{classifier}.weight")
    return weight.shape[0] if weight is not None and weight.dim() == 2 else None


def load_pretrained(
    model: nn.Module,
    source: WeightsSource,
    *,
    classifier: str | None = "head.fc",
    metadata: Mapping[str, str] | None = None,
) -> nn.Module:
    """Load weights (a file or a state dict) into ``model`` with :func:`repblocks.load_weights`, fitting the classifier.

    What the model does not have (a backbone's head and the stages past its last level) is left
    out; a classifier of another size (or none in the file) leaves the model's own, fresh one.
    Both are logged. Everything else must fit exactly. ``metadata`` is what the file of a given state
    dict records (read from the file when ``source`` is a path), checked as :func:`load_weights` does.
    """
    expected = model.state_dict()
    roots = {key.split(".")[0] for key in expected} | {"head"}
    state_dict = to_repblocks_layout(read_state_dict(source), roots, keep=expected.keys())
    state_dict = _without_absent_modules(model, state_dict)
    if classifier is not None:
        state_dict = _fit_classifier(state_dict, expected, classifier)
    return load_weights(model, state_dict, metadata=recorded_metadata(source) if metadata is None else metadata)


def _without_absent_modules(model: nn.Module, state_dict: StateDict) -> StateDict:
    """A ``features_only`` backbone has no head and no stages past its last returned level: drop their weights."""
    if not getattr(model, "features_only", False):
        return state_dict
    kept_stages, all_stages = len(getattr(model, "stages", ())), len(getattr(model, "feature_info", ())) - 1
    absent = ["head."] + [f"stages.{i}." for i in range(kept_stages, all_stages)]
    dropped = {key for key in state_dict if key.startswith(tuple(absent))}
    if dropped:
        modules = sorted({".".join(key.split(".")[:2]) if key.startswith("stages.") else "head" for key in dropped})
        log.info("loading a backbone (features_only): left out %s, which it does not have", ", ".join(modules))
    return {key: value for key, value in state_dict.items() if key not in dropped}


def _fit_classifier(state_dict: StateDict, expected: Mapping[str, Tensor], classifier: str) -> StateDict:
    """Where the file's classifier does not fit the model's, keep the model's fresh one."""
    prefix = f"{classifier}."
    theirs = {key: value for key, value in state_dict.items() if key.startswith(prefix)}
    ours = {key: value for key, value in expected.items() if key.startswith(prefix)}
    fits = theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in ours)
    if fits:
        return state_dict

    def described(weights: Mapping[str, Tensor]) -> str:
        weight = weights.get(f"{prefix}weight")
        return f"{weight.shape[0]} classes" if weight is not None else "no classifier"

    log.info(
        "the weights have %s, the model %s: loaded everything else, the model's %s is left fresh",
        described(theirs),
        described(ours),
        classifier,
    )
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}
    return {**state_dict, **ours}


HUB_PROBE_TIMEOUT_S = 3.0  # one connection attempt; a reachable Hub answers in well under a second


def _hub_unreachable(constants) -> str | None:
    """Why the Hub cannot be downloaded from (offline mode, or one connection attempt failed), or None."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)  # HF_ENDPOINT: the Hub or a mirror
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{endpoint.hostname} cannot be reached ({type(err).__name__}: {err})"
    return None
