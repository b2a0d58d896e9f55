"""``torch.export`` (part of torch): ``model.pt2``, the program AOTInductor, ExecuTorch and the ONNX exporter consume.

TorchScript (``torch.jit``) is deprecated in torch 2.x; ``torch.export`` is its successor. The file is
checked by loading it back; predict does not run it (:data:`REFUSED`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from repblocks.deploy.engines.base import Engine, check_outputs
from repblocks.files import atomic_path
from repblocks.int8.conversion import dynamic_axes

__all__ = ["ENGINE", "REFUSED", "export_torch_export"]

REFUSED = (
    "torch.export.load unpickles the file (torch's own warning: never load one from an untrusted source), "
    "and a .pt2 records no preprocessing; predict with model.onnx or model.safetensors of the same deploy output"
)


def export_torch_export(model, path: str | Path, example, *, atol: float, rtol: float) -> dict:
    """Save ``model`` as a ``torch.export`` program (``.pt2``) with a dynamic batch axis; check it reloads.

    Raises:
        ValueError: The reloaded program's outputs differ from the model's.
    """
    from repblocks.deploy.engines.base import Check

    path = Path(path)
    with atomic_path(path) as tmp:
        program = torch.export.export(model, (example,), dynamic_shapes=(dynamic_axes(),))
        # Through file objects: given a path, torch.export wants it to end in .pt2, and the temporary name does not.
        with open(tmp, "wb") as handle:
            torch.export.save(program, handle)
        with open(tmp, "rb") as handle:
            reloaded = torch.export.load(handle).module()
        errors = check_outputs(model, reloaded, example, check=Check(atol, rtol), what="torch.export.load")
    return {"path": str(path), "format": "torch_export", "runtime": f"torch {torch.__version__}", **errors}


class TorchExport(Engine):
    name = "torch_export"
    title = "torch.export"
    refused = REFUSED

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        return export_torch_export(model, path, example, atol=check.atol, rtol=check.rtol)


ENGINE = TorchExport()
