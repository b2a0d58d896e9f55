"""Threads and workers for a shared machine, and progress a log file shows: train.py and deploy.py.

Every command checks its threads setting and ``OMP_NUM_THREADS`` the same way, before any work.
"""

import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from repblocks import bench, threads
from repblocks.datasets import ImageFolderData
from repblocks.threads import ThreadChoice, check_threads, choose_threads, loader_workers, max_threads, use_threads
from repblocks.train import progress
from tests.helpers import ROOT, compose_train


@pytest.fixture
def four_cores_one_busy(monkeypatch):
    """4 cores, other processes keep 1.3 of them busy (as /proc/stat would say); OMP_NUM_THREADS unset."""
    monkeypatch.setattr(bench, "_machine_busy_seconds", lambda: bench._own_busy_seconds() + 1.3 * time.perf_counter())
    monkeypatch.setattr(bench, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_threads_are_the_cores_other_processes_leave_free(four_cores_one_busy):
    choice = choose_threads(None, setting="threads")
    assert (choice.threads, choice.cores, choice.free) == (3, 4, 3)  # 4 - 1.3, rounded
    assert choice.note.startswith("3 threads: 4 cores, 1.") and "threads=N to choose" in choice.note
    shared = choose_threads(None, processes=2)  # DDP on the CPU: each process its share
    assert shared.threads == 1 and loader_workers(None, shared) == 0


def test_a_setting_then_omp_num_threads_choose_before_any_measurement(four_cores_one_busy, monkeypatch):
    monkeypatch.setattr(bench, "_machine_busy_seconds", lambda: pytest.fail("measured although told"))
    assert choose_threads(2, setting="bench.threads").note == "2 threads (bench.threads)"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = choose_threads(None)
    assert choice.threads == 1 and choice.note.startswith("1 thread (OMP_NUM_THREADS")
    assert choose_threads(5).threads == 5  # the setting wins over the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # nested regions: the outer count
    assert choose_threads(None).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match=r"^OMP_NUM_THREADS must be a whole number of threads from 1 to \d+ .*'many'$"):
        choose_threads(None)


@pytest.mark.parametrize("free,expected", [(1, 0), (2, 1), (4, 3), (64, 8)])
def test_loader_workers_fit_beside_the_training_loop(free, expected):
    choice = ThreadChoice(free, 64, 64.0 - free, "PASSIVE", free=free)
    assert loader_workers(None, choice) == expected
    assert loader_workers(6, choice) == 6  # a number set by hand is kept


def test_a_data_set_without_a_worker_count_fits_its_loaders_to_the_free_cores(tmp_path, four_cores_one_busy):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
    data = ImageFolderData(root=tmp_path, image_size=32, num_workers=None)
    assert data.num_workers is None  # chosen when a loader is first needed, not when the config is read
    data.val_set = [torch.zeros(3, 32, 32)]  # any dataset: no image needs to be read
    assert data.val_dataloader().num_workers == 2 and data.num_workers == 2  # 3 cores free, one for the loop
    with pytest.raises(ValueError, match=r"^data.num_workers must be at least 0"):
        ImageFolderData(root=tmp_path, image_size=32, num_workers=-1)


