"""Files from elsewhere are data, never instructions: a crafted checkpoint deletes, downloads, opens or allocates nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import repblocks
from repblocks import pretrained
from repblocks.deploy.engines import coreml, litert
from repblocks.deploy.sources import load_network
from repblocks.errors import UserError
from repblocks.numerics import randomize_bn_
from repblocks.run_checkpoint import build_run_model, read_run_checkpoint
from repblocks.train.callbacks import inside_folder
from tests.helpers import ROOT, compose_train
from train import train

needs_openvino = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("openvino", "nncf")),
    reason="needs pip install repblocks[openvino]",
)
TINY_RUN = ("model=repvgg_tiny", "data=fake", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")


def _model_checkpoint_state(checkpoint: dict) -> dict:
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("ModelCheckpoint")]
    return checkpoint["callbacks"][key]


def test_a_crafted_checkpoint_removes_nothing_outside_its_checkpoints_folder(tmp_path):
    run = tmp_path / "runs" / "run"
    train(compose_train(run, *TINY_RUN, "trainer.max_epochs=1"))
    last = run / "checkpoints" / "last.ckpt"
    victim = tmp_path / "victim"  # run/checkpoints/../../.. is tmp_path
    (victim / "inside").mkdir(parents=True)
    (victim / "inside" / "precious.txt").write_text("keep me")
    outside = f"{run / 'checkpoints'}/../../../victim"
    checkpoint = torch.load(last, weights_only=True)
    state = _model_checkpoint_state(checkpoint)
    state.update(
        dirpath=str(run / "checkpoints"),
        last_model_path=outside,
        kth_best_model_path=outside,
        best_k_models={outside: torch.tensor(0.0)},
    )
    torch.save(checkpoint, last)

    train(compose_train(run, *TINY_RUN, "trainer.max_epochs=2", f"ckpt_path={last}"))

    assert (victim / "inside" / "precious.txt").read_text() == "keep me"
    assert last.is_file()


def test_only_regular_files_inside_the_folder_count_as_its_own(tmp_path):
    folder, outside = tmp_path / "run" / "checkpoints", tmp_path / "elsewhere"
    folder.mkdir(parents=True)
    outside.mkdir()
    (folder / "last.ckpt").write_bytes(b"x")
    (outside / "other.ckpt").write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "link.ckpt").symlink_to(outside / "other.ckpt")
    assert inside_folder(folder / "last.ckpt", folder)
    assert not inside_folder(f"{folder}/../../elsewhere/other.ckpt", folder)  # ".." leaves it
    assert not inside_folder(f"{folder}/../checkpoints/../../elsewhere", folder)
    assert not inside_folder(folder / "sub", folder)  # a folder is never a checkpoint
    assert not inside_folder(folder / "link.ckpt", folder)  # a link out of it
    assert not inside_folder(folder, folder) and not inside_folder(folder / "missing.ckpt", folder)
    assert inside_folder("s3://bucket/run/checkpoints/last.ckpt", "s3://bucket/run/checkpoints")
    assert not inside_folder("s3://bucket/run/checkpoints/../../other", "s3://bucket/run/checkpoints")
    assert not inside_folder("s3://other/run/checkpoints/last.ckpt", "s3://bucket/run/checkpoints")


# --- What a file says to build: architecture arguments only, sizes in range ---------------------------------------


def _trained_model() -> torch.nn.Module:
    return randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10), seed=0).eval()


def _deploy_weights(path: Path, **metadata: str) -> Path:
    plain = repblocks.switch_to_deploy(_trained_model())
    good = {"model": "repvgg_tiny", "num_classes": "10", "in_chans": "3", "model_kwargs": "{}", "form": "deploy"}
    return repblocks.save_weights(plain, path, metadata={**good, **metadata})


def _run_checkpoint(path: Path, **hyper_parameters) -> Path:
    """A checkpoint as train.py writes them, its hyper-parameters changed by ``hyper_parameters``."""
    state = {f"model.{key}": value for key, value in _trained_model().state_dict().items()}
    saved = dict(model_name="repvgg_tiny", num_classes=10, in_chans=3, image_size=32, model_kwargs={}, data=None)
    torch.save({"state_dict": state, "hyper_parameters": {**saved, **hyper_parameters}}, path)
    return path


@pytest.fixture
def nothing_else_is_read(monkeypatch):
    """Fails the test when anything fetches timm's weights or reads a weights file other than the one given."""

    def fetch(name, **kwargs):
        raise AssertionError(f"a file made repblocks fetch timm's weights for {name}")

    monkeypatch.setattr(pretrained, "timm_state_dict", fetch)
    monkeypatch.setattr(
        pretrained, "read_state_dict", lambda source: pytest.fail(f"a file made repblocks read {source}")
    )


