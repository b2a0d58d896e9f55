"""Core ML: the fp32 and fp16 ML Program packages hold the model's inputs, weights, convolutions and metadata (Core ML
cannot run them on Linux), and deploy writes them, with the .tflite, all or nothing."""

import json
import logging
from pathlib import Path

import pytest
import torch

import repblocks
from repblocks.deploy.config import DeployConfig
from repblocks.deploy.engines import coreml, litert
from repblocks.deploy.engines.base import Check
from repblocks.deploy.pipeline import run_deploy
from repblocks.errors import OutputMismatch, UserError

needs_coreml = pytest.mark.skipif(coreml.missing() is not None, reason=f"{coreml.missing()}")
needs_both = pytest.mark.skipif(
    coreml.missing() is not None or litert.missing() is not None,
    reason=f"{coreml.missing() or litert.missing()}",
)
NAMES = ["cat", "dog", "=bird", "emu", "fox", "gnu", "hen", "ibis", "jay", "koi"]
METADATA = {
    "model": "mobileone_tiny",
    "mean": "[0.485, 0.456, 0.406]",
    "std": "[0.229, 0.224, 0.225]",
    "class_names": json.dumps(NAMES),
}
TAKES = {
    "input_type": "RGB image, pixels 0-255",
    "input_shape": "[1, 3, 32, 40]",
    "normalization": "inside the model: (pixel / 255 - mean) / std",
}
NO_BENCH = dict(device="cpu", batch_sizes=[])


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """mobileone_tiny (depthwise convs, squeeze-excite) in both precisions, written once; and its conv count."""
    folder = tmp_path_factory.mktemp("coreml")
    model = repblocks.switch_to_deploy(repblocks.create_model("mobileone_tiny", num_classes=10)).eval()
    example = torch.randn(2, 3, 32, 40)  # not square: height and width must not be swapped
    infos = {
        precision: coreml.ENGINE.export(
            model, folder / f"{precision}.mlpackage", example, METADATA, check=Check(1e-4, 1e-4), precision=precision
        )
        for precision in coreml.PRECISIONS
    }
    return folder, infos, sum(isinstance(module, torch.nn.Conv2d) for module in model.modules())


@pytest.mark.slow
@needs_coreml
def test_both_packages_are_validated_not_run(packages):
    folder, infos, convs = packages
    for precision, info in infos.items():
        assert info["format"] == f"coreml {precision}"
        assert "not run here (Core ML runs on macOS)" in info["check"] and f"{convs} conv ops" in info["check"]
        assert (folder / f"{precision}.mlpackage" / "Manifest.json").is_file()
    assert sorted(path.name for path in folder.iterdir()) == ["fp16.mlpackage", "fp32.mlpackage"]  # no temporary


@pytest.mark.slow
@needs_coreml
def test_the_metadata_and_the_precision_are_read_back(packages):
    folder, _, _ = packages
    for precision in coreml.PRECISIONS:
        assert coreml.read_metadata(folder / f"{precision}.mlpackage") == {**METADATA, "precision": precision, **TAKES}


@pytest.mark.slow
@needs_coreml
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(precision="fp32"), r"^the fp32 Core ML package holds weights of \['FLOAT16'\], not FLOAT32 only$"),
        (dict(input_shape=(3, 40, 32)), r"^the Core ML package has inputs and outputs"),
        (dict(num_classes=1000), r"^the Core ML classifier has 10 class labels; the model has 1000 classes$"),
        (dict(convs=1), r"^the Core ML program has \d+ convolutions; the model has 1$"),
        (dict(metadata={**METADATA, "std": "[1, 1, 1]"}), r"^the Core ML package's metadata lost or changed std$"),
    ],
)
def test_validation_fails_on_what_is_not_the_models(packages, change, message):
    folder, _, convs = packages
    expected = dict(input_shape=(3, 32, 40), num_classes=10, convs=convs, precision="fp16", metadata=METADATA)
    coreml.validate(folder / "fp16.mlpackage", **expected)  # as written: valid
    with pytest.raises(OutputMismatch, match=message):  # a check of ours: it stops the run (not "not converted")
        coreml.validate(folder / "fp16.mlpackage", **{**expected, **change})


def test_a_folder_that_is_not_a_package_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path} is not a Core ML package \(a folder with a Manifest.json\)$"):
        coreml.read_metadata(tmp_path)


def test_missing_names_the_extra_and_stops_a_run_that_asks_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert coreml.missing() == "coremltools is not installed (pip install 'repblocks[coreml]')"
    config = DeployConfig.from_dict(
        {"out_dir": str(tmp_path / "out"), "bench": NO_BENCH, "model": "repvgg_tiny", "export": {"formats": ["coreml"]}}
    )
    with pytest.raises(UserError, match=r"^export.formats=\[coreml\] needs coremltools, but coremltools is not inst"):
        run_deploy(config)
    assert list(tmp_path.iterdir()) == []


@needs_coreml
def test_coremltools_import_noise_is_kept_out_of_the_log(caplog):
    caplog.set_level(logging.INFO)
    coreml._coremltools()
    logger = logging.getLogger("coremltools")
    logger.warning("Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'")
    logger.info('Removing op "conv2d_cast_fp16_to_fp32" (type: cast)')
    logger.warning("a warning about the model")
    kept = [record.getMessage() for record in caplog.records if record.name.startswith("coremltools")]
    assert kept == ["a warning about the model"]


