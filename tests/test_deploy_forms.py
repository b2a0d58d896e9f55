"""What deploy reads and what its exports carry: deploy-form weights in, the model's preprocessing and input size out."""

import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import safetensors
import torch

import repblocks
from repblocks import registry
from repblocks.deploy import preprocessing
from repblocks.deploy.config import DeployConfig
from repblocks.deploy.pipeline import run_deploy
from repblocks.errors import UserError
from repblocks.numerics import max_errors
from tests.helpers import IMAGES
from tests.helpers import trained_model as _trained_model
from tests.helpers import write_checkpoint as _checkpoint

NO_BENCH = dict(device="cpu", batch_sizes=[])
DIGITS = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}


def _config(out_dir: Path, *, formats: list[str], bench: dict = NO_BENCH, **settings) -> DeployConfig:
    return DeployConfig.from_dict({"out_dir": str(out_dir), "bench": bench, "export": {"formats": formats}, **settings})


def _metadata(path: str) -> dict[str, str]:
    with safetensors.safe_open(path, "pt") as handle:
        return handle.metadata()


def _deploy_form(path: str) -> torch.nn.Module:
    plain = repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True)
    return repblocks.load_weights(plain, path).eval()


@torch.inference_mode()
def test_its_own_safetensors_export_deploys_again_without_a_model_name(tmp_path):
    model = _trained_model()
    ckpt = _checkpoint(tmp_path / "last.ckpt", model, preprocessing=DIGITS)
    first = run_deploy(_config(tmp_path / "first", ckpt=str(ckpt), formats=["safetensors"]))
    path = first["exports"]["safetensors"]["path"]
    metadata = _metadata(path)
    assert metadata["form"] == "deploy" and metadata["model"] == "repvgg_tiny" and metadata["num_classes"] == "10"
    assert {key: json.loads(metadata[key]) for key in preprocessing.KEYS} == DIGITS

    again = run_deploy(_config(tmp_path / "again", ckpt=path, formats=["safetensors"]))
    assert again["already_deployed"] and again["conversion"].startswith("the weights were already in deploy form")
    assert again["max_abs_err"] is None and "no train form" in again["verify"]["reason"]
    assert {key: again["preprocessing"][key] for key in preprocessing.KEYS} == DIGITS
    assert set(again["preprocessing"]["source"].values()) == {"model.safetensors's metadata"}
    assert max_errors(model(IMAGES), _deploy_form(again["exports"]["safetensors"]["path"])(IMAGES))[1] < 1e-5


@pytest.mark.parametrize("layout", ["repblocks", "official", "timm"])
@torch.inference_mode()
def test_bare_deploy_form_weights_of_any_layout_with_a_model_name(tmp_path, layout):
    model = _trained_model()
    weights = repblocks.convert_layout(repblocks.switch_to_deploy(model).state_dict(), layout)
    assert any(key.endswith("reparam.weight") or "reparam_conv" in key for key in weights)
    torch.save(weights, tmp_path / "deployed.pth")
    report = run_deploy(
        _config(tmp_path / "out", ckpt=str(tmp_path / "deployed.pth"), model="repvgg_tiny", formats=["safetensors"])
    )
    assert report["already_deployed"] and report["num_classes"] == 10 and "already in deploy form" in report["origin"]
    assert max_errors(model(IMAGES), _deploy_form(report["exports"]["safetensors"]["path"])(IMAGES))[1] < 1e-5


@torch.inference_mode()
def test_exports_take_the_models_input_size_and_carry_its_preprocessing(tmp_path):
    model = _trained_model()
    ckpt = _checkpoint(tmp_path / "last.ckpt", model, preprocessing=DIGITS)
    bench = dict(device="cpu", image_size=48, batch_sizes=[1], rounds=1, warmup=0, backends=["eager"])
    report = run_deploy(_config(tmp_path / "out", ckpt=str(ckpt), formats=["onnx"], bench=bench))
    assert report["input_shape"] == [3, 32, 32] and report["image_shape"] == [3, 48, 48]  # exported vs timed
    assert report["verify"]["image_shapes"] == [[3, 32, 32], [3, 48, 48]]  # both sizes verified
    path = report["exports"]["onnx"]["path"]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]  # not bench.image_size
    (logits,) = session.run(None, {"images": IMAGES.numpy()})
    assert max_errors(model(IMAGES), torch.from_numpy(logits))[1] < 1e-5
    properties = {prop.key: prop.value for prop in onnx.load(path).metadata_props}
    assert {key: json.loads(properties[key]) for key in preprocessing.KEYS} == DIGITS
    assert properties["model"] == "repvgg_tiny" and properties["form"] == "deploy"


def test_preprocessing_comes_from_the_models_pretrained_cfg_when_the_weights_say_nothing(tmp_path, monkeypatch):
    config = {"input_size": (3, 40, 40), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}

    def with_pretrained_cfg(**kwargs):
        model = repblocks.create_model("repvgg_tiny", **kwargs)
        model.pretrained_cfg = dict(config, interpolation="bicubic")
        return model

    monkeypatch.setitem(registry._BUILDERS, "repvgg_tiny_with_cfg", with_pretrained_cfg)
    monkeypatch.setitem(registry._PRETRAINED_CFGS, "repvgg_tiny_with_cfg", dict(config, interpolation="bicubic"))
    report = run_deploy(_config(tmp_path / "out", model="repvgg_tiny_with_cfg", formats=["safetensors"]))
    assert report["input_shape"] == [3, 40, 40] and report["preprocessing"]["interpolation"] == "bicubic"
    assert set(report["preprocessing"]["source"].values()) == {"the model's pretrained_cfg"}
    assert json.loads(_metadata(report["exports"]["safetensors"]["path"])["mean"]) == [0.1, 0.2, 0.3]