@pytest.mark.parametrize("value", [True, "/nonexistent/other.pth"])
@pytest.mark.parametrize("kind", ["checkpoint", "deploy metadata"])
def test_pretrained_in_a_file_neither_downloads_nor_opens_another_file(tmp_path, nothing_else_is_read, kind, value):
    if kind == "checkpoint":
        path = _run_checkpoint(tmp_path / "last.ckpt", model_kwargs={"pretrained": value, "drop_rate": 0.1})
    else:
        path = _deploy_weights(tmp_path / "model.safetensors", model_kwargs=json.dumps({"pretrained": value}))
    network = load_network(ckpt=str(path))
    assert network.model_kwargs == ({"drop_rate": 0.1} if kind == "checkpoint" else {})
    assert "pretrained" not in network.model_kwargs
    network.rebuild_deploy()  # what the exports rebuild takes the same checked arguments


@pytest.mark.parametrize(
    ("model_kwargs", "message"),
    [
        ({"features_only": True}, r"model_kwargs 'features_only' is not an architecture argument a file may set; "),
        (
            {"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
            r"model_kwargs 'pretrained_cfg_overlay' is not an architecture",
        ),
        ({"drop_rate": 2}, r"model_kwargs drop_rate=2 is invalid; it must be a number in \[0, 1\)"),
        ({"act": "os.system"}, r"model_kwargs act='os.system' is invalid; it must be null or one of relu, "),
        ([1], r"model_kwargs must be a mapping, got a list"),
        # A dict or a list where a name belongs: unhashable, once a TypeError traceback.
        ({"block_mode": {"offline": 1}}, r"model_kwargs block_mode=\{'offline': 1\} is invalid; it must be one of "),
        ({"block_mode": ["offline"]}, r"model_kwargs block_mode=\['offline'\] is invalid; it must be one of "),
        ({"act": ["relu"]}, r"model_kwargs act=\['relu'\] is invalid; it must be null or one of relu, "),
    ],
)
def test_only_architecture_arguments_are_read_from_a_file(tmp_path, model_kwargs, message):
    path = _run_checkpoint(tmp_path / "last.ckpt", model_kwargs=model_kwargs)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} hyper_parameters: {message}") as err:
        load_network(ckpt=str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [("num_classes", 1e11, "1 to 100000"), ("in_chans", 1e9, "1 to 1024"), ("image_size", 10**7, "1 to 4096")],
)
def test_sizes_in_a_checkpoint_are_checked_before_anything_is_allocated(tmp_path, field, value, allowed):
    path = _run_checkpoint(tmp_path / "last.ckpt", **{field: value})
    with pytest.raises(UserError) as err:
        load_network(ckpt=str(path))
    assert str(err.value) == (
        f"{path} hyper_parameters: {field}={value!r} is out of range; it must be an integer from {allowed}"
    )


@pytest.mark.parametrize(("field", "value"), [("num_classes", "100000000000"), ("in_chans", "1000000000")])
def test_sizes_in_deploy_metadata_are_checked_before_anything_is_allocated(tmp_path, field, value):
    path = _deploy_weights(tmp_path / "model.safetensors", **{field: value})
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {field}='{value}' is out of range; it must be"):
        load_network(ckpt=str(path))


def test_qat_init_builds_only_what_the_checkpoint_may_ask_for(tmp_path, nothing_else_is_read):
    path = _run_checkpoint(tmp_path / "last.ckpt", model_kwargs={"pretrained": True}, num_classes=10)
    run = read_run_checkpoint(path)  # what qat.init and train.py's resume read
    assert run.model_kwargs == {} and build_run_model(run).num_classes == 10


# --- Weights that are no weights, and other trainers' pickles -----------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("meta", "is a meta tensor (a shape without values): the file holds no weights"),
        ("complex", "holds complex64 values, not weights (floating-point or integer tensors)"),
        ("bool", "holds bool values, not weights (floating-point or integer tensors)"),
    ],
)
def test_meta_complex_and_bool_tensors_are_refused_as_they_are_read(tmp_path, kind, message):
    model = repblocks.create_model("repvgg_tiny", num_classes=10)
    weight = model.state_dict()["stem.conv_kxk.conv.weight"]  # of the model's own shape: only the kind is wrong
    tensor = {"meta": weight.to("meta"), "complex": weight.to(torch.complex64), "bool": weight > 0}[kind]
    state = {**model.state_dict(), "stem.conv_kxk.conv.weight": tensor}
    with pytest.raises(ValueError) as err:
        repblocks.load_weights(model, state)
    assert str(err.value) == f"the given mapping: stem.conv_kxk.conv.weight {message}"
    if kind != "meta":  # meta tensors have no bytes to save
        torch.save(state, tmp_path / "weights.pth")
        with pytest.raises(ValueError, match=rf"weights.pth: stem.conv_kxk.conv.weight {re.escape(message)}$"):
            repblocks.read_state_dict(tmp_path / "weights.pth")


