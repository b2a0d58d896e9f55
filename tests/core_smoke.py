"""The core library on its own: every core module imports, a model builds, converts exactly and round-trips.

Run by ``make test-core`` in a venv holding only the core's dependencies (torch, safetensors, numpy),
and by ``tests/test_boundaries.py`` in the full venv with every optional dependency hidden.

    python tests/core_smoke.py
"""

import importlib
import pkgutil
import sys
import tempfile
from pathlib import Path

import torch

import repblocks
from repblocks.numerics import max_errors, randomize_bn_


def main() -> int:
    core = [
        m.name
        for m in pkgutil.walk_packages(repblocks.__path__, "repblocks.")
        if m.name.split(".")[1] not in ("train", "deploy")
    ]
    for name in core:
        importlib.import_module(name)
    images = torch.randn(2, 3, 32, 32)
    for name in repblocks.list_models("*tiny*"):
        model = randomize_bn_(repblocks.create_model(name, num_classes=3)).eval()
        plain = repblocks.switch_to_deploy(model)
        with torch.no_grad():
            rel_err = max_errors(model(images), plain(images))[1]
        assert rel_err < 1e-5, f"{name}: deploy form differs by {rel_err:.1e}"
        with tempfile.TemporaryDirectory() as folder:
            path = repblocks.save_weights(plain, Path(folder) / "w.safetensors")
            fresh = repblocks.load_weights(repblocks.create_model(name, num_classes=3, deploy=True), path).eval()
            with torch.no_grad():
                assert torch.equal(fresh(images), plain(images)), f"{name}: weights do not round-trip"
    print(f"core ok: {len(core)} modules imported; {', '.join(repblocks.list_models('*tiny*'))} convert and round-trip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