def test_preprocessing_falls_back_to_imagenet_defaults_and_says_so():
    found = preprocessing.resolve(in_chans=1, found=[("the checkpoint", None), ("the model's pretrained_cfg", {})])
    assert found["input_size"] == [1, 224, 224] and found["crop_pct"] == 0.875 and found["interpolation"] == "bilinear"
    assert found["mean"] == [pytest.approx(0.449)] and found["std"] == [pytest.approx(0.226)]  # ImageNet's, averaged
    assert all(where.startswith("ImageNet defaults") for where in found["source"].values())


@pytest.mark.parametrize(
    "saved,message",
    [
        ({"input_size": 0}, r"input_size must be a side, \(H, W\) or \(C, H, W\) of 1 to 4096, got 0"),
        ({"input_size": [3, 20000, 20000]}, r"input_size must be .* of 1 to 4096, got \[3, 20000, 20000\]"),
        ({"mean": [0.5, 0.5]}, r"mean and std need one finite number per channel \(3\)"),
        ({"std": [0.5, 0.0, 0.5]}, r"mean and std need one finite number per channel"),
        ({"crop_pct": 2}, r"crop_pct must be a fraction in \(0, 1\], got 2"),
        ({"interpolation": "bi linear"}, r"interpolation must be a name"),
    ],
)
def test_malformed_preprocessing_in_a_file_is_one_line(saved, message):
    with pytest.raises(UserError, match=r"^malformed preprocessing in ckpt: " + message):
        preprocessing.resolve(in_chans=3, found=[("the checkpoint", saved)], what="ckpt")


def test_torchvision_models_take_the_preprocessing_of_their_weights(tmp_path):
    report = run_deploy(_config(tmp_path / "out", source="torchvision:resnet18", formats=[]))
    assert report["preprocessing"]["crop_pct"] == 0.875 and report["input_shape"] == [3, 224, 224]
    assert set(report["preprocessing"]["source"].values()) == {
        "the transforms of torchvision's ResNet18_Weights.IMAGENET1K_V1"
    }


@pytest.mark.parametrize(
    "metadata,settings,message",
    [
        ({"num_classes": "ten"}, {}, r"num_classes='ten' is out of range; it must be an integer from 1 to"),
        ({"model_kwargs": "[1]"}, {}, r"model_kwargs must be a mapping, got a list"),
        (
            {"model_kwargs": '{"colour": 1}'},
            {},
            r"model_kwargs 'colour' is not an architecture argument a file may set; allowed: drop_rate, act, ",
        ),
        ({"mean": "[0.5"}, {}, r"malformed metadata mean='\[0.5': not a JSON value"),
        ({"in_chans": "0"}, {}, r"in_chans='0' is out of range; it must be an integer from 1 to 1024"),
        (
            {},
            {"model": "repvgg_tiny_g2se"},
            r"holds a repvgg_tiny \(its metadata says so\), but model=repvgg_tiny_g2se",
        ),
        ({}, {"num_classes": 5}, r"holds a 10-class repvgg_tiny, but num_classes=5 was given"),
    ],
)
def test_bad_deploy_metadata_is_one_line(tmp_path, metadata, settings, message):
    plain = repblocks.switch_to_deploy(_trained_model())
    good = {"model": "repvgg_tiny", "num_classes": "10", "in_chans": "3", "model_kwargs": "{}", "form": "deploy"}
    path = repblocks.save_weights(plain, tmp_path / "model.safetensors", metadata={**good, **metadata})
    with pytest.raises(UserError, match=message):
        run_deploy(_config(tmp_path / "out", ckpt=str(path), formats=[], **settings))
    assert not (tmp_path / "out").exists()


def test_data_named_by_a_checkpoint_is_never_downloaded(tmp_path):
    root = tmp_path / "cifar"
    data = {"_target_": "repblocks.datasets.Cifar10Data", "root": str(root), "download": True, "num_workers": 0}
    ckpt = _checkpoint(tmp_path / "last.ckpt", _trained_model(), data=data)
    real = run_deploy(_config(tmp_path / "out", ckpt=str(ckpt), formats=[]))["verify"]["real_images"]
    assert real.startswith("skipped (data.root: CIFAR-10") and real.endswith("is never downloaded)")
    assert not root.exists()  # nothing fetched, nothing created


def test_a_checkpoint_whose_model_kwargs_do_not_fit_is_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path / "last.ckpt", _trained_model())
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["model_kwargs"] = {"colour": 1}
    torch.save(checkpoint, ckpt)
    with pytest.raises(UserError, match=r"hyper_parameters: model_kwargs 'colour' is not an architecture argument"):
        run_deploy(_config(tmp_path / "out", ckpt=str(ckpt), formats=[]))
