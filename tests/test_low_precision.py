"""An OpenVINO file carries the precision it was verified at; bf16/fp16 are gated like int8 and skipped, saying why, without the CPU's support.

No test asserts a bf16 error or a speed (both depend on the CPU's kernels): the files must record
what was gated, compile at it, and the report must say what a plain ``compile_model(path, "CPU")``
runs at here, as the runtime itself answers.
"""

import pytest
import torch

import repblocks
from repblocks.deploy.config import DeployConfig
from repblocks.deploy.engines import by_name, engine, openvino
from repblocks.deploy.engines.base import Check
from repblocks.deploy.quantize import Gate, gate_floats
from repblocks.errors import UserError
from repblocks.numerics import randomize_bn_

pytestmark = pytest.mark.skipif(openvino.missing() is not None, reason=f"needs OpenVINO: {openvino.missing()}")

OPENVINO = engine("openvino")
FILES = by_name("openvino").files  # precision -> file name


@pytest.fixture(scope="module")
def plain() -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10), seed=0).eval()
    return repblocks.switch_to_deploy(model)


# On the process's one Core (openvino.core): a Core per call here would leave pytest on a freed signal stack.
def _capabilities() -> list[str]:
    return list(openvino.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _plain_precision(path) -> str:
    """What the bare runtime compiles the file at: no setting at all."""
    return openvino.core().compile_model(str(path), "CPU").get_property("INFERENCE_PRECISION_HINT").get_type_name()


def test_model_xml_records_fp32_and_the_report_says_what_a_plain_compile_runs(plain, tmp_path):
    path = tmp_path / "model.xml"
    info = OPENVINO.export(plain, path, torch.randn(2, 3, 32, 32), {"model": "x"}, check=Check(1e-4, 1e-4))
    reloaded = openvino.load(path)
    assert openvino.recorded_precision(reloaded) == "f32"
    assert openvino.compile_model(reloaded).get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert info["plain_runtime"]["precision"] == _plain_precision(path)
    assert info["plain_runtime"]["max_abs_err"] >= 0.0


def test_a_float_precision_the_cpu_lacks_is_skipped_with_the_reason(plain, monkeypatch):
    class NoGate:
        def judge(self, *args, **kwargs):
            raise AssertionError("a skipped precision is not judged")

    monkeypatch.setattr(type(OPENVINO), "float_missing", lambda self, precision: f"no {precision} here")
    models, skipped = gate_floats(plain, torch.randn(4, 3, 32, 32), NoGate(), ["openvino"], ["bf16", "fp16"])
    assert models == {}
    assert skipped == [
        {"what": "openvino bf16", "reason": "no bf16 here"},
        {"what": "openvino fp16", "reason": "no fp16 here"},
    ]


def test_a_float_precision_no_listed_engine_runs_is_skipped_saying_so(plain):
    """onnxruntime has no bf16/fp16 convolution on x86: its registry entry lists none, so nothing is judged."""
    assert by_name("onnxruntime").floats == ()
    models, skipped = gate_floats(plain, torch.randn(4, 3, 32, 32), None, ["onnxruntime"], ["bf16"])
    assert models == {}
    assert skipped == [{"what": "bf16", "reason": "none of quantize.engines (onnxruntime) runs bf16"}]


def test_the_report_puts_gated_float_rows_beside_int8_but_not_eager_bf16():
    from repblocks.deploy.report import int8_speed

    def row(backend, dtype, throughput):
        return {"form": "deploy", "backend": backend, "dtype": dtype, "batch_size": 2, "throughput": throughput,
                "ratio_to_train_eager": None}  # fmt: skip

    rows = [row("openvino", "fp32", 100.0), row("openvino", "bf16", 50.0), row("openvino", "int8", 200.0)]
    rows += [row("eager", "fp32", 10.0), row("eager", "bf16", 5.0)]
    speed = int8_speed(rows)
    assert [(r["backend"], r["dtype"]) for r in speed] == [("openvino", "bf16"), ("openvino", "int8")]
    assert speed[0]["ratio_to_fp32"] == 0.5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_capability_query_decides_what_is_offered(precision):
    reason = OPENVINO.float_missing(precision)
    capability = openvino.PRECISIONS[precision][1]
    assert (reason is None) == (capability in _capabilities())
    if reason:
        assert precision in reason


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_gated_float_file_records_its_precision_and_compiles_at_it(plain, tmp_path, precision):
    if OPENVINO.float_missing(precision):
        pytest.skip(OPENVINO.float_missing(precision))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batches = [(images[:4], torch.zeros(4, dtype=torch.long)), (images[4:], torch.ones(4, dtype=torch.long))]
    gate = Gate.of(torch.inference_mode()(plain), batches, max_drop=100.0)
    models, skipped = gate_floats(plain, images, gate, ["openvino"], [precision])
    assert skipped == [] and list(models) == [f"openvino_{precision}"]
    gated = models[f"openvino_{precision}"]
    assert gated.passed
    path = tmp_path / FILES[precision]
    info = OPENVINO.write_low_precision(gated, path, {"model": "x"}, images[:2], check=Check(1e-5, 1e-5))
    reloaded = openvino.load(path)
    type_name = openvino.PRECISIONS[precision][0]
    assert openvino.recorded_precision(reloaded) == type_name
    assert openvino.compile_model(reloaded).get_property("INFERENCE_PRECISION_HINT").get_type_name() == type_name
    assert openvino.read_metadata(reloaded) == {"model": "x"}
    assert info["format"] == f"openvino {type_name}"


def test_float_precisions_are_checked_settings():
    config = DeployConfig.from_dict({"model": "repvgg_tiny", "quantize": {"precision": "int8", "floats": ["bf16"]}})
    assert config.quantize.floats == ("bf16",)
    with pytest.raises(UserError, match="fp8"):
        DeployConfig.from_dict({"model": "repvgg_tiny", "quantize": {"precision": "int8", "floats": ["fp8"]}})


@pytest.mark.slow
def test_deploy_gates_writes_and_times_bf16_beside_int8(tmp_path):
    """quantize=int8 with floats: model_bf16.xml where the CPU has bf16, timed in the same rounds; fp16 skipped, saying why, where not."""
    from repblocks.datasets import DigitsData
    from repblocks.deploy.pipeline import run_deploy
    from tests.helpers import write_checkpoint

    data = {"_target_": "repblocks.datasets.DigitsData", "image_size": 32}
    model = repblocks.create_model("repvgg_tiny", num_classes=10)
    ckpt = write_checkpoint(
        tmp_path / "last.ckpt", model, data=data, preprocessing=DigitsData(image_size=32).preprocessing
    )
    gate = {"precision": "int8", "engines": ["openvino"], "floats": ["bf16", "fp16"], "calibration_images": 16}
    gate |= {"eval_images": 32, "worst_layers": 0, "max_drop": 100.0}
    bench = {"device": "cpu", "batch_sizes": [2], "rounds": 2, "backends": ["eager", "openvino"]}
    config = {"out_dir": str(tmp_path / "out"), "ckpt": str(ckpt), "bench": bench, "quantize": gate}
    report = run_deploy(DeployConfig.from_dict({**config, "export": {"formats": ["openvino"]}}))
    for precision in ("bf16", "fp16"):
        written = (tmp_path / "out" / FILES[precision]).is_file()
        reason = OPENVINO.float_missing(precision)
        assert written == (reason is None)
        if reason:
            assert {"what": f"openvino {precision}", "reason": reason} in report["int8"]["skipped"]
        else:
            assert f"openvino_{precision}" in report["int8"]["engines"]
            assert any(row["dtype"] == precision for row in report["int8"]["speed"])
