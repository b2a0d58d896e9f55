"""The inference runtimes' own lines stay off the user's stderr, unless REPBLOCKS_RUNTIME_LOGS=1 asks for them.

Real deploy.py and predict.py processes on the tiny model, through the engines whose C++ writes
straight to file descriptor 2: LiteRT ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU."),
TensorFlow under litert-torch (absl's and oneDNN's notes) and ExecuTorch (its cpuinfo and threadpool
lines). All the processes of a step start at once (most of each is its imports).
"""

import os
import subprocess
import sys

import pytest

from repblocks.deploy.engines import engine
from repblocks.deploy.engines.base import RUNTIME_LOGS, runtime_output
from tests.helpers import ROOT

# What each runtime writes from C++, found in its own words on stderr.
RUNTIME_LINES = {
    "litert": "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "absl": "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "onednn": "oneDNN custom operations are on",
    "executorch": "[cpuinfo_utils.cpp:",
}
FORMATS = ("litert", "executorch")


def _start(script: str, *settings: str, cwd, verbose: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(RUNTIME_LOGS, None)
    if verbose:
        env[RUNTIME_LOGS] = "1"
    command = [sys.executable, str(ROOT / script), *settings]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=900)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """deploy.py to .tflite and .pte quietly and to .tflite verbosely; then predict.py on each file, both ways."""
    for name in FORMATS:
        if engine(name).missing():
            pytest.skip(f"{name}: {engine(name).missing()}")
    folder = tmp_path_factory.mktemp("runtime_lines")
    (folder / "image.png").write_bytes(_png())
    deploy = ["model=repvgg_tiny", "bench.batch_sizes=[]", "bench.device=cpu"]
    started = {
        "deploy": _start("deploy.py", *deploy, f"export.formats=[{','.join(FORMATS)}]", "out_dir=quiet", cwd=folder),
        "deploy verbose": _start(
            "deploy.py", *deploy, "export.formats=[litert]", "out_dir=verbose", cwd=folder, verbose=True
        ),
    }
    results = {name: _finish(process) for name, process in started.items()}
    started = {}
    for verbose in (False, True):
        for file in ("model.tflite", "model.pte"):
            name = f"predict {file}{' verbose' if verbose else ''}"
            settings = [f"model=quiet/{file}", "images=image.png", "topk=1"]
            started[name] = _start("predict.py", *settings, cwd=folder, verbose=verbose)
    results |= {name: _finish(process) for name, process in started.items()}
    return results


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow  # two deploy.py runs that convert to LiteRT and ExecuTorch, four predict.py runs: ~1 min on 2 cores
@pytest.mark.parametrize("run", ["deploy", "predict model.tflite", "predict model.pte"])
def test_the_runtimes_lines_stay_off_stderr(runs, run):
    returncode, stdout, stderr = runs[run]
    assert returncode == 0, stderr[-3000:]
    shown = [line for line in RUNTIME_LINES.values() if line in stderr]
    assert not shown, stderr[-3000:]
    if run == "deploy":  # our log says what happened, in our words
        assert "exporting litert" in stdout and "LiteRT reading model.tflite matches the model" in stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ("deploy verbose", ["litert", "absl", "onednn"]),
        ("predict model.tflite verbose", ["litert"]),
        ("predict model.pte verbose", ["executorch"]),
    ],
)
def test_runtime_logs_1_lets_them_through(runs, run, expected):
    returncode, _, stderr = runs[run]
    assert returncode == 0, stderr[-3000:]
    for name in expected:
        assert RUNTIME_LINES[name] in stderr, (name, stderr[-3000:])


# A child process that writes to stderr from C (past sys.stderr) inside runtime_output, then fails or not; then
# the same with REPBLOCKS_RUNTIME_LOGS=1. Its log's warnings go to stdout ("log: ..."), a logger of its own to stderr.
WRITES_FROM_C = """
import ctypes, logging, os, sys
from repblocks.deploy.engines.base import RUNTIME_LOGS, runtime_output
logging.basicConfig(level=logging.WARNING, format="log: %(message)s", stream=sys.stdout)
ours = logging.getLogger("ours")
ours.addHandler(logging.StreamHandler())  # on stderr
ours.propagate = False
libc = ctypes.CDLL(None)
for shown in ("0", "1"):
    os.environ[RUNTIME_LOGS] = shown
    with runtime_output("the step"):
        libc.write(2, b"a C++ note\\n", 11)
        ours.warning("our own line")
    sys.stderr.write("after\\n")
    try:
        with runtime_output("the failing step"):
            libc.write(2, b"why it failed\\n", 14)
            raise ValueError("failed")
    except ValueError:
        sys.stderr.write("caught\\n")
    sys.stderr.flush()
    sys.stdout.flush()
"""


def test_runtime_output_keeps_fd_2_aside_but_not_our_log_and_logs_it_when_the_call_fails():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", WRITES_FROM_C], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    quiet = "our own line\nafter\ncaught\n"
    shown = "a C++ note\nour own line\nafter\nwhy it failed\ncaught\n"
    assert done.stderr == quiet + shown
    assert done.stdout == "log: the failing step failed; what its runtimes wrote to stderr:\nwhy it failed\n"


def test_runtime_output_restores_fd_2_on_an_interrupt():
    before = os.fstat(2)
    with pytest.raises(KeyboardInterrupt), runtime_output("the step"):
        raise KeyboardInterrupt
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
