"""Ctrl-C and SIGTERM while deploy.py writes its ONNX export: one line, exit 130, and nothing left behind;
while any engine exports: the same, and the previous output unchanged; and after OpenVINO has compiled
and dropped models, a signal is still a signal, not a SIGSEGV.

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

from repblocks.deploy.engines import ENGINES, by_format
from repblocks.deploy.outputs import STAGING_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
# Each deploy.py below first takes Ctrl-C as Python does by default. A process started in the
# background inherits SIGINT ignored and keeps ignoring it (deploy.py too, rightly). Set in the child's own code,
# not by a preexec function run between fork and exec: that is unsafe in the test process, where JAX's threads run.


# deploy.py, run as __main__, with torch.onnx.export that waits for a signal once it has exported.
HELD_EXPORT = """
import runpy, signal, sys, time, torch
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as by default (see the note at SIGNALS)
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


# deploy.py, run as __main__, held after its export stage (the time stage waits for the signal): a signal sent
# while an export runs may then land in the export or just after it, but never after the run has ended.
HELD_AFTER_EXPORT = """
import runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as by default (see the note at SIGNALS)
import repblocks.deploy.pipeline as pipeline
def hold(*args, **kwargs):
    time.sleep(600)  # the test's signal ends this, when it did not come during the export
pipeline.time_forms = hold
sys.argv[0] = {deploy!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
PREVIOUS = {"report.json": b'{"previous": true}', "model.onnx": b"the previous run's model"}  # a deploy output
# Every export format of the registry, each sent SIGTERM while it exports; and LiteRT sent Ctrl-C too:
# its conversion runs JAX, whose garbage-collection callback swallowed the interrupt (the run then finished
# with status 0 and replaced the previous output), and coremltools' imports turned it into an AttributeError.
EXPORTS = [(entry.format, "SIGTERM") for entry in ENGINES if entry.format] + [("litert", "SIGINT")]


@pytest.fixture(scope="module")
def interrupted_exports(tmp_path_factory):
    """``{(format, signal): (status, stderr, out_dir) or the reason it cannot export here}``, all runs at once."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    runs, results = {}, {}
    for fmt, name in EXPORTS:
        reason = by_format(fmt).load().missing()
        if reason:
            results[fmt, name] = reason
            continue
        folder = tmp_path_factory.mktemp(f"{fmt}-{name}")
        out_dir = folder / "out"
        out_dir.mkdir()
        for file, data in PREVIOUS.items():
            (out_dir / file).write_bytes(data)
        log = folder / "stdout"
        command = [sys.executable, "-c", HELD_AFTER_EXPORT.format(deploy=str(ROOT / "deploy.py"))]
        command += ["model=repvgg_tiny", f"export.formats=[{fmt}]", "bench.device=cpu", f"out_dir={out_dir}"]
        with open(log, "w") as stdout:
            process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
        runs[fmt, name] = (process, log, out_dir, time.monotonic())
    deadline, signalled = time.monotonic() + 600, set()
    while time.monotonic() < deadline and len(signalled) < len(runs):
        for key, (process, log, _, _) in runs.items():
            fmt, name = key
            if key not in signalled and (f"exporting {fmt}" in log.read_text() or process.poll() is not None):
                time.sleep(0.5)  # into the engine's conversion, for those that take that long
                process.send_signal(SIGNALS[name])
                signalled.add(key)
        time.sleep(0.05)
    for key, (process, _, out_dir, _) in runs.items():
        if process.poll() is None and key not in signalled:
            process.kill()  # never left running past the test
        _, stderr = process.communicate(timeout=300)
        results[key] = (process.returncode, stderr, out_dir)
    return results


@pytest.mark.slow  # a deploy.py per format, all at once, some converting for tens of seconds: minutes on 2 cores
@pytest.mark.parametrize(("fmt", "name"), EXPORTS, ids=[f"{fmt}-{name}" for fmt, name in EXPORTS])
def test_a_signal_during_any_export_stops_and_keeps_the_previous_output(interrupted_exports, fmt, name):
    result = interrupted_exports[fmt, name]
    if isinstance(result, str):
        pytest.skip(f"{fmt} does not export here: {result}")
    returncode, stderr, out_dir = result
    assert (returncode, stderr) == (130, "interrupted: stopped before finishing; no partial output was kept\n")
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == PREVIOUS  # nothing replaced, nothing left
    assert [path.name for path in out_dir.parent.iterdir() if path.name.startswith(".")] == []  # no staging folder
