"""Nothing leaves the machine: deploy.py and predict.py send no request, through a logging proxy, however long they run.

Tested the way onnxruntime's telemetry was found: every proxy variable of a child process points at a
proxy on 127.0.0.1 (``benchmarks/network_capture.py``) that records each request line and forwards
nothing, and the child's home is a fresh folder, where the engines would keep their device ids. Each
test also runs the same engines without repblocks' switch (the control), so a capture that sees
nothing because it cannot see is caught: the control must show what the switch stops.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.network_capture import CaptureProxy
from repblocks.deploy.engines import openvino
from tests.helpers import ROOT

OPENVINO = openvino.missing() is None
ORT_CACHE = Path(".cache", "Microsoft", "DeveloperTools", ".onnxruntime")  # onnxruntime's device id and event cache
# Where the engines keep what identifies this machine to their telemetry (OpenVINO: intel/openvino_ga_cid).
ID_FOLDERS = (ORT_CACHE, Path("intel"))

# An onnxruntime session, made as a user would (no repblocks), run a few times, held open for HOLD seconds.
RAW_ONNXRUNTIME = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from onnx import TensorProto, helper
    import onnxruntime

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    start = time.monotonic()
    while True:
        session.run(None, {"x": np.ones((1, 4), np.float32)})
        if time.monotonic() - start >= float(sys.argv[1]):
            break
        time.sleep(1)
    """
)
# What deploy's engines do, in one process that imported repblocks.deploy first: convert to OpenVINO
# (OpenVINO's conversion reports usage), load NNCF (it reports usage on import), open onnxruntime.
OPENVINO_AFTER_REPBLOCKS = textwrap.dedent(
    """
    import repblocks.deploy
    import nncf, openvino, torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    converted = openvino.convert_model(model, example_input=torch.randn(1, 3, 8, 8))
    openvino.Core().compile_model(converted, "CPU")(torch.randn(1, 3, 8, 8).numpy())
    """
)
ONNXRUNTIME_AFTER_REPBLOCKS = "import repblocks.deploy\n" + RAW_ONNXRUNTIME
# predict.py's own process: importing predict.py runs its switch; a Predictor held open, predicting now and then.
PREDICT_HELD = textwrap.dedent(
    """
    import sys, time
    import predict
    from repblocks.deploy import Predictor

    predictors = [Predictor(path) for path in sys.argv[3:]]
    start = time.monotonic()
    while time.monotonic() - start < float(sys.argv[1]):
        for predictor in predictors:
            predictor.predict([sys.argv[2]], topk=1)
        time.sleep(5)
    """
)


def _environment(proxy: CaptureProxy, home: Path) -> dict[str, str]:
    """The proxy in every proxy variable, a fresh home; nothing that would switch the engines' telemetry off by itself."""
    home.mkdir(parents=True, exist_ok=True)
    env = proxy.environment(dict(os.environ, HOME=str(home), PYTHONPATH=str(ROOT)))
    for name in ("ORT_DISABLE_TELEMETRY", "CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV"):
        env.pop(name, None)
    return env


def _run(code: str, *args: str, proxy: CaptureProxy, home: Path, timeout: float = 300) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=_environment(proxy, home),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _ids(home: Path) -> list[str]:
    """The files under ``home`` in the engines' id folders (other libraries' caches, matplotlib's say, are no concern)."""
    found = [path for folder in ID_FOLDERS for path in (home / folder).rglob("*") if path.is_file()]
    return sorted(str(path.relative_to(home)) for path in found)


# Records the switch as it was when onnxruntime is first imported, after importing deploy.py and predict.py.
SWITCH_AT_IMPORT = textwrap.dedent(
    """
    import os, sys
    seen = []
    sys.addaudithook(lambda event, args: event == "import" and args[0] == "onnxruntime"
                     and seen.append(os.environ.get("ORT_DISABLE_TELEMETRY")))
    import deploy, predict
    assert "onnxruntime" not in sys.modules and seen == [], seen  # neither loads an engine on import
    from repblocks.deploy.engines import engine
    engine("onnxruntime")  # the engine module, as deploy and predict load it
    import onnxruntime
    print(seen[0])
    """
)


def test_deploy_and_predict_set_the_switch_before_any_engine_is_imported():
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", SWITCH_AT_IMPORT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"


def test_onnxruntime_alone_keeps_a_device_id_which_the_capture_sees(tmp_path):
    """The control: without repblocks, onnxruntime's telemetry starts with its first session (skipped where it has none)."""
    with CaptureProxy() as proxy:
        _run(RAW_ONNXRUNTIME, "0", proxy=proxy, home=tmp_path)
    if not (tmp_path / ORT_CACHE).exists():
        pytest.skip("this onnxruntime build has no telemetry (it kept no device id): nothing for the switch to stop")
    assert any(name.endswith("deviceid") for name in _ids(tmp_path))


@pytest.mark.parametrize(
    "engines",
    [
        pytest.param(ONNXRUNTIME_AFTER_REPBLOCKS, id="onnxruntime"),
        pytest.param(
            OPENVINO_AFTER_REPBLOCKS,
            id="openvino-nncf",
            marks=[pytest.mark.slow, pytest.mark.skipif(not OPENVINO, reason="needs OpenVINO")],
        ),
    ],
)
def test_engines_after_repblocks_send_nothing_and_keep_no_id(tmp_path, engines):
    """The fast variant: an onnxruntime session (OpenVINO's conversion and NNCF: slower) in a repblocks process."""
    with CaptureProxy() as proxy:
        _run(engines, "0", proxy=proxy, home=tmp_path)
    assert proxy.requests == []
    assert _ids(tmp_path) == []  # no device id (onnxruntime's, OpenVINO's openvino_ga_cid), no event cache


@pytest.mark.slow
def test_deploy_and_a_predict_held_past_a_minute_send_nothing(tmp_path, image_file):
    """deploy.py, then predict.py's process holding onnxruntime and OpenVINO open 70 s (onnxruntime's telemetry
    sent 4 requests in that time, from 10 s on), beside the control: a bare onnxruntime session held as long."""
    formats = ["safetensors", "onnx", *(["openvino"] if OPENVINO else [])]
    with CaptureProxy() as control, CaptureProxy() as proxy:
        bare = subprocess.Popen(
            [sys.executable, "-c", RAW_ONNXRUNTIME, "70"], env=_environment(control, tmp_path / "bare"), cwd=ROOT
        )
        try:
            home = tmp_path / "home"
            deploy = [str(ROOT / "deploy.py"), "model=repvgg_tiny", f"out_dir={tmp_path / 'out'}", "bench.device=cpu"]
            deploy += ["bench.batch_sizes=[1]", "bench.rounds=2", f"export.formats=[{','.join(formats)}]"]
            deploy += [f"hydra.run.dir={tmp_path / 'run'}"]
            done = subprocess.run(
                [sys.executable, *deploy], env=_environment(proxy, home), capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stderr[-2000:]
            models = [str(tmp_path / "out" / name) for name in ("model.onnx", "model.xml")[: len(formats) - 1]]
            _run(PREDICT_HELD, "70", str(image_file), *models, proxy=proxy, home=home)
        finally:
            bare.wait(timeout=300)
    assert proxy.requests == []
    assert _ids(home) == []
    if (tmp_path / "bare" / ORT_CACHE).exists():  # this onnxruntime has telemetry: the control must have shown it
        assert any("events.data.microsoft.com" in request.line for request in control.requests), control.requests


@pytest.fixture
def image_file(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 120, 40)).save(path)
    return path