def _deploy(out: Path, **settings) -> dict:
    config = {
        "out_dir": str(out),
        "bench": NO_BENCH,
        "model": "qarepvgg_tiny",
        "export": {"formats": ["litert", "coreml"]},
    }
    return run_deploy(DeployConfig.from_dict({**config, **settings}))


@pytest.mark.slow
@needs_both
def test_deploy_writes_the_tflite_and_both_packages(tmp_path):
    report = _deploy(tmp_path / "out")
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == [
        "config.json",
        "model.mlpackage",
        "model.tflite",
        "model_fp16.mlpackage",
        "report.json",
        "report.md",
    ]
    assert set(report["exports"]) == {"litert", "coreml", "coreml_fp16"}
    assert report["exports"]["litert"]["max_rel_err"] < 1e-4
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "not run here" in saved["exports"]["coreml_fp16"]["check"]
    assert litert.read_metadata(tmp_path / "out" / "model.tflite")["model"] == "qarepvgg_tiny"
    assert coreml.read_metadata(tmp_path / "out" / "model.mlpackage")["model"] == "qarepvgg_tiny"
    _deploy(tmp_path / "out")  # a previous output holding packages (folders) is replaced whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
@needs_both
def test_a_failed_package_check_leaves_nothing_half_written(tmp_path, monkeypatch):
    def fail(*_, **__):  # what coreml.validate raises for a package that is not the model
        raise OutputMismatch("the Core ML program has 7 convolutions; the model has 8")

    monkeypatch.setattr(coreml, "validate", fail)
    with pytest.raises(UserError, match="the Core ML program has 7 convolutions"):
        _deploy(tmp_path / "out")  # the .tflite was written and checked before
    assert list(tmp_path.iterdir()) == []


def _spec(path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()  # Core ML's own reader: no prediction on Linux


def _program(spec) -> dict:
    """The main function's ops: {"ops": [types], "consts": {name: value}, "classify": op}."""
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    consts = {op.outputs[0].name: op.attributes["val"] for op in operations if op.type == "const"}
    (classify,) = [op for op in operations if op.type == "classify"]
    return {"ops": [op for op in operations if op.type != "const"], "consts": consts, "classify": classify}


@pytest.mark.slow
@needs_coreml
def test_an_ios_app_gets_an_image_classifier_with_its_labels(packages):
    folder, _, _ = packages
    spec = _spec(folder / "fp32.mlpackage")
    (image,) = spec.description.input
    assert image.name == "image" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (40, 32)
    assert image.type.imageType.colorSpace == image.type.imageType.RGB
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabel_probs"
    kinds = {feature.name: feature.type.WhichOneof("Type") for feature in spec.description.output}
    assert kinds == {"classLabel": "stringType", "classLabel_probs": "dictionaryType"}
    program = _program(spec)
    labels = program["classify"].inputs["classes"].arguments[0].value.immediateValue.list.values
    assert [label.immediateValue.tensor.strings.values[0] for label in labels] == NAMES
    assert coreml.read_labels(folder / "fp32.mlpackage") == NAMES
    assert "10 classes" in spec.description.metadata.shortDescription and spec.description.metadata.author


def _floats(value) -> list[float]:
    return list(value.immediateValue.tensor.floats.values)


@pytest.mark.slow
@needs_coreml
def test_the_image_is_scaled_then_normalized_per_channel_exactly(packages):
    folder, _, _ = packages
    program = _program(_spec(folder / "fp32.mlpackage"))
    scale, sub, mul = program["ops"][:3]  # pixels 0-255 * 1/255 (the image type's scale), - mean, * 1/std
    assert (scale.type, sub.type, mul.type) == ("mul", "sub", "mul")
    assert scale.inputs["x"].arguments[0].name == "image"
    consts = program["consts"]
    assert _floats(consts[scale.inputs["y"].arguments[0].name]) == pytest.approx([1 / 255])
    assert _floats(consts[sub.inputs["y"].arguments[0].name]) == pytest.approx([0.485, 0.456, 0.406])
    assert _floats(consts[mul.inputs["y"].arguments[0].name]) == pytest.approx([1 / 0.229, 1 / 0.224, 1 / 0.225])
    assert program["classify"].inputs["probabilities"].arguments[0].name == program["ops"][-2].outputs[0].name
    assert program["ops"][-2].type == "softmax"  # probabilities, not logits


@pytest.mark.slow
@needs_coreml
def test_without_mean_and_std_the_input_stays_a_tensor_with_index_labels(tmp_path):
    model = repblocks.switch_to_deploy(repblocks.create_model("repvgg_tiny", num_classes=3)).eval()
    path = tmp_path / "model.mlpackage"
    coreml.ENGINE.export(model, path, torch.randn(2, 3, 32, 32), {"model": "repvgg_tiny"}, check=Check(1e-4, 1e-4))
    (source,) = _spec(path).description.input
    assert source.name == "images" and tuple(source.type.multiArrayType.shape) == (1, 3, 32, 32)
    assert coreml.read_labels(path) == [0, 1, 2]
    assert coreml.read_metadata(path)["normalization"] == "by the caller"
