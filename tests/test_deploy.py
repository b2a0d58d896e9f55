"""The deploy pipeline end to end on the tiny model, and every kind of bad input, through the library and deploy.py."""

import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime
import pytest
import torch

import repblocks
from repblocks.cli import exit_on_user_error
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.runners import applicable
from repblocks.errors import UserError
from repblocks.numerics import max_errors
from tests.helpers import IMAGES, ROOT, open_to_everyone, read_only_dir, unprivileged
from tests.helpers import trained_model as _trained_model
from tests.helpers import write_checkpoint as _checkpoint

# Small and quick: 32x32 inputs, two timed rounds, no compile.
FAST_BENCH = dict(device="cpu", image_size=32, batch_sizes=[1, 2], rounds=2, warmup=1)
NO_BENCH = dict(device="cpu", batch_sizes=[])


def _config(tmp_path: Path, bench: dict = NO_BENCH, **settings) -> DeployConfig:
    return DeployConfig.from_dict({"out_dir": str(tmp_path / "out"), "bench": bench, **settings})


@torch.inference_mode()
def test_checkpoint_to_every_export_and_report(tmp_path):
    model = _trained_model()
    ckpt = _checkpoint(tmp_path / "last.ckpt", model)
    bench = dict(FAST_BENCH, backends=["eager", "channels_last", "onnxruntime"])
    report = run_deploy(_config(tmp_path, bench=bench, ckpt=str(ckpt)))
    expected = model(IMAGES)

    plain = repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True)
    repblocks.load_weights(plain, report["exports"]["safetensors"]["path"])
    assert max_errors(expected, plain.eval()(IMAGES))[1] < 1e-5
    session = onnxruntime.InferenceSession(report["exports"]["onnx"]["path"], providers=["CPUExecutionProvider"])
    for images in (IMAGES[:1], IMAGES):  # batch 1 and 3
        (logits,) = session.run(None, {"images": images.numpy()})
        assert max_errors(model(images), torch.from_numpy(logits))[1] < 1e-5
    program = torch.export.load(report["exports"]["torch_export"]["path"]).module()
    assert max_errors(expected, program(IMAGES))[1] < 1e-5

    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("model", "device", "max_abs_err", "max_rel_err", "exports", "benchmark"):
        assert key in saved
    assert saved["model"] == "repvgg_tiny" and saved["max_rel_err"] < 1e-5 and saved["top1_agreement"] == 1.0
    assert {(row["form"], row["backend"], row["batch_size"]) for row in saved["benchmark"]} == {
        (form, backend, batch)
        for form in ("train", "deploy")
        for backend in ("eager", "channels_last", "onnxruntime")
        for batch in (1, 2)
    }
    for row in saved["benchmark"]:
        assert {"form", "backend", "dtype", "batch_size", "throughput", "latency_ms"} <= row.keys()
        assert row["throughput"] > 0 and row["latency_ms"] > 0 and row["dtype"] == "fp32"
    assert saved["verify"]["real_images"].startswith("skipped")
    assert (tmp_path / "out" / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| deploy | onnxruntime | fp32 | 2 |" in (tmp_path / "out" / "report.md").read_text()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_weights_under_the_ema_prefix_are_the_ones_deployed(tmp_path):
    ema = _trained_model(seed=1)
    ckpt = tmp_path / "ema.ckpt"
    _checkpoint(ckpt, ema, prefix="ema.module.")
    checkpoint = torch.load(ckpt, weights_only=True)  # add the raw (non-EMA) weights beside the EMA ones
    checkpoint["state_dict"].update({f"model.{k}": v for k, v in _trained_model(seed=2).state_dict().items()})
    torch.save(checkpoint, ckpt)
    report = run_deploy(_config(tmp_path, ckpt=str(ckpt), export={"formats": ["safetensors"]}))
    plain = repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True)
    repblocks.load_weights(plain, report["exports"]["safetensors"]["path"])
    with torch.inference_mode():
        assert max_errors(ema(IMAGES), plain.eval()(IMAGES))[1] < 1e-5


