"""Ctrl-C and SIGTERM while deploy.py writes its ONNX export: one line, exit 130, and nothing left behind.

Real signals to real deploy.py processes, sent while the export's temporary file exists. Both runs
start at once (most of each is torch's import time).
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


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    runs = {}
    for name in SIGNALS:
        folder = tmp_path_factory.mktemp(name)
        # out_dir is the run folder, as by default: Hydra makes it, deploy must remove it again.
        command = [sys.executable, str(ROOT / "deploy.py"), "model=repvgg_tiny", "export.formats=[onnx]"]
        command += ["bench.batch_sizes=[]", "bench.device=cpu", f"hydra.run.dir={folder / 'run'}"]
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )
        runs[name] = (process, folder)
    signalled = _signal_when_exporting(runs)
    results = {}
    for name, (process, folder) in runs.items():
        _, stderr = process.communicate(timeout=120)
        results[name] = (process.returncode, stderr, folder, signalled.get(name, []))
    return results


def _signal_when_exporting(runs: dict, timeout: float = 240.0) -> dict[str, list[Path]]:
    """Send each run its signal as soon as its export's temporary file is there; ``{name: the files seen}``."""
    signalled = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, (process, folder) in runs.items():
            if name in signalled or process.poll() is not None:
                continue
            if temporary := list(folder.glob(f".run.*{STAGING_SUFFIX}/.model.onnx.*.tmp")):
                process.send_signal(SIGNALS[name])
                signalled[name] = temporary
        if all(name in signalled or process.poll() is not None for name, (process, _) in runs.items()):
            break
        time.sleep(0.02)
    for process, _ in runs.values():
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