def test_use_threads_sets_and_restores_torchs_threads():
    before = torch.get_num_threads()
    with use_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_without_a_terminal_the_bar_gives_way_to_a_line_per_epoch(tmp_path, monkeypatch, caplog):
    from lightning.pytorch.callbacks import RichProgressBar

    callbacks, settings = progress.progress_callbacks([RichProgressBar(), "other"], terminal=False)
    assert callbacks[0] == "other" and isinstance(callbacks[1], progress.EpochLines)
    assert settings == {"enable_progress_bar": False}  # else Lightning adds its own bar back
    assert progress.progress_callbacks(["bar"], terminal=True) == (["bar"], {})

    from train import train

    monkeypatch.setattr(progress, "output_is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="repblocks.train.progress"):
        overrides = [
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=1",
            "callbacks.deploy_check=null",
            "threads=1",
        ]
        train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", *overrides))
    lines = [r.getMessage() for r in caplog.records if r.name == "repblocks.train.progress"]
    assert len(lines) == 2, lines
    pattern = r"^epoch {}/2: train loss \d+\.\d{{3}}, val loss \d+\.\d{{3}}, val acc \d+\.\d{{2}}%, \d+\.\d s$"
    assert all(re.match(pattern.format(epoch), line) for epoch, line in zip((1, 2), lines, strict=True)), lines


def _run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_WAIT_POLICY", None)  # the scripts' own default
    command = [sys.executable, str(ROOT / script), *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a train.py process: 10 s on an idle machine
def test_train_py_to_a_log_prints_its_threads_once_and_a_line_per_epoch(tmp_path):
    done = _run("train.py", "model=repvgg_tiny", "data=fake", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert len(re.findall(r"\d+ threads?[:(].*OMP_WAIT_POLICY PASSIVE", output)) == 1, output[-3000:]
    assert re.search(r"epoch 1/2: train loss .*, val acc .*%, \d+\.\d s", output), output[-3000:]
    assert re.search(r"epoch 2/2: train loss .*, val acc .*%, \d+\.\d s", output), output[-3000:]
    assert not re.search(r"^Epoch \d", output, re.MULTILINE)  # no frame of a progress bar


@pytest.mark.slow  # a deploy.py process that exports and times: 20 s on an idle machine
def test_deploy_py_to_a_log_prints_a_line_per_stage_and_what_it_times(tmp_path):
    settings = ["bench.device=cpu", "bench.batch_sizes=[1,2]", "bench.backends=[eager]", "bench.rounds=3"]
    done = _run(
        "deploy.py", "model=repvgg_tiny", f"out_dir={tmp_path / 'out'}", "export.formats=[safetensors]", *settings
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    for stage in ("load", "convert", "verify", "export", "time", "report"):
        assert re.search(rf"\] - {stage} done in \d+\.\d s", output), (stage, output[-3000:])
    assert "time: 2 runners x batch sizes [1, 2] x 3 rounds after 2 warm-up calls, at 3x" in output
    assert re.search(r"timing 2 candidates x 3 rounds: about \d+\.\d s", output)


def test_a_threads_setting_is_a_whole_number_from_1_to_4_per_cpu(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit = max_threads()
    assert limit == 4 * os.cpu_count()
    assert check_threads(None) is None and check_threads("") is None  # unset: choose
    assert check_threads(2) == 2 and check_threads(" 3 ") == 3 and check_threads(limit) == limit
    for value in (0, -1, limit + 1, 1_000_000, "abc", "1.5", 1.5, True, "\u0663"):  # "٣": a digit, not a number
        with pytest.raises(ValueError, match=rf"^bench.threads must be a whole number of threads from 1 to {limit} "):
            check_threads(value, setting="bench.threads")
    for environment in ("abc", "0", str(limit + 1), "2,abc"):  # checked even when the setting decides
        monkeypatch.setenv("OMP_NUM_THREADS", environment)
        with pytest.raises(ValueError, match=rf"^OMP_NUM_THREADS must be .* from 1 to {limit} .*got '{environment}'$"):
            check_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")
    assert check_threads(None) is None and choose_threads(None).threads == 2


# Each command with each bad count: (script, its settings before the threads one, the threads setting's name).
COMMANDS = {
    "train.py": (["model=repvgg_tiny", "data=fake"], "threads"),
    "deploy.py": (["model=repvgg_tiny", "bench.device=cpu"], "bench.threads"),
    "predict.py": (["model=model.onnx", "images=images"], "threads"),  # neither exists: the count is checked first
}
BAD_COUNTS = {  # id: (the setting's value or None, OMP_NUM_THREADS or None)
    "threads=1000000": ("1000000", None),  # train.py: SIGSEGV; predict.py: gigabytes of threads
    "threads=-1": ("-1", None),
    "threads=abc": ("abc", None),
    "OMP_NUM_THREADS=abc": (None, "abc"),
    "OMP_NUM_THREADS=1000000": (None, "1000000"),
}


@pytest.fixture(scope="module")
def refused_counts(tmp_path_factory):
    """Every command with every bad count, all started at once (most of each is its imports); their results."""
    runs = {}
    for script, (settings, name) in COMMANDS.items():
        for case, (value, environment) in BAD_COUNTS.items():
            folder = tmp_path_factory.mktemp(f"{script}-{case}".replace("=", "-"))
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.pop("OMP_NUM_THREADS", None)
            if environment is not None:
                env["OMP_NUM_THREADS"] = environment
            command = [sys.executable, str(ROOT / script), *settings]
            command += [f"{name}={value}"] if value is not None else []
            command += [] if script == "predict.py" else [f"hydra.run.dir={folder / 'run'}"]
            runs[script, case] = (subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True), folder)  # fmt: skip
    return {
        key: (*process.communicate(timeout=600), process.returncode, folder) for key, (process, folder) in runs.items()
    }


@pytest.mark.slow  # 15 processes that import torch (train.py: Lightning too): about 40 s on 2 cores
@pytest.mark.parametrize("case", list(BAD_COUNTS))
@pytest.mark.parametrize("script", list(COMMANDS))
def test_every_command_refuses_a_bad_thread_count_in_one_line_before_any_work(refused_counts, script, case):
    stdout, stderr, returncode, folder = refused_counts[script, case]
    value, environment = BAD_COUNTS[case]
    name = COMMANDS[script][1] if value is not None else "OMP_NUM_THREADS"
    shown = repr(value if value is not None else environment)  # as typed, whichever command read it
    expected = (
        f"error: {name} must be a whole number of threads from 1 to {max_threads()} (4 per CPU of this machine), got "
    )
    assert (returncode, stderr) == (1, f"{expected}{shown}\n"), (returncode, stderr[-2000:])
    assert stdout == ""  # nothing logged: no stage ran
    assert list(folder.iterdir()) == []  # no run folder, no CSV
