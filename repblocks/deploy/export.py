"""Export a deploy-form model to files, each checked against the model before it takes its final name.

Three formats, written under a temporary name in the destination folder and renamed only once
the file has been loaded back and its outputs match (``repblocks.files.atomic_path``), so a
failed export or check never leaves a file, whole or half, at the final name. Every format takes
the model's own input size (``Network.input_shape``), whatever size is timed:

* ``safetensors``: the weights, with metadata saying how to rebuild the model and prepare its
  images (deploy.py reads it back: ``ckpt=model.safetensors``);
* ``onnx``: through ``torch.onnx.export(dynamo=True)``, the torch.export-based exporter that is
  torch's default since 2.9 (the TorchScript-based one warns that it will be removed). It needs
  ``onnxscript`` and nothing online. The batch axis is dynamic; onnxruntime runs it at batch 1 and 3.
  The same metadata is in the model's ``metadata_props``;
* ``torch_export``: a ``torch.export`` program saved as ``.pt2`` (``torch.export.load``). TorchScript
  (``torch.jit``) is deprecated in torch 2.x; ``torch.export`` is its successor and what
  AOTInductor, ExecuTorch and the ONNX exporter above consume;
* ``openvino`` (extra ``[openvino]``, a default when installed): ``model.xml`` + ``model.bin``,
  float32 weights, read back and compiled by OpenVINO (:mod:`repblocks.deploy.openvino`);
* ``executorch`` (extra ``[executorch]``, opt-in): ``model.pte``, lowered to XNNPACK in
  float32, a batch of one image, run back by ExecuTorch's runtime (:mod:`repblocks.deploy.executorch`);
* ``litert`` (extra ``[litert]``, opt-in): ``model.tflite``, batch 1, run by LiteRT's interpreter
  (:mod:`repblocks.deploy.litert`);
* ``coreml`` (extra ``[coreml]``, opt-in): ``model.mlpackage`` (fp32) and ``model_fp16.mlpackage``,
  ML Program folders; Core ML runs on Apple systems only, so their spec is validated instead
  (:mod:`repblocks.deploy.coreml`).

With ``quantize=int8``, each engine's int8 model that passed the accuracy gate is written too
(:func:`export_int8`): ``model_int8.xml``/``.bin`` (NNCF, OpenVINO), ``model_int8.onnx``
(onnxruntime QDQ), ``model_int8.pte`` (ExecuTorch, PT2E) and ``model_int8.tflite`` (LiteRT, PT2E),
each read back and checked against the int8 model that was gated.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime
import torch
from torch import Tensor, nn

from repblocks import checkpoint
from repblocks.deploy import coreml, executorch, litert, low_precision, openvino
from repblocks.deploy.formats import COREML_FP16_FILE, FILE_NAMES, INT8_FILE_NAMES
from repblocks.deploy.sources import Network
from repblocks.errors import user_errors
from repblocks.files import atomic_path
from repblocks.int8.openvino import dynamic_axes
from repblocks.numerics import max_errors, within_tolerance
from repblocks.weights import load_weights, save_weights

if TYPE_CHECKING:
    from repblocks.deploy.config import ExportConfig, VerifyConfig
    from repblocks.deploy.quantize import Quantization

__all__ = [
    "Export",
    "deploy_metadata",
    "export_all",
    "export_coreml",
    "export_executorch",
    "export_int8",
    "export_litert",
    "export_openvino",
    "export_onnx",
    "export_safetensors",
    "export_torch_export",
    "int8_metadata",
    "onnx_session",
]

log = logging.getLogger(__name__)

CHECK_BATCH_SIZES = (1, 3)  # neither is the export's example batch (2): the batch axis must really be dynamic
_ONNX_SIZE_LIMIT = 2**31  # protobuf's limit for one file; we write no external-data side files


@dataclass(frozen=True)
class Export:
    """One file the export stage wrote, where it will be once the run is done, and how it was checked."""

    path: str  # in out_dir
    format: str  # "onnx", "openvino int8", ...
    input_shape: list[int]  # (C, H, W) it was exported at: the model's own
    runtime: str | None = None  # what read it back ("onnxruntime 1.23.0")
    check: str | None = None  # how it was checked, when not by comparing outputs
    max_abs_err: float | None = None  # its outputs against the model's, at checked_batch_sizes
    max_rel_err: float | None = None
    checked_batch_sizes: list[int] | None = None
    max_batch: int | None = None  # the largest batch one call takes, where the format fixes it (ExecuTorch: 1)
    # OpenVINO: the precision a plain compile_model(path, "CPU") runs at here, and its errors against the model
    plain_runtime: dict | None = None

    @classmethod
    def from_info(cls, info: Mapping, *, path: Path, input_shape: Sequence[int]) -> Export:
        """From what an ``export_*`` function returns, at its final ``path``."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(
            **{**{k: v for k, v in info.items() if k in known}, "path": str(path), "input_shape": list(input_shape)}
        )

    def as_dict(self) -> dict:
        """For ``report.json``: the fields that apply to this format."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


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

    Args:
        into: The folder to write into (the staging folder).
        out_dir: Where the files will be once the run is done: the paths returned.

    Raises:
        UserError: An export does not reproduce the model within ``verify``'s tolerance.
    """
    example = torch.randn(2, *network.input_shape, generator=torch.Generator().manual_seed(seed))  # (2, C, H, W)
    metadata = deploy_metadata(network)
    exports = {}
    for fmt in export.formats:
        path = Path(into) / FILE_NAMES[fmt]
        log.info("exporting %s", fmt)
        with user_errors():  # an export that does not reproduce the model stops the run in one line
            if fmt == "safetensors":
                info = export_safetensors(plain, path, rebuild=network.rebuild_deploy, metadata=metadata)
            elif fmt == "onnx":
                info = export_onnx(
                    plain,
                    path,
                    example,
                    atol=verify.atol,
                    rtol=verify.rtol,
                    opset=export.onnx_opset,
                    metadata=metadata,
                )
            elif fmt == "openvino":
                info = export_openvino(plain, path, example, atol=verify.atol, rtol=verify.rtol, metadata=metadata)
            elif fmt == "litert":
                info = export_litert(plain, path, example, atol=verify.atol, rtol=verify.rtol, metadata=metadata)
            elif fmt == "coreml":
                info = export_coreml(plain, path, example, precision="fp32", metadata=metadata)
                fp16 = export_coreml(
                    plain, path.with_name(COREML_FP16_FILE), example, precision="fp16", metadata=metadata
                )
            elif fmt == "executorch":
                info = export_executorch(plain, path, example, atol=verify.atol, rtol=verify.rtol, metadata=metadata)
            elif fmt == "torch_export":
                info = export_torch_export(plain, path, example, atol=verify.atol, rtol=verify.rtol)
            else:  # a name known to the config with no exporter here: a programming error, not a user one
                raise ValueError(f"export.formats=[{fmt}] has no exporter in this version of repblocks")
        exports[fmt] = Export.from_info(info, path=Path(out_dir) / FILE_NAMES[fmt], input_shape=network.input_shape)
        if fmt == "coreml":
            exports["coreml_fp16"] = Export.from_info(
                fp16, path=Path(out_dir) / COREML_FP16_FILE, input_shape=network.input_shape
            )
    return exports


