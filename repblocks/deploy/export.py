"""The export stage: each format asked for, written by its engine and checked before it takes its final name.

Every engine of :mod:`repblocks.deploy.engines` that ``export.formats`` names writes its file(s) into
the staging folder, one per precision it exports (Core ML: fp32 and fp16), at the model's own input
size (``Network.input_shape``), whatever size is timed. Each engine reads its file back with its own
runtime and checks it against the model before the file takes its final name, so a failed export or
check never leaves a file, whole or half, at the final name. Every file carries the deploy metadata
(:func:`deploy_metadata`): how to rebuild the model and prepare its images.

A file whose outputs differ from the model's stops the run (:class:`~repblocks.errors.OutputMismatch`):
it is never shipped. A converter that cannot take the network at all (Core ML's converter on an op it
lacks, LiteRT's on a 4-D batched matmul) is another matter: that format is reported as not converted,
with the converter's own reason, whatever it left in the staging folder is removed, and the other
formats go on.

With ``quantize=int8``, each engine's int8 model that passed the accuracy gate is written too
(:func:`export_int8`), read back and checked against the int8 model that was gated, and so is each
reduced float precision (``quantize.floats``: OpenVINO's bf16, fp16) that passed the same gate.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from repblocks import run_checkpoint
from repblocks.deploy.engines import by_format, by_name
from repblocks.deploy.engines.base import LAYOUTS, Check, Export, Int8Model, one_line
from repblocks.deploy.sources import Network
from repblocks.errors import UserError, user_errors
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
) -> tuple[dict[str, Export], dict[str, str]]:
    """Write each format of ``export.formats``, at the model's own input size.

    Returns:
        What was written, by format, and the formats whose converter could not take the network, each with
        its reason in one line. The keys are the formats, and ``<format>_<precision>`` for a reduced
        precision an engine writes beside its fp32 file (``coreml_fp16``).

    Args:
        into: The folder to write into (the staging folder).
        out_dir: Where the files will be once the run is done: the paths returned.

    Raises:
        UserError: An export does not reproduce the model within ``verify``'s tolerance.
    """
    example = torch.randn(2, *network.input_shape, generator=torch.Generator().manual_seed(seed))  # (2, C, H, W)
    metadata = deploy_metadata(network)
    check = Check(verify.atol, verify.rtol, onnx_opset=export.onnx_opset, layout=export.layout)
    exports, not_converted = {}, {}
    for fmt in export.formats:
        entry = by_format(fmt)
        engine = entry.load()
        for precision in entry.export_precisions:
            key = fmt if precision == "fp32" else f"{fmt}_{precision}"
            name = entry.files[precision]
            log.info("exporting %s", fmt if precision == "fp32" else f"{fmt} {precision}")
            before = set(Path(into).iterdir())
            try:
                info = engine.export(plain, Path(into) / name, example, metadata, check=check, precision=precision)
            except (UserError, MemoryError):
                raise  # a file that does not reproduce the model (OutputMismatch), or bad input: the run stops
            except Exception as err:  # the converter cannot take this network: say which and why, go on
                _remove_new(Path(into), before)
                check_interrupted()
                not_converted[key] = one_line(err)
                log.warning("%s does not convert %s: %s; the other formats go on", key, network.name, one_line(err))
                break  # its other precisions would fail the same way
            check_interrupted()  # a signal the engine's library swallowed: stop before the next engine
            exports[key] = Export.from_info(info, path=Path(out_dir) / name, input_shape=network.input_shape)
    return exports, not_converted


def _remove_new(folder: Path, before: set[Path]) -> None:
    """Whatever a failed converter left in ``folder`` beside what was there: no half-written file is ever shipped."""
    for path in set(folder.iterdir()) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


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
