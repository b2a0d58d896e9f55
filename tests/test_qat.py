"""+experiment=qat: a finished tiny run fine-tuned with fake quantization and deployed as an int8 OpenVINO IR."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repblocks.datasets import DigitsData
from repblocks.errors import UserError
from repblocks.train import qat
from tests.helpers import ROOT, compose_train, exit_message, write_untrained_run
from train import train

TINY = "qarepvgg_tiny"
# The runs that quantize need the [openvino] extra; the refusals below run without it.
needs_openvino = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("openvino", "nncf")),
    reason="needs pip install repblocks[openvino]",
)


def _written(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    return write_untrained_run(tmp_path_factory.mktemp("untrained") / "last.ckpt", TINY)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "error: qat.init is not set: pass qat.init=RUN"),
        (["qat.init=/nonexistent"], "error: qat.init: weights file not found: /nonexistent"),
        (["qat.init={empty}"], "error: qat.init: {empty} is a folder but not a train.py run"),
        (
            ["qat.init={run}", "model=repvgg_tiny"],
            "error: qat.init: {run} is a run of qarepvgg_tiny, but model=repvgg_tiny",
        ),
        (
            ["qat.init={run}", "trainer=ddp"],
            "error: +experiment=qat fine-tunes in one process: set trainer.devices=1, not 2",
        ),
        (["qat.init={run}", "qat.epochs=0"], "error: qat.epochs must be at least 1, got 0"),
        (["qat.init={run}", "qat.min_agreement=2"], "error: qat.min_agreement must be between 0 and 1, got 2"),
        (["qat.init={run}", "+qat.bits=4"], "error: unknown qat setting 'bits'; known: init, epochs, "),
    ],
)
def test_bad_qat_settings_are_one_line_and_write_nothing(tmp_path, untrained_run, overrides, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    filled = [arg.format(run=untrained_run, empty=empty) for arg in overrides]
    printed = exit_message(out, f"model={TINY}", "+experiment=qat", *filled)
    assert printed.startswith(message.format(run=untrained_run, empty=empty)), printed
    assert _written(out) == []


@pytest.mark.parametrize("missing", ["openvino", "nncf"])
def test_without_the_openvino_extra_says_what_to_install(tmp_path, untrained_run, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError, as when not installed
    printed = exit_message(tmp_path / "out", f"model={TINY}", "+experiment=qat", f"qat.init={untrained_run}")
    assert printed.startswith("error: +experiment=qat needs OpenVINO and NNCF: pip install repblocks[openvino]")
    assert _written(tmp_path / "out") == []


def test_an_ir_that_disagrees_with_the_torch_model_is_refused_in_one_line():
    reference = torch.eye(4)  # (images, classes): image i is class i
    ir = reference[[0, 1, 3, 2]]  # two of four images change class
    check = qat._check_ir(reference, reference.clone(), min_agreement=1.0)
    assert check == {"top1_agreement": 1.0, "max_abs_err": 0.0, "max_rel_err": 0.0}
    with pytest.raises(UserError, match=r"on 50\.00% of 4 validation images, below qat\.min_agreement=0\.99") as err:
        qat._check_ir(reference, ir, min_agreement=0.99)
    assert "\n" not in str(err.value) and "nothing was written" in str(err.value)


FRESH_EXTENSIONS = """
import sys, torch, repblocks
from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader
from repblocks.int8 import fake_quantize
build = QuantizedFunctionsCPULoader.get_build_dir()  # where NNCF would compile its C++ extension
open(f"{build}/lock", "w").close()  # what a first build cut off at NNCF's time limit leaves behind
model = repblocks.switch_to_deploy(repblocks.create_model("qarepvgg_tiny", num_classes=10), keep_post_bn=True)
quantized = fake_quantize(model.eval(), torch.randn(4, 3, 32, 32)).train()
quantized(torch.randn(2, 3, 32, 32)).sum().backward()  # fake quantization forward and backward, as QAT trains
print("trained", sorted(p.name for p in __import__("pathlib").Path(build).iterdir()))
"""


@needs_openvino
def test_fake_quantization_needs_no_compiled_extension(tmp_path):
    """A fresh HOME, and the lock a first build killed at NNCF's 60 s limit leaves: QAT's quantizers still run.

    NNCF compiles a C++ extension for its torch quantizers on first use, which took longer than
    its time limit on two cores; its lock file then made every later run wait and fail.
    """
    env = dict(
        os.environ,
        HOME=str(tmp_path / "home"),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
        NNCF_EXTENSION_LOAD_TIMEOUT="5",  # a build that is waited for fails in seconds, not minutes
    )
    result = subprocess.run(
        [sys.executable, "-c", FRESH_EXTENSIONS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("trained ['lock']")  # nothing was built


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Parameters by their own names: NNCF's state dict shows a quantizer's trainable scale under another name.
    return dict([*model.named_parameters(), *model.named_buffers()])


@pytest.mark.slow
@needs_openvino
def test_fast_dev_run_quantizes_and_fine_tunes_but_writes_nothing(tmp_path, untrained_run):
    # One calibration image, the least qat.calibration_images allows: the PTQ baseline converts it too.
    overrides = (f"qat.init={untrained_run}", "qat.calibration_images=1", "trainer.fast_dev_run=true")
    metrics = train(compose_train(tmp_path / "out", f"model={TINY}", "+experiment=qat", *overrides))
    assert set(metrics["top1"]) == {"fp32", "ptq_int8", "qat_start", "qat_fake_quant"}
    assert "nothing exported or written" in qat.summary(metrics)
    assert _written(tmp_path / "out") == []


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """Two digits epochs of qarepvgg_tiny: far enough from chance that top-1 agreement means something."""
    folder = tmp_path_factory.mktemp("base")
    metrics = train(compose_train(folder, f"model={TINY}", "trainer.max_epochs=2"))
    assert metrics["val_acc_deploy"] > 0.3, metrics  # the tests below need a network that tells digits apart
    return folder


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, base_run):
    """The QAT run of ``base_run``, with the fake-quantized network captured as NNCF made it and after training.

    ``qat.min_agreement=0``: the run writes its IR whatever the CPU's int8 kernels make of it; the
    tests check that the figures reported are those of the files written.
    """
    import nncf

    captured, fake_quantize, nncf_quantize = {"nncf_calls": []}, qat.fake_quantize, nncf.quantize

    def capturing(model, calibration):
        quantized = fake_quantize(model, calibration)
        captured["before"] = {key: value.detach().clone() for key, value in _tensors(quantized).items()}
        captured["model"] = quantized
        return quantized

    folder = tmp_path_factory.mktemp("qat")
    # 64 calibration images: NNCF's torch backend collects statistics one image at a time, slowly.
    overrides = ("+experiment=qat", f"qat.init={base_run}", "qat.epochs=1", "trainer.limit_train_batches=6")
    overrides += ("qat.calibration_images=64", "qat.min_agreement=0")

    def recording(model, dataset, **kwargs):
        captured["nncf_calls"].append((type(model).__module__.split(".")[0], kwargs))
        return nncf_quantize(model, dataset, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qat, "fake_quantize", capturing)
        patch.setattr(nncf, "quantize", recording)
        metrics = train(compose_train(folder, f"model={TINY}", *overrides))
    return folder, metrics, captured


@pytest.mark.slow
@needs_openvino
def test_qat_writes_the_int8_ir_and_the_comparison(qat_run, base_run):
    folder, metrics, _ = qat_run
    written = ["config.yaml", "int8", "logs", "metrics.json", "training_curves.png"]  # no staging folder left
    assert _written(folder) == written
    assert _written(folder / "int8") == ["model.bin", "model.xml"]
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    base = json.loads((base_run / "metrics.json").read_text())
    assert metrics["init"] == base["best_ckpt"]
    # The fused fp32 network is the base run's deploy form, on the same validation images.
    # top-1 in percent, as deploy.py reports it: the fused fp32 network is the base run's deploy form.
    assert metrics["top1"]["fp32"] == pytest.approx(100 * base["val_acc_deploy"])
    assert metrics["val_acc"] == pytest.approx(metrics["top1"]["qat_int8"] / 100)  # a fraction, as in training
    assert metrics["val_images"] == 360 and metrics["calibration_images"] == 64
    assert set(metrics["top1"]) == {"fp32", "ptq_int8", "qat_start", "qat_fake_quant", "qat_int8"}
    assert all(0 <= value <= 100 for value in metrics["top1"].values()), metrics["top1"]
    assert metrics["epochs"] == 1 and metrics["global_step"] == 6
    assert "top-1 on 360 validation images: fp32" in qat.summary(metrics)


@pytest.mark.slow
@needs_openvino
def test_the_ir_is_int8_and_reproduces_the_reported_figures(qat_run):
    from repblocks.int8 import core  # the process's one Core: a Core per call leaves pytest on a freed signal stack

    folder, metrics, captured = qat_run
    ir = core().read_model(folder / "int8" / "model.xml")
    assert "FakeQuantize" in {op.get_type_name() for op in ir.get_ops()}
    data = DigitsData(image_size=32)
    data.setup("validate")
    compiled = core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected, got = [], []
    for images, _ in data.val_dataloader():  # the batches the run read
        with torch.no_grad():
            expected.append(captured["model"].eval()(images))
        got.append(torch.from_numpy(compiled(images.numpy())[0]))
    expected, got = torch.cat(expected), torch.cat(got)
    agreement = (expected.argmax(1) == got.argmax(1)).float().mean().item()
    assert metrics["ir_check"]["top1_agreement"] == pytest.approx(agreement)
    assert metrics["ir_check"]["max_abs_err"] == pytest.approx((expected - got).abs().max().item(), rel=1e-4)
    top1 = 100 * (got.argmax(1) == data.val_set.labels).float().mean().item()
    assert metrics["top1"]["qat_int8"] == pytest.approx(top1)


@pytest.mark.slow
@needs_openvino
def test_the_ptq_baseline_is_the_int8_deploy_ships(qat_run):
    """NNCF's post-training int8 of the OpenVINO model, with deploy's full bias correction; fake quantization in torch."""
    from repblocks.int8 import NNCF_OPTIONS

    _, _, captured = qat_run
    backends = [backend for backend, _ in captured["nncf_calls"]]
    assert sorted(backends) == ["openvino", "repblocks"]  # the PTQ baseline's IR, and the torch network for QAT
    [ptq_options] = [kwargs for backend, kwargs in captured["nncf_calls"] if backend == "openvino"]
    assert ptq_options == {"subset_size": 64, **NNCF_OPTIONS} and NNCF_OPTIONS == {"fast_bias_correction": False}


@pytest.mark.slow
@needs_openvino
def test_fine_tuning_moves_the_weights_the_quantizer_ranges_and_the_kept_post_bn(qat_run):
    _, _, captured = qat_run
    before, after = captured["before"], _tensors(captured["model"])
    moved = {key for key in before if not torch.equal(before[key], after[key])}

    def moved_among(part: str) -> list[str]:
        return [key for key in before if part in key and key in moved]

    assert moved_among("reparam.weight"), "no conv weight changed"
    assert moved_among("_scale_param_storage"), "no quantizer range changed"
    # QARepVGG's post-sum BatchNorm was kept out of the fused conv, and trained on (its statistics too).
    assert moved_among("post_bn.weight") and moved_among("post_bn.running_var")


@pytest.mark.slow
def test_train_py_qat_bad_init_is_one_line(tmp_path):
    init = "/nonexistent/epoch=003-val_acc=0.9000.ckpt"  # train.py's own names hold '=', which Hydra must not parse
    overrides = [f"model={TINY}", "+experiment=qat", f"qat.init={init}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: qat.init: weights file not found: {init}"]
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "int8").exists()