def test_verification_on_validation_images_when_the_data_is_there(tmp_path):
    data = {"_target_": "repblocks.datasets.FakeData", "num_classes": 10, "image_size": 32, "val_size": 12}
    ckpt = _checkpoint(tmp_path / "last.ckpt", _trained_model(), data=data)
    real = run_deploy(_config(tmp_path, ckpt=str(ckpt), export={"formats": []}))["verify"]["real_images"]
    assert real["images"] == 12 and real["top1_agreement"] == 1.0 and real["max_rel_err"] < 1e-5
    assert 0 <= real["train_accuracy"] == real["deploy_accuracy"] <= 1


def test_verification_on_validation_images_is_skipped_with_the_reason(tmp_path):
    data = {"_target_": "repblocks.datasets.ImageFolderData", "root": str(tmp_path / "gone")}
    ckpt = _checkpoint(tmp_path / "last.ckpt", _trained_model(), data=data)
    real = run_deploy(_config(tmp_path, ckpt=str(ckpt), export={"formats": []}))["verify"]["real_images"]
    assert real.startswith("skipped") and "train/ folder not found" in real


def test_bare_weights_file_with_a_model_name(tmp_path):
    path = tmp_path / "weights.pth"  # another trainer's checkpoint: no hyper-parameters, a wrapped state dict
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in _trained_model().state_dict().items()}}, path)
    report = run_deploy(_config(tmp_path, ckpt=str(path), model="repvgg_tiny", export={"formats": []}))
    assert report["num_classes"] == 10 and report["max_rel_err"] < 1e-5  # classes read from the weights


def test_random_weights_of_a_named_model_and_no_exports(tmp_path):
    bench = dict(FAST_BENCH, backends=["eager"])
    report = run_deploy(_config(tmp_path, model="repvgg_tiny_g2se", export={"formats": []}, bench=bench))
    assert report["exports"] == {} and report["max_rel_err"] < 1e-5 and len(report["benchmark"]) == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "report.json",
        "report.md",
        "throughput.png",
    ]


def test_combinations_that_do_not_apply_are_skipped_with_the_reason(tmp_path):
    bench = dict(FAST_BENCH, batch_sizes=[2], backends=["eager", "channels_last"], dtypes=["fp32", "fp16", "bf16"])
    report = run_deploy(_config(tmp_path, model="repvgg_tiny", export={"formats": []}, bench=bench))
    assert {(row["backend"], row["dtype"]) for row in report["benchmark"]} == {
        (backend, dtype) for backend in ("eager", "channels_last") for dtype in ("fp32", "bf16")
    }
    assert [item["what"] for item in report["skipped"]] == ["eager fp16", "channels_last fp16"]
    assert "fp16 convolutions on the CPU" in report["skipped"][0]["reason"]
    assert set(report["verify"]["dtypes"]) == {"bf16"}  # every dtype that is timed is verified first
    assert "## Not timed" in (tmp_path / "out" / "report.md").read_text()


def test_onnxruntime_runs_float32_only_and_needs_its_cuda_provider_on_gpus():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert applicable("onnxruntime", "fp32", cpu) is None
    assert "float32" in applicable("onnxruntime", "bf16", cpu)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "no CUDAExecutionProvider" in applicable("onnxruntime", "fp32", cuda)


@torch.inference_mode()
def test_torchvision_resnet18_is_folded_exported_and_reloaded(tmp_path):
    report = run_deploy(_config(tmp_path, source="torchvision:resnet18", export={"formats": ["safetensors"]}))
    assert report["model"] == "torchvision:resnet18" and report["max_rel_err"] < 1e-5
    weights = repblocks.read_state_dict(report["exports"]["safetensors"]["path"])
    assert "conv1.bias" in weights and not any("running_mean" in key for key in weights)  # every BN folded away


