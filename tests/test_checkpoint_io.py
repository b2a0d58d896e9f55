"""Checkpoints written atomically: a process killed while writing leaves the previous checkpoint, or none."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from repblocks.train.checkpoint_io import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]

# Saves checkpoint 1 (unless told not to), then checkpoint 2 with every file opened for writing in
# the checkpoint folder cut short: after LIMIT bytes the process SIGKILLs itself, mid-write. The
# wrapped file has no fileno(), so a copy into the folder (shutil's) goes through write() too.
KILLED_WHILE_SAVING = """
import builtins, os, signal, sys
from pathlib import Path
import torch
from repblocks.train.checkpoint_io import AtomicCheckpointIO

folder, save_first, limit = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
checkpoint_io = AtomicCheckpointIO()
if save_first:
    checkpoint_io.save_checkpoint({"step": 1, "weights": torch.zeros(10)}, folder / "last.ckpt")

class KilledMidWrite:
    def __init__(self, handle):
        self.handle, self.written = handle, 0
    def write(self, data):
        data = memoryview(data).cast("B")
        if self.written + len(data) >= limit:
            self.handle.write(data[: limit - self.written])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.written += len(data)
        return self.handle.write(data)
    def flush(self):
        self.handle.flush()
    def close(self):
        self.handle.close()
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()

real_open = builtins.open
def open_cut_short(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    writing = any(flag in mode for flag in "wax+")
    return KilledMidWrite(handle) if writing and Path(file).parent == folder else handle
builtins.open = open_cut_short
checkpoint_io.save_checkpoint({"step": 2, "weights": torch.ones(100_000)}, folder / "last.ckpt")
print("not killed: no byte of the checkpoint was written in its folder")
"""


def test_kill_while_saving_keeps_the_previous_checkpoint_or_none(tmp_path):
    # $TMPDIR elsewhere, as on machines where it is another file system: nothing may be written there.
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    runs = {}
    for name, save_first in (("previous", "1"), ("first", "0")):
        folder = tmp_path / name / "checkpoints"
        folder.mkdir(parents=True)
        command = [sys.executable, "-c", KILLED_WHILE_SAVING, str(folder), save_first, "50000"]
        runs[name] = (folder, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for name, (folder, process) in runs.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == -signal.SIGKILL, (stdout + stderr).decode()
        visible = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
        if name == "previous":
            assert visible == ["last.ckpt"]
            checkpoint = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
            assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.zeros(10))
        else:
            assert visible == []
        # What the kill left: one hidden temporary file, cut at the limit, never under the final name ...
        (leftover,) = folder.glob(".last.ckpt.*.tmp")
        assert leftover.stat().st_size == 50000
        # ... and the next save of that name removes it.
        AtomicCheckpointIO().save_checkpoint({"step": 3}, folder / "last.ckpt")
        assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt"]


def test_checkpoint_round_trip_leaves_no_temporary_file(tmp_path):
    checkpoint_io = AtomicCheckpointIO()
    path = tmp_path / "new" / "epoch=000-val_acc=0.5000.ckpt"
    checkpoint_io.save_checkpoint({"step": 3, "weights": torch.arange(4.0)}, path)
    loaded = checkpoint_io.load_checkpoint(path, weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == [path.name]