YOLOV6_MODULES = ("yolov6", "yolov6.models", "yolov6.models.yolo")


@pytest.fixture
def fake_yolov6(tmp_path, monkeypatch):
    """A package named as YOLOv6's, whose ``Model`` is pickled whole, as meituan/YOLOv6's training saves it.

    meituan/YOLOv6@e86a483 yolov6/core/engine.py saves ``{'model': deepcopy(model).half(), 'ema':
    deepcopy(ema).half(), 'updates', 'optimizer', 'scheduler', 'epoch', 'results'}``.
    """
    site = tmp_path / "fake_site"
    _write_fake_yolov6(site)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in YOLOV6_MODULES:
        sys.modules.pop(name, None)


def test_a_yolov6_training_checkpoint_is_refused_with_the_command_that_extracts_its_weights(tmp_path, fake_yolov6):
    from yolov6.models.yolo import Model  # the fake one

    model, ema = Model(), Model()
    randomize_bn_(ema.backbone)
    path = tmp_path / "last_ckpt.pt"
    checkpoint = {"model": model.half(), "ema": ema.half(), "updates": 3, "epoch": 0, "results": (0.1, 0.2)}
    torch.save(checkpoint, path)
    for name in YOLOV6_MODULES:  # the reader has no YOLOv6: nothing of it may be imported to read the file
        del sys.modules[name]
    shutil.rmtree(fake_yolov6 / "yolov6")

    with pytest.raises(ValueError) as refusal:
        repblocks.read_state_dict(path)
    message = str(refusal.value)
    assert "\n" not in message and "a YOLOv6 training checkpoint" in message and "yolov6.models.yolo.Model" in message
    assert "yolov6" not in sys.modules
    command = shlex.split(message.split("installed: ", 1)[1].split(" then load ", 1)[0])
    assert command[:2] == ["python", "-c"] and "weights_only=False" in command[2]

    # Where the user trusts the file and has YOLOv6, the command gives the EMA weights, in float32.
    _write_fake_yolov6(fake_yolov6)
    exec(command[2], {})
    extracted = tmp_path / "last_ckpt_state_dict.pth"
    assert message.endswith(f"then load {extracted}")
    weights = repblocks.read_state_dict(extracted)
    expected = ema.float().state_dict()
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert weights["backbone.stem.conv_kxk.conv.weight"].dtype == torch.float32


def _write_fake_yolov6(site: Path) -> None:
    (site / "yolov6" / "models").mkdir(parents=True)
    (site / "yolov6" / "__init__.py").write_text("")
    (site / "yolov6" / "models" / "__init__.py").write_text("")
    (site / "yolov6" / "models" / "yolo.py").write_text(
        "import repblocks\nfrom torch import nn\n\n"
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.backbone = repblocks.create_model('repvgg_tiny', num_classes=10)\n"
    )


# --- Nothing leaves the machine -----------------------------------------------------------------------------------