def test_a_deploy_form_that_differs_stops_before_anything_is_written(tmp_path, monkeypatch):
    def broken_switch_to_deploy(model):
        plain = repblocks.switch_to_deploy(model)
        with torch.no_grad():
            plain.head.fc.bias += 1.0
        return plain

    monkeypatch.setattr("repblocks.deploy.convert.switch_to_deploy", broken_switch_to_deploy)
    with pytest.raises(UserError, match=r"differs from the train form.*tolerance verify.atol=0.0001.*nothing was"):
        run_deploy(_config(tmp_path, model="repvgg_tiny"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(model="resnet18"), r"unknown model 'resnet18'; registered models: .*\brepvgg_a0, "),
        (dict(source="torchvision:resnet_x"), r"unknown torchvision classification model .*; known: alexnet, "),
        (dict(source="timm:resnet18"), r"unknown source 'timm:resnet18'; known: torchvision:NAME"),
        (
            dict(model="repvgg_tiny", export={"formats": ["tflite"]}),
            r"known: safetensors, onnx, torch_export, openvino, executorch, litert, coreml, aoti$",
        ),
        (dict(model="repvgg_tiny", export={"formats": ["torchscript"]}), r"TorchScript is deprecated.*torch_export"),
        (dict(model="repvgg_tiny", bench=dict(backends=["tensorrt8"])), r"known: eager, channels_last, compile, onnx"),
        (dict(model="repvgg_tiny", bench=dict(dtypes=["fp8"])), r"unknown dtype 'fp8'; known: fp32, fp16, bf16"),
        (dict(model="repvgg_tiny", bench=dict(device="tpu")), r"unknown bench.device 'tpu'"),
        (dict(model="repvgg_tiny", source="torchvision:resnet18"), r"give one of ckpt=PATH, model=NAME"),
        (dict(), r"nothing to deploy"),
        (dict(model="repvgg_tiny", bench=dict(warmpu=1)), r"unknown setting bench.warmpu; known: bench.backends"),
    ],
)
def test_unknown_names_say_what_exists(tmp_path, settings, message):
    with pytest.raises(UserError, match=message):
        run_deploy(DeployConfig.from_dict({"out_dir": str(tmp_path / "out"), **settings}))
    assert not (tmp_path / "out").exists()


def test_speed_table_times_models_side_by_side(tmp_path):
    bench = dict(device="cpu", image_size=32, batch_sizes=[2], rounds=2, warmup=1)
    report = run_deploy(_config(tmp_path, models=["repvgg_tiny", "torchvision:resnet18"], bench=bench))
    assert [row["model"] for row in report["rows"]] == [
        "repvgg_tiny",
        "torchvision:resnet18",
        "torchvision:resnet18 folded",
    ]
    assert report["rows"][1]["ratio_to_resnet18"] == 1.0
    assert "| torchvision:resnet18 folded | 2 |" in (tmp_path / "out" / "speed_table.md").read_text()
    assert json.loads((tmp_path / "out" / "speed_table.json").read_text())["rows"] == report["rows"]


@pytest.mark.slow
def test_compiled_backend_is_timed_or_skipped_with_a_reason(tmp_path):
    bench = dict(FAST_BENCH, backends=["eager", "compile"], batch_sizes=[2])
    report = run_deploy(_config(tmp_path, model="repvgg_tiny", export={"formats": []}, bench=bench))
    timed = {row["backend"] for row in report["benchmark"]}
    assert "compile" in timed or any("compile" in item["what"] for item in report["skipped"])


@pytest.mark.gpu
def test_cuda_in_every_dtype(tmp_path):
    bench = dict(device="cuda", image_size=32, batch_sizes=[1, 4], rounds=3, warmup=1, dtypes=["fp32", "fp16", "bf16"])
    bench["backends"] = ["eager", "channels_last", "onnxruntime"]
    report = run_deploy(_config(tmp_path, model="repvgg_tiny_g2se", bench=bench))
    assert report["device"].startswith("cuda") and report["max_rel_err"] < 1e-4
    assert set(report["verify"]["dtypes"]) == {"fp16", "bf16"}
    assert {row["dtype"] for row in report["benchmark"]} == {"fp32", "fp16", "bf16"}


# deploy.py itself, on bad input: one line on stderr, exit status 1, out_dir as it was, and no run folder left.
# All runs start at once (each is mostly torch's import time) and are checked one test each.


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code it should have refused."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


