"""Ctrl-C and SIGTERM while deploy.py writes its ONNX export: one line, exit 130, and nothing left behind;
and after OpenVINO has compiled and dropped models, a signal is still a signal, not a SIGSEGV.

Real signals to real deploy.py processes, sent while the export's temporary file exists. Each
deploy.py holds still inside its export (its ``torch.onnx.export`` waits once it has run, and says
so in a file of the test's) until the signal comes: no race between the signal and the export.
Both runs start at once (most of each is torch's import time).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repblocks.deploy.outputs import STAGING_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def _default_sigint() -> None:
    # A process started in the background inherits SIGINT ignored, and Python then keeps ignoring it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# deploy.py, run as __main__, with torch.onnx.export that waits for a signal once it has exported.
HELD_EXPORT = """
import runpy, sys, time, torch
exported, export = sys.argv.pop(1), torch.onnx.export
def export_then_wait(*args, **kwargs):
    program = export(*args, **kwargs)
    open(exported, "w").close()
    time.sleep(600)  # the test's signal ends this
    return program
torch.onnx.export = export_then_wait
sys.argv[0] = {deploy!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    runs = {}
    for name in SIGNALS:
        folder = tmp_path_factory.mktemp(name)
        exported = tmp_path_factory.mktemp(f"{name}-exported") / "exported"
        # out_dir is the run folder, as by default: Hydra makes it, deploy must remove it again.
        command = [sys.executable, "-c", HELD_EXPORT.format(deploy=str(ROOT / "deploy.py")), str(exported)]
        command += ["model=repvgg_tiny", "export.formats=[onnx]"]
        command += ["bench.batch_sizes=[]", "bench.device=cpu", f"hydra.run.dir={folder / 'run'}"]
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )
        runs[name] = (process, folder, exported)
    signalled = _signal_when_exporting(runs)
    results = {}
    for name, (process, folder, _) in runs.items():
        _, stderr = process.communicate(timeout=120)
        results[name] = (process.returncode, stderr, folder, signalled.get(name, []))
    return results


def _signal_when_exporting(runs: dict, timeout: float = 300.0) -> dict[str, list[Path]]:
    """Send each run its signal once it holds inside its export; ``{name: the temporary files seen then}``.

    A run holds until it is signalled, so when it is seen waiting its temporary file is there. The
    timeout only keeps a broken run from hanging the tests.
    """
    signalled = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(signalled) < len(runs):
        for name, (process, folder, exported) in runs.items():
            if name not in signalled and (exported.exists() or process.poll() is not None):
                signalled[name] = list(folder.glob(f".run.*{STAGING_SUFFIX}/.model.onnx.*.tmp"))
                process.send_signal(SIGNALS[name])
        time.sleep(0.05)
    for process, _, _ in runs.values():
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()  # never left running past the test
    return signalled


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_signal_during_the_export_leaves_nothing(interrupted, name):
    returncode, stderr, folder, temporary = interrupted[name]
    assert temporary  # the signal came while the export was being written
    assert returncode == 130
    assert stderr == "interrupted: stopped before finishing; no partial output was kept\n"
    assert list(folder.iterdir()) == []  # no temporary file, no staging folder, no run folder


# OpenVINO models compiled through our engine as deploy compiles them (one kept, a file checked by a plain
# compile, the file compiled again) and dropped first-to-last, then what a later signal meets: torch's SIGCHLD
# handler (any DataLoader with workers sets it) and Python's Ctrl-C. With a Core per compile, the thread was left
# on a freed signal stack and the first signal killed the process with SIGSEGV.
AFTER_OPENVINO = """
import gc, signal, subprocess, sys, torch
from repblocks.deploy.engines import openvino
from repblocks.int8.conversion import compile_model, to_openvino
model, example, path = torch.nn.Conv2d(3, 4, 3).eval(), torch.randn(2, 3, 8, 8), sys.argv[1]
converted = to_openvino(model, example)
openvino.save(converted, path)
first = compile_model(converted)
openvino.plain_runtime(path, model, example)
second = compile_model(openvino.load(path))
del first
gc.collect()
del second
gc.collect()
signal.signal(signal.SIGCHLD, lambda *args: None)
subprocess.run([sys.executable, "-c", "pass"], check=True)  # its end sends SIGCHLD
try:
    signal.raise_signal(signal.SIGINT)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_signals_after_openvino_compiled_and_dropped_models_are_handled(tmp_path):
    pytest.importorskip("openvino")
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", AFTER_OPENVINO, str(tmp_path / "model.xml")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "interrupted"