def export_int8(
    network: Network, quantization: Quantization, *, into: Path, out_dir: Path, verify: VerifyConfig, seed: int = 0
) -> dict[str, Export]:
    """Write the int8 model of each engine that passed the accuracy gate; each is read back and checked.

    The check compares the file, loaded by its engine, with the int8 model that was gated (same
    engine, same graph: within ``verify``'s tolerance), so what was measured is what is shipped.
    """
    example = torch.randn(2, *network.input_shape, generator=torch.Generator().manual_seed(seed))  # (2, C, H, W)
    metadata = int8_metadata(network)
    exports = {}
    for engine, int8 in quantization.passed.items():
        if low_precision.precision_of(engine):  # HOOK(low_precision): model_bf16.xml, model_fp16.xml
            exports[engine] = _export_float(engine, int8, network, into=into, out_dir=out_dir, verify=verify)
            continue
        name = INT8_FILE_NAMES[engine]
        path = Path(into) / name
        log.info("exporting int8 (%s)", engine)
        with user_errors():
            if engine == "openvino":
                openvino.set_metadata(int8.model, metadata)
                openvino.record_precision(int8.model, "f32")  # HOOK(low_precision): as the gate compiled it
                openvino.save(int8.model, path)
                reloaded = openvino.infer(openvino.compile_model(openvino.load(path)))
                errors = _check_outputs(
                    int8.run, reloaded, example, verify.atol, verify.rtol, f"OpenVINO reading {name}"
                )
                errors["plain_runtime"] = low_precision.plain_runtime(path, int8.run, example)  # HOOK(low_precision)
                runtime = f"openvino {_version('openvino')}"
            elif engine == "litert":
                errors = _write_tflite(int8.model, path, metadata, int8.run, example, verify.atol, verify.rtol)
                runtime = litert.version()
            elif engine == "executorch":  # its metadata went in when it was lowered, before the gate
                errors = _write_pte(int8.model, path, int8.run, example, verify.atol, verify.rtol)
                runtime = executorch.version()
            else:
                errors = _write_onnx_bytes(int8.model, path, metadata, int8.run, example, verify)
                runtime = f"onnxruntime {onnxruntime.__version__}"
        exports[f"{engine}_int8"] = Export.from_info(
            {
                "format": f"{engine} int8",
                "runtime": runtime,
                "check": "read back and run: outputs equal to the gated int8 model's",
                **errors,
            },
            path=Path(out_dir) / name,
            input_shape=network.input_shape,
        )
    return exports


