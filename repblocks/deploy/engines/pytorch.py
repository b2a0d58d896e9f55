"""PyTorch itself: ``model.safetensors`` (the deploy form's weights), and the eager and compiled timing backends.

* export: the weights with metadata saying how to rebuild the model and prepare its images
  (deploy.py reads it back: ``ckpt=model.safetensors``), checked by loading them into a fresh model;
* predict: the weights rebuilt in deploy form through the registry, run by torch;
* timing: ``eager`` and ``channels_last`` (in fp32, fp16 and bf16), and ``compile`` (``torch.compile``, opt-in).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from repblocks.checkpoint import DEPLOY_FORM, read_safetensors_metadata
from repblocks.deploy.engines.base import Engine, Runner
from repblocks.errors import OutputMismatch
from repblocks.weights import load_weights, save_weights

__all__ = ["DTYPES", "ENGINE", "export_safetensors"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_safetensors(model: nn.Module, path, *, rebuild: Callable[[], nn.Module], metadata: dict[str, str]) -> dict:
    """Write the weights of ``model`` and check that they load into ``rebuild()`` unchanged.

    Args:
        model: The deploy-form model.
        path: Destination ``.safetensors`` file.
        rebuild: Builds an empty model of the same structure (``create_model(name, deploy=True)``).
        metadata: Strings stored in the file's header (model name, number of classes, ...).

    Raises:
        ValueError: The written weights do not load back identically (the file is removed).
    """
    from pathlib import Path

    path = Path(path)
    save_weights(model, path, metadata=metadata)  # atomic by itself
    try:
        loaded = load_weights(rebuild(), path).state_dict()
        expected = model.state_dict()
        differ = [key for key, value in expected.items() if not torch.equal(value.cpu(), loaded[key])]
        if differ:
            raise OutputMismatch(f"{path.name} loads back with other values in {', '.join(differ[:5])}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return {"path": str(path), "format": "safetensors", "check": "reloaded into a fresh model: every tensor equal"}


class PyTorch(Engine):
    name = "pytorch"
    title = "PyTorch"
    backends = ("eager", "channels_last", "compile")

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        return export_safetensors(model, path, rebuild=lambda: _blank(model), metadata=dict(metadata))

    def read_metadata(self, path):
        return read_safetensors_metadata(path)

    def open(self, path, threads, *, precision=None):
        from repblocks.deploy.sources import load_network

        metadata = self.read_metadata(path)
        if metadata.get("form") != DEPLOY_FORM:
            return Runner(_no_runner, metadata=metadata)  # refused by the caller, which names what is missing
        model = load_network(ckpt=str(path)).model  # deploy form, as the metadata says: nothing to convert
        return Runner(model, metadata=metadata)

    def applicable(self, backend, dtype, device):
        if dtype == "fp16" and device.type == "cpu":
            return (
                "fp16 convolutions on the CPU are slow emulations, not a deployment setting (bf16 is timed on the CPU)"
            )
        return None

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        precision = DTYPES[dtype]
        memory_format = torch.channels_last if backend == "channels_last" else torch.contiguous_format
        runnable = copy.deepcopy(model).to(device=device, dtype=precision, memory_format=memory_format)
        if backend == "compile":
            runnable = torch.compile(runnable)

        def bind(images: Tensor) -> Callable[[], object]:
            batch = images.to(device=device, dtype=precision).contiguous(memory_format=memory_format)  # (B, C, H, W)
            return lambda: runnable(batch)

        def run(images: Tensor) -> Tensor:
            return bind(images)().float().cpu()

        return Runner(run, bind)


def _blank(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every tensor zeroed: a fresh model of the same structure to load the file into."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_()
    return fresh


def _no_runner(images: Tensor) -> Tensor:
    raise AssertionError("a file without deploy metadata is refused before it runs")


ENGINE = PyTorch()
