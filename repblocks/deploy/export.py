"""The export stage: each format asked for, written by its engine and checked before it takes its final name.

Every engine of :mod:`repblocks.deploy.engines` that ``export.formats`` names writes its file(s) into
the staging folder, one per precision it exports (Core ML: fp32 and fp16), at the model's own input
size (``Network.input_shape``), whatever size is timed. Each engine reads its file back with its own
runtime and checks it against the model before the file takes its final name, so a failed export or
check never leaves a file, whole or half, at the final name. Every file carries the deploy metadata
(:func:`deploy_metadata`): how to rebuild the model and prepare its images.

With ``quantize=int8``, each engine's int8 model that passed the accuracy gate is written too
(:func:`export_int8`), read back and checked against the int8 model that was gated, and so is each
reduced float precision (``quantize.floats``: OpenVINO's bf16, fp16) that passed the same gate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from repblocks import run_checkpoint
from repblocks.deploy.engines import by_format, by_name
from repblocks.deploy.engines.base import LAYOUTS, Check, Export, Int8Model
from repblocks.deploy.sources import Network
from repblocks.errors import user_errors
from repblocks.signals import check_interrupted

if TYPE_CHECKING:
    from repblocks.deploy.config import ExportConfig, VerifyConfig

__all__ = ["Export", "deploy_metadata", "export_all", "export_int8", "int8_metadata"]

log = logging.getLogger(__name__)


def export_all(
    network: Network,
    plain: nn.Module,
    *,
    into: Path,
    out_dir: Path,
    export: ExportConfig,
    verify: VerifyConfig,
    seed: int = 0,
) -> dict[str, Export]:
    """Write each format of ``export.formats``, at the model's own input size; return what was written, by format.

    The keys are the formats, and ``<format>_<precision>`` for a reduced precision an engine writes beside
    its fp32 file (``coreml_fp16``).

    Args:
        into: The folder to write into (the staging folder).
        out_dir: Where the files will be once the run is done: the paths returned.

    Raises:
        UserError: An export does not reproduce the model within ``verify``'s tolerance.
    """
    example = torch.randn(2, *network.input_shape, generator=torch.Generator().manual_seed(seed))  # (2, C, H, W)
    metadata = deploy_metadata(network)
    check = Check(verify.atol, verify.rtol, onnx_opset=export.onnx_opset, layout=export.layout)
    exports = {}
    for fmt in export.formats:
        entry = by_format(fmt)
        engine = entry.load()
        for precision in entry.export_precisions:
            key = fmt if precision == "fp32" else f"{fmt}_{precision}"
            name = entry.files[precision]
            log.info("exporting %s", fmt if precision == "fp32" else f"{fmt} {precision}")
            with user_errors():  # an export that does not reproduce the model stops the run in one line
                info = engine.export(plain, Path(into) / name, example, metadata, check=check, precision=precision)
            check_interrupted()  # a signal the engine's library swallowed: stop before the next engine
            exports[key] = Export.from_info(info, path=Path(out_dir) / name, input_shape=network.input_shape)
    return exports


def export_int8(
    network: Network,
    passed: Mapping[str, Int8Model],
    *,
    into: Path,
    out_dir: Path,
    verify: VerifyConfig,
    seed: int = 0,
    layout: str = LAYOUTS[0],
) -> dict[str, Export]:
    """Write the int8 model of each engine that passed the accuracy gate; each is read back and checked.

    The check compares the file, loaded by its engine, with the int8 model that was gated (same
    engine, same graph: within ``verify``'s tolerance), so what was measured is what is shipped.
    """
    example = torch.randn(2, *network.input_shape, generator=torch.Generator().manual_seed(seed))  # (2, C, H, W)
    metadata = int8_metadata(network)
    check = Check(verify.atol, verify.rtol, layout=layout)
    exports = {}
    for gated in passed.values():
        entry, precision = by_name(gated.engine), gated.precision
        file = entry.files[precision]
        log.info("exporting %s (%s)", precision, gated.engine)
        with user_errors():
            if precision == "int8":
                info = entry.load().write_int8(gated, Path(into) / file, metadata, example, check=check)
            else:  # a reduced float precision of the engine's (OpenVINO's bf16), judged by the same gate
                float_metadata = {**metadata, "precision": precision}
                info = entry.load().write_low_precision(gated, Path(into) / file, float_metadata, example, check=check)
        exports[f"{gated.engine}_{precision}"] = Export.from_info(
            {"format": f"{gated.engine} {precision}", "check": f"read back and run: outputs equal to the gated "
             f"{precision} model's", **info},
            path=Path(out_dir) / file,
            input_shape=network.input_shape,
        )  # fmt: skip
    return exports


def deploy_metadata(network: Network) -> dict[str, str]:
    """What rebuilds the deploy form and prepares its images, as strings: model, classes, kwargs, preprocessing, class names."""
    return run_checkpoint.deploy_metadata(
        model=network.name,
        num_classes=network.num_classes,
        in_chans=network.in_chans,
        model_kwargs=network.model_kwargs,
        preprocessing=network.preprocessing,
        class_names=network.class_names,
    )


def int8_metadata(network: Network) -> dict[str, str]:
    """The deploy metadata of an int8 export: :func:`deploy_metadata` and ``precision``."""
    return {**deploy_metadata(network), "precision": "int8"}