def _export_float(engine: str, gated, network: Network, *, into: Path, out_dir: Path, verify: VerifyConfig) -> Export:
    """A bf16/fp16 OpenVINO model that passed the gate, written, read back and checked (:mod:`~repblocks.deploy.low_precision`)."""
    name = low_precision.FILE_NAMES[low_precision.precision_of(engine)]
    example = torch.randn(2, *network.input_shape, generator=torch.Generator().manual_seed(0))  # (2, C, H, W)
    path = Path(into) / name
    log.info("exporting %s", engine)
    with user_errors():
        info = low_precision.write(
            gated.model, path, int8_metadata(network), gated.run, example, atol=verify.atol, rtol=verify.rtol
        )
        info["plain_runtime"] = low_precision.plain_runtime(path, gated.run, example)
    info["runtime"] = f"openvino {_version('openvino')}"
    return Export.from_info(info, path=Path(out_dir) / name, input_shape=network.input_shape)


def export_openvino(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    atol: float,
    rtol: float,
    metadata: Mapping[str, str] | None = None,
) -> dict:
    """Convert ``model`` to OpenVINO (dynamic batch, float32 weights), save ``.xml``/``.bin``, read back, check.

    Raises:
        ValueError: OpenVINO's outputs from the saved files differ from the model's (both files are removed).
    """
    path = Path(path)
    ov_model = openvino.to_openvino(model, example)
    openvino.set_metadata(ov_model, metadata or {})
    openvino.record_precision(ov_model, "f32")  # HOOK(low_precision): the precision it is verified at, in the file
    written = openvino.save(ov_model, path)
    try:
        reloaded = openvino.infer(openvino.compile_model(openvino.load(path)))
        errors = _check_outputs(model, reloaded, example, atol, rtol, "OpenVINO (fp32 precision hint)")
        errors["plain_runtime"] = low_precision.plain_runtime(path, model, example)  # HOOK(low_precision)
    except BaseException:
        for file in written:
            file.unlink(missing_ok=True)
        raise
    return {"path": str(path), "format": "openvino", "runtime": f"openvino {_version('openvino')}", **errors}


def export_litert(
    model: nn.Module, path: str | Path, example: Tensor, *, atol: float, rtol: float, metadata: Mapping[str, str]
) -> dict:
    """Convert ``model`` to a ``.tflite`` (batch 1, ``metadata`` inside); LiteRT's interpreter must reproduce it.

    Raises:
        ValueError: The interpreter cannot load the file, or its outputs differ from the model's.
    """
    path = Path(path)
    errors = _write_tflite(litert.convert(model, example, {}), path, metadata, model, example, atol, rtol)
    return {
        "path": str(path),
        "format": "litert",
        "runtime": f"{litert.version()} (batch fixed at 1; a larger batch runs image by image)",
        **errors,
    }