BAD_INPUTS = [
    "missing file",
    "not a checkpoint",
    "truncated",
    "code in the pickle",
    "weights of another model",
    "bare weights without a model",
    "unknown model",
    "unknown source",
    "unknown format",
    "cuda without a GPU",
    "image size not a number",
    "out_dir is a file",
    "out_dir holds other files",
    "read-only out_dir",
    "vit at another image size",
]
UNPRIVILEGED = {"read-only out_dir"}  # run as user nobody, for whom the folder's mode applies
# Run as deploy.py processes: one of each kind of failure deploy.py itself handles (a library error,
# Hydra's parsing of a value, out_dir checks before Hydra makes its run folder, the security case).
# The others go through the same one-line path in this process (exit_on_user_error around run_deploy).
AS_PROCESS = {"missing file", "code in the pickle", "image size not a number", "out_dir is a file", "read-only out_dir"}


def _bad_inputs(folder: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name: (overrides, what stderr must say). out_dir is folder/<name with underscores>, set up here when needed."""
    good = folder / "good.pth"
    torch.save(_trained_model().state_dict(), good)
    (folder / "junk.ckpt").write_text("not a checkpoint")
    (folder / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with open(folder / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": _Payload(folder / "pwned")}, handle)
    (folder / "out_dir_is_a_file").write_text("a file of the user's")
    (folder / "out_dir_holds_other_files").mkdir()
    (folder / "out_dir_holds_other_files" / "notes.txt").write_text("the user's notes")
    read_only_dir(folder / "read-only_out_dir")
    tiny = ["model=repvgg_tiny"]
    return {
        "missing file": ([f"ckpt={folder / 'nope.ckpt'}"], ("weights file not found",)),
        "not a checkpoint": ([f"ckpt={folder / 'junk.ckpt'}"], ("not a PyTorch checkpoint",)),
        "truncated": ([f"ckpt={folder / 'truncated.ckpt'}", "model=repvgg_tiny"], ("truncated/corrupted",)),
        "code in the pickle": ([f"ckpt={folder / 'evil.ckpt'}"], ("refusing to load",)),
        "weights of another model": ([f"ckpt={good}", "model=repvgg_tiny_g2se"], ("missing keys (stem.se.",)),
        "bare weights without a model": ([f"ckpt={good}"], ("name its architecture: model=NAME",)),
        "unknown model": (["model=repvgg_z9"], ("unknown model 'repvgg_z9'; registered models: ",)),
        "unknown source": (["source=torchvision:nope"], ("known: alexnet",)),
        "unknown format": ([*tiny, "export.formats=[tflite]"], ("known: safetensors, onnx",)),
        "cuda without a GPU": ([*tiny, "bench.device=cuda"], ("no CUDA device is available",)),
        "image size not a number": ([*tiny, "bench.image_size=abc"], ("bench.image_size must be an integer",)),
        "out_dir is a file": (tiny, ("is a file; give a folder",)),
        "out_dir holds other files": (tiny, ("not empty and not a deploy output (it holds notes.txt)",)),
        "read-only out_dir": (tiny, ("read-only_out_dir is not writable",)),
        "vit at another image size": (
            ["source=torchvision:vit_b_16", "bench.image_size=32", "bench.device=cpu"],
            ("torchvision:vit_b_16 does not take 3x32x32 inputs", "it takes 3x224x224"),
        ),
    }


def _snapshot(path: Path) -> object:
    """What is at ``path``: None, a file's bytes, or a folder's names and contents."""
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {child.name: _snapshot(child) for child in sorted(path.iterdir())}
    return None


@pytest.fixture(scope="module")
def bad_runs():
    # Not under pytest's own temporary folder: every pytest run on the machine makes that owner-only
    # again, and the unprivileged run must reach its out_dir.
    with tempfile.TemporaryDirectory(prefix="repblocks-bad-deploys-") as tmp:
        yield _run_bad_inputs(open_to_everyone(Path(tmp)))


def _run_bad_inputs(folder: Path) -> tuple[Path, dict]:
    for shared in ("hydra", "home"):  # run folders, and user nobody's HOME (matplotlib's cache)
        (folder / shared).mkdir()
        (folder / shared).chmod(0o777)
    # ROOT first, and whatever PYTHONPATH already holds after it (a machine may keep packages there).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cases = _bad_inputs(folder)
    assert list(cases) == BAD_INPUTS
    runs = {}
    for name in AS_PROCESS:
        overrides, expected = cases[name]
        out_dir, run_dir = folder / name.replace(" ", "_"), folder / "hydra" / name.replace(" ", "_")
        command = [
            sys.executable,
            str(ROOT / "deploy.py"),
            *overrides,
            f"out_dir={out_dir}",
            f"hydra.run.dir={run_dir}",
        ]
        if name in UNPRIVILEGED:
            command, run_env = unprivileged(command), dict(env, HOME=str(folder / "home"))
        else:
            run_env = env
        before = _snapshot(out_dir)
        process = subprocess.Popen(command, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[name] = (process, expected, out_dir, before, run_dir)
    results = {}
    for name in BAD_INPUTS:
        if name in AS_PROCESS:
            continue
        overrides, expected = cases[name]
        out_dir = folder / name.replace(" ", "_")
        before = _snapshot(out_dir)
        settings = dict(arg.split("=", 1) for arg in overrides)
        results[name] = (*_deploy_in_process(settings, out_dir), expected, out_dir, before, None)
    for name, (process, expected, out_dir, before, run_dir) in runs.items():
        _, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stderr, expected, out_dir, before, run_dir)
    return folder, results


def _deploy_in_process(settings: dict[str, str], out_dir: Path) -> tuple[int, str]:
    """deploy.py's path for a run's own errors, in this process: the exit status and what stderr would say."""
    nested: dict = {"out_dir": str(out_dir)}
    for key, value in settings.items():
        group, _, name = key.rpartition(".")
        value = (
            [value[1:-1]] if value.startswith("[") else int(value) if value.isdigit() else value
        )  # as Hydra reads it
        (nested.setdefault(group, {}) if group else nested)[name] = value
    try:
        with exit_on_user_error():
            run_deploy(DeployConfig.from_dict(nested))
    except SystemExit as exit:
        return (1 if isinstance(exit.code, str) else exit.code), f"{exit.code}\n"
    return 0, ""


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_deploy_py_bad_input_is_one_line_and_exit_1(bad_runs, name):
    if name == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    folder, results = bad_runs
    returncode, stderr, expected, out_dir, before, run_dir = results[name]
    assert returncode == 1
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert all(part in stderr for part in expected), stderr
    assert _snapshot(out_dir) == before  # nothing written, nothing removed
    assert run_dir is None or not run_dir.exists()  # the run folder Hydra made for the run is gone again
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert not (folder / "pwned").exists()  # the pickle's payload never ran


def test_a_gpu_engine_whose_outputs_differ_is_refused_before_it_is_timed():
    from repblocks.deploy.engines.base import Runner, check_engine

    model = _trained_model()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        logits = model(images)

    def runner(scale):
        # Timed as onnxruntime returns it: a list of arrays.
        return Runner(lambda batch: logits * scale, lambda batch: lambda: [(logits * scale).numpy()])

    check_engine(model, runner(1.0), images, dtype="fp16", what="tensorrt fp16")
    with pytest.raises(ValueError, match="tensorrt fp16 does not reproduce the model"):
        check_engine(model, runner(1.1), images, dtype="fp16", what="tensorrt fp16")


def _keys(node: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a composed config's settings (a list's items are one setting)."""
    keys = []
    for key, value in node.items():
        keys += _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def test_deploy_help_lists_every_setting_of_every_quantize_option():
    from omegaconf import OmegaConf

    from repblocks.cli import check_overrides
    from repblocks.config_help import config_help

    config_dir = ROOT / "configs" / "deploy"
    text = config_help(config_dir, "deploy", usage="usage", shown_as="configs/deploy")
    for option in ("none", "int8"):
        composed = OmegaConf.to_container(check_overrides([f"quantize={option}"], config_dir, "deploy"))
        composed.pop("hydra")
        missing = [key for key in _keys(composed) if f" {key}=" not in text]
        assert not missing, (option, missing)  # before: quantize.engines, max_drop, ... were not listed
    assert (
        "with quantize=int8:\n        quantize.precision=int8\n        quantize.engines=[openvino, onnxruntime]" in text
    )