# Runs a script as `python SCRIPT ARGS...` would, recording every network socket call (AF_UNIX ones, which
# multiprocessing and DataLoader workers use, are local) through an audit hook: a DNS lookup or a connect is
# recorded before the sandbox's missing network could make it fail.
_AUDITED_RUN = """
import os, runpy, socket, sys
log = open(os.environ["NETWORK_CALLS"], "a", buffering=1)
NETWORK_EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                  "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}
def audit(event, args):
    if event in NETWORK_EVENTS:
        if event.startswith("socket.") and isinstance(args[0], socket.socket) and args[0].family == socket.AF_UNIX:
            return
        log.write(f"{event} {args[1:] if isinstance(args[0], socket.socket) else args}\\n")
sys.addaudithook(audit)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _network_calls(tmp_path: Path, script: str, *args: str) -> list[str]:
    """What ``python script args...`` asked of the network (empty: nothing), after checking it succeeded."""
    calls = tmp_path / "network_calls.txt"
    calls.touch()
    env = {**os.environ, "NETWORK_CALLS": str(calls)}
    env.pop("NNCF_CI", None)  # NNCF's own switch: a user's machine does not set it
    # NNCF compiles a torch extension for fake quantization on first use (minutes on a small CPU, and a lock
    # shared by every run): here its build fails at once, in a folder of its own, and NNCF uses plain torch ops.
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), CXX="false")
    result = subprocess.run(
        [sys.executable, "-c", _AUDITED_RUN, str(ROOT / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return calls.read_text().splitlines()


@pytest.mark.slow
@needs_openvino
def test_deploy_py_with_openvino_opens_no_network_socket(tmp_path):
    ckpt = _run_checkpoint(tmp_path / "last.ckpt")
    settings = ["bench.device=cpu", "bench.batch_sizes=[1]", "bench.backends=[openvino]", "bench.rounds=2"]
    settings += ["bench.warmup=1", "export.formats=[openvino]", "verify.real_batches=0"]
    out = tmp_path / "out"
    calls = _network_calls(tmp_path, "deploy.py", f"ckpt={ckpt}", f"out_dir={out}", f"hydra.run.dir={out}", *settings)
    assert (out / "model.xml").is_file()  # OpenVINO did convert (which is when it reports usage)
    assert calls == []


@pytest.mark.slow
@pytest.mark.skipif(litert.missing() or coreml.missing(), reason=f"{litert.missing() or coreml.missing()}")
def test_deploy_py_with_litert_and_coreml_opens_no_network_socket(tmp_path):
    # litert_torch imports JAX (which looks for a TPU) and coremltools may import transformers and kagglehub.
    settings = ["model=repvgg_tiny", "bench.device=cpu", "bench.batch_sizes=[1]", "bench.backends=[litert]"]
    settings += ["bench.rounds=2", "bench.warmup=1", "bench.image_size=32", "export.formats=[litert,coreml]"]
    out = tmp_path / "out"
    calls = _network_calls(tmp_path, "deploy.py", f"out_dir={out}", f"hydra.run.dir={out}", *settings)
    assert (out / "model.tflite").is_file() and (out / "model_fp16.mlpackage").is_dir()  # both converters did run
    assert calls == []


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("executorch"), reason="needs pip install repblocks[executorch]")
def test_deploy_py_with_executorch_opens_no_network_socket(tmp_path):
    ckpt = _run_checkpoint(tmp_path / "last.ckpt")
    settings = ["bench.device=cpu", "bench.batch_sizes=[1]", "bench.backends=[executorch]", "bench.rounds=2"]
    settings += ["bench.warmup=1", "export.formats=[executorch]", "verify.real_batches=0"]
    out = tmp_path / "out"
    calls = _network_calls(tmp_path, "deploy.py", f"ckpt={ckpt}", f"out_dir={out}", f"hydra.run.dir={out}", *settings)
    assert (out / "model.pte").is_file()  # lowered, run back and timed by ExecuTorch
    assert calls == []


@pytest.mark.slow
@needs_openvino
def test_qat_opens_no_network_socket(tmp_path):
    data = {"_target_": "repblocks.datasets.DigitsData", "image_size": 32}
    state = {f"model.{k}": v for k, v in repblocks.create_model("qarepvgg_tiny", num_classes=10).state_dict().items()}
    saved = dict(model_name="qarepvgg_tiny", num_classes=10, in_chans=3, image_size=32, model_kwargs={}, data=data)
    torch.save({"state_dict": state, "hyper_parameters": saved}, tmp_path / "last.ckpt")
    overrides = ["model=qarepvgg_tiny", "+experiment=qat", f"qat.init={tmp_path / 'last.ckpt'}"]
    overrides += ["qat.calibration_images=8", "trainer.fast_dev_run=true", "trainer.accelerator=cpu", "logger=csv"]
    overrides += ["callbacks.progress_bar=null", f"hydra.run.dir={tmp_path / 'run'}"]
    assert _network_calls(tmp_path, "train.py", *overrides) == []


def test_telemetry_is_cut_off_where_repblocks_runs():
    code = (
        "import sys, repblocks.deploy, repblocks.train, nncf; from nncf.telemetry import wrapper; "
        "print(sys.modules['openvino_telemetry'], type(wrapper.telemetry).__name__)"
    )
    if not all(importlib.util.find_spec(name) for name in ("openvino", "nncf")):
        code = "import sys, repblocks.deploy, repblocks.train; print(sys.modules['openvino_telemetry'], 'MagicMock')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["None", "MagicMock"], result.stderr[-2000:]