def export_coreml(
    model: nn.Module, path: str | Path, example: Tensor, *, precision: str, metadata: Mapping[str, str]
) -> dict:
    """Convert ``model`` to a Core ML ML Program in ``precision``, saved as the package (folder) ``path``.

    Core ML cannot run on Linux: the package is read back and its spec validated instead
    (:func:`repblocks.deploy.coreml.validate`).

    Raises:
        ValueError: The package's inputs, outputs, metadata, weights or convolutions are not the model's.
    """
    path = Path(path)
    with atomic_path(path, folder=True) as tmp:
        coreml.export(model, tmp, example, precision=precision, metadata=metadata)
        check = coreml.validate(
            tmp,
            input_shape=tuple(example.shape[1:]),
            num_classes=model(example[:1]).shape[-1],
            convs=sum(isinstance(module, nn.Conv2d) for module in model.modules()),
            precision=precision,
            metadata=metadata,
        )
    return {"path": str(path), "format": f"coreml {precision}", "runtime": coreml.version(), "check": check}


def export_executorch(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    atol: float,
    rtol: float,
    metadata: Mapping[str, str] | None = None,
) -> dict:
    """Lower ``model`` to XNNPACK (float32, one image a call), write the ``.pte``, run it back by ExecuTorch, check.

    Raises:
        ValueError: ExecuTorch's outputs from the written file differ from the model's (no file is left).
    """
    path = Path(path)
    program = executorch.lower(model, example, metadata=metadata)
    info = _write_pte(program, path, model, example, atol, rtol)
    return {"path": str(path), "format": "executorch", "runtime": executorch.version(), **info}


def _write_pte(program: bytes, path: Path, reference, example: Tensor, atol: float, rtol: float) -> dict:
    """Write ``program`` at ``path`` once ExecuTorch, reading the file back, reproduces ``reference``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(program)
        run = executorch.runner(tmp, name=path.name)
        errors = _check_outputs(reference, run, example, atol, rtol, f"ExecuTorch reading {path.name}")
    return {**errors, "max_batch": run.planned_batch}


def _write_onnx_bytes(
    model_bytes: bytes, path: Path, metadata: Mapping[str, str], reference, example: Tensor, verify: VerifyConfig
) -> dict:
    import onnx

    proto = onnx.load_from_string(model_bytes)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        session = onnx_session(tmp)
        return _check_outputs(
            reference,
            lambda x: _run_onnx(session, x),
            example,
            verify.atol,
            verify.rtol,
            f"onnxruntime reading {path.name}",
        )


def _write_tflite(
    model_bytes: bytes,
    path: Path,
    metadata: Mapping[str, str],
    reference,
    example: Tensor,
    atol: float,
    rtol: float,
) -> dict:
    """Write ``model_bytes`` with ``metadata`` inside at ``path``, once LiteRT, reading the file, reproduces ``reference``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(litert.with_metadata(model_bytes, metadata))
        run = litert.load(tmp)
        errors = _check_outputs(
            reference, lambda x: torch.from_numpy(run(x.numpy())), example, atol, rtol, f"LiteRT reading {path.name}"
        )
        if litert.read_metadata(tmp) != dict(metadata):
            raise ValueError(f"{path.name} does not read back the metadata written into it")
    return errors


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def deploy_metadata(network: Network) -> dict[str, str]:
    """What rebuilds the deploy form and prepares its images, as strings: model, classes, kwargs, preprocessing, class names."""
    return checkpoint.deploy_metadata(
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


def export_safetensors(
    model: nn.Module, path: str | Path, *, rebuild: Callable[[], nn.Module], metadata: dict[str, str]
) -> dict:
    """Write the weights of ``model`` and check that they load into ``rebuild()`` unchanged.

    Args:
        model: The deploy-form model.
        path: Destination ``.safetensors`` file.
        rebuild: Builds an empty model of the same structure (``create_model(name, deploy=True)``).
        metadata: Strings stored in the file's header (model name, number of classes, ...).

    Raises:
        ValueError: The written weights do not load back identically (the file is removed).
    """
    path = Path(path)
    save_weights(model, path, metadata=metadata)  # atomic by itself
    try:
        loaded = load_weights(rebuild(), path).state_dict()
        expected = model.state_dict()
        differ = [key for key, value in expected.items() if not torch.equal(value.cpu(), loaded[key])]
        if differ:
            raise ValueError(f"{path.name} loads back with other values in {', '.join(differ[:5])}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return {"path": str(path), "format": "safetensors", "check": "reloaded into a fresh model: every tensor equal"}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    atol: float,
    rtol: float,
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
    dynamic_size: bool = False,
) -> dict:
    """Export ``model`` to ONNX with a dynamic batch axis; onnxruntime must reproduce its outputs.

    Args:
        model: A float32 CPU model in eval mode.
        path: Destination ``.onnx`` file (self-contained: no external-data file beside it).
        example: An input batch of size 2, ``(2, C, H, W)``: the other axes are fixed to its.
        atol, rtol: Tolerance of onnxruntime's outputs (see ``repblocks.numerics.within_tolerance``).
        opset: ONNX opset, at least :data:`MIN_ONNX_OPSET`; the exporter's default when None.
        metadata: Strings for the model's ``metadata_props`` (name, preprocessing, ...).
        dynamic_size: Height and width dynamic too (a fully convolutional network timed at another size).

    Raises:
        ValueError: The model is too large for one ONNX file, the exporter wrote another opset,
            onnxruntime cannot load the file, or its outputs differ.
    """
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size >= _ONNX_SIZE_LIMIT:
        raise ValueError(f"the model's {size / 2**30:.1f} GiB of weights exceed one ONNX file's 2 GiB limit")
    path = Path(path)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=(dynamic_axes(dynamic_size),),
            opset_version=opset,
            verbose=False,  # its progress lines would go to stdout, which belongs to the caller
        )
        written = program.model.opset_imports.get("")
        if opset is not None and written != opset:
            raise ValueError(f"the ONNX exporter cannot write opset {opset} (it wrote {written})")
        program.model.metadata_props.update(metadata or {})
        program.save(tmp, external_data=False)  # one file, so that the atomic rename moves all of it
        try:
            session = onnx_session(tmp)
        except Exception as err:  # onnxruntime's own exception types; an opset it does not know, say
            raise ValueError(f"onnxruntime {onnxruntime.__version__} cannot load the export: {err}") from None
        errors = _check_outputs(model, lambda x: _run_onnx(session, x), example, atol, rtol, "onnxruntime")
    return {"path": str(path), "format": "onnx", "runtime": f"onnxruntime {onnxruntime.__version__}", **errors}


