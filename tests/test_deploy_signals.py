"""Ctrl-C and SIGTERM while deploy.py writes its ONNX export: one line, exit 130, and nothing left behind.

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
