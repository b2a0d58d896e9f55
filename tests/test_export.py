"""Exports of a deploy-form model: each file loads back and computes what the model computes."""

import os
import stat

import onnxruntime
import pytest
import safetensors
import torch

import repblocks
from repblocks.deploy.engines.onnxruntime import export_onnx
from repblocks.deploy.engines.pytorch import export_safetensors
from repblocks.deploy.engines.torch_export import export_torch_export
from repblocks.numerics import max_errors, randomize_bn_

EXAMPLE = torch.randn(2, 3, 32, 32)  # (B, C, H, W): the batch the exporters trace with


@pytest.fixture(scope="module")
def plain():
    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
    return repblocks.switch_to_deploy(model)


def _rebuild():
    return repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True)


@torch.inference_mode()
def test_safetensors_reload_into_a_deploy_model_with_metadata(plain, tmp_path):
    info = export_safetensors(plain, tmp_path / "m.safetensors", rebuild=_rebuild, metadata={"model": "repvgg_tiny"})
    loaded = repblocks.load_weights(_rebuild(), info["path"]).eval()
    assert torch.equal(loaded(EXAMPLE), plain(EXAMPLE))
    with safetensors.safe_open(info["path"], "pt") as handle:
        metadata = handle.metadata()
    # What was asked for, and what save_weights records of every model: its BatchNorm eps and block kinds.
    assert metadata["model"] == "repvgg_tiny" and set(metadata) == {"model", "bn_eps", "block_kinds"}


@torch.inference_mode()
def test_onnx_runs_in_onnxruntime_at_other_batch_sizes(plain, tmp_path):
    info = export_onnx(plain, tmp_path / "m.onnx", EXAMPLE, atol=1e-4, rtol=1e-4)
    assert info["checked_batch_sizes"] == [1, 3] and info["max_rel_err"] < 1e-5
    session = onnxruntime.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch_size in (1, 3):
        images = torch.randn(batch_size, 3, 32, 32)
        (logits,) = session.run(None, {"images": images.numpy()})
        assert max_errors(plain(images), torch.from_numpy(logits))[1] < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # self-contained: no external-data file


@torch.inference_mode()
def test_torch_export_program_reloads_with_a_dynamic_batch(plain, tmp_path):
    info = export_torch_export(plain, tmp_path / "m.pt2", EXAMPLE, atol=1e-4, rtol=1e-4)
    program = torch.export.load(info["path"]).module()
    for batch_size in (1, 5):
        images = torch.randn(batch_size, 3, 32, 32)
        assert max_errors(plain(images), program(images))[1] < 1e-6


def test_an_export_that_fails_its_check_leaves_no_file(plain, tmp_path):
    with pytest.raises(ValueError, match="onnxruntime does not reproduce the model"):
        export_onnx(plain, tmp_path / "m.onnx", EXAMPLE, atol=-1, rtol=-1)  # no error is below -1
    with pytest.raises(ValueError, match="torch.export.load does not reproduce the model"):
        export_torch_export(plain, tmp_path / "m.pt2", EXAMPLE, atol=-1, rtol=-1)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary one


def test_exported_files_get_the_usual_permissions(plain, tmp_path):
    path = export_safetensors(plain, tmp_path / "m.safetensors", rebuild=_rebuild, metadata={})["path"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