def export_torch_export(model: nn.Module, path: str | Path, example: Tensor, *, atol: float, rtol: float) -> dict:
    """Save ``model`` as a ``torch.export`` program (``.pt2``) with a dynamic batch axis; check it reloads.

    Raises:
        ValueError: The reloaded program's outputs differ from the model's.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        program = torch.export.export(model, (example,), dynamic_shapes=(dynamic_axes(),))
        # Through file objects: given a path, torch.export wants it to end in .pt2, and the temporary name does not.
        with open(tmp, "wb") as handle:
            torch.export.save(program, handle)
        with open(tmp, "rb") as handle:
            reloaded = torch.export.load(handle).module()
        errors = _check_outputs(model, reloaded, example, atol, rtol, "torch.export.load")
    return {"path": str(path), "format": "torch_export", "runtime": f"torch {torch.__version__}", **errors}


def onnx_session(path: str | Path | bytes, *, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session for ``path``; ``threads`` intra-op threads (default: torch's count, for fair timing)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # By default its idle threads spin for work; in a process that also runs torch they would steal torch's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        path if isinstance(path, bytes) else str(path),
        sess_options=options,
        providers=list(providers or ["CPUExecutionProvider"]),
    )


def _run_onnx(session, images: Tensor) -> Tensor:
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    return torch.from_numpy(np.asarray(logits))


@torch.inference_mode()
def _check_outputs(
    model: nn.Module, runner: Callable[[Tensor], Tensor], example: Tensor, atol: float, rtol: float, what: str
) -> dict:
    worst_abs, worst_rel = 0.0, 0.0
    for batch_size in CHECK_BATCH_SIZES:
        images = torch.randn(batch_size, *example.shape[1:], generator=torch.Generator().manual_seed(batch_size))
        abs_err, rel_err = max_errors(model(images), runner(images))
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    if not within_tolerance(worst_abs, worst_rel, atol=atol, rtol=rtol):
        raise ValueError(
            f"{what} does not reproduce the model: max error {worst_abs:.2e} abs, {worst_rel:.2e} rel "
            f"(tolerance atol {atol:g}, rtol {rtol:g})"
        )
    log.info(
        "%s matches the model at batch sizes %s: %.1e abs, %.1e rel", what, CHECK_BATCH_SIZES, worst_abs, worst_rel
    )
    return {"checked_batch_sizes": list(CHECK_BATCH_SIZES), "max_abs_err": worst_abs, "max_rel_err": worst_rel}
