"""The README's code, run as written: its Python blocks as one session, its train.py/deploy.py command lines.

How a block is chosen, and what the test adds (nothing else is changed):

- Every fenced ``python`` block runs, in README order, in one namespace (the README says they read as
  one session), in a temporary working folder holding the files the blocks name (``A0-train.pth``),
  with the network blocked. ``pretrained=True`` reads timm's weights from a Hugging Face cache the test
  fills with random weights; torchvision's ``weights="DEFAULT"`` reads a torch hub folder filled the same
  way. A block preceded by ``<!-- readme-test: skip: REASON -->`` is skipped and listed with its reason.
- Every line of a ``bash`` block that runs ``python train.py`` or ``python deploy.py`` runs in the same
  kind of folder, with :data:`TINY_TRAIN` / :data:`TINY_DEPLOY` appended (Hydra takes the last value of a
  key, so the README's own settings stay on the line and only the length shrinks) and ``hydra.run.dir``
  naming a folder, so the README's placeholders find it: ``outputs/train/RUN`` is the first train.py
  line's run, ``outputs/train/...`` the run of the line before, ``outputs/deploy/RUN`` the first deploy.py
  line's output. Every other line is in :data:`NOT_RUN` with the reason; a new README line that is in
  neither fails :func:`test_every_readme_command_is_run_or_skipped_with_a_reason`.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import repblocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")

TINY_TRAIN = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
TINY_DEPLOY = ["bench.batch_sizes=[]", "export.formats=[safetensors]", "verify.real_batches=1"]
# Lines the test does not run, by what they start with or hold, and why.
NOT_RUN = {
    "make ": "builds .venv and runs the whole demo or suite (minutes); CI runs them",
    "pip install": "installs packages from the network",
    "torchrun ": "several machines (tests/test_train.py runs DDP on CPU)",
    "srun ": "a SLURM cluster",
    "python train.py trainer=ddp": "4 processes on one machine (tests/test_train.py runs DDP on CPU)",
    "python deploy.py +experiment=paper_speed": "times 12 large models at batch 128 (make paper-speed)",
    "python predict.py": "needs images of your own (cat.jpg, photos/); tests/test_predict.py runs it on a deploy run's images",
    "quantize=int8": "NNCF calibration and the accuracy gate take minutes on 2 cores (tests/test_quantize.py)",
}


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    code: str
    marker: str  # what the <!-- readme-test: ... --> line before it says, or ""


def readme_blocks() -> list[Block]:
    """The README's fenced code blocks, each with the readme-test marker on the line before it."""
    lines = README.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        marker = _MARKER.match(lines[index - 1]) if index else None
        blocks.append(Block(fence[1], index + 1, "\n".join(lines[index + 1 : end]), marker[1] if marker else ""))
        index = end + 1
    return blocks


def readme_commands() -> list[tuple[int, str]]:
    """(README line, command) for every command line of the bash blocks."""
    return [
        (block.line + offset + 1, line.strip())
        for block in readme_blocks()
        if block.language == "bash"
        for offset, line in enumerate(block.code.splitlines())
        if line.strip() and not line.strip().startswith("#")
    ]


def why_not_run(command: str) -> str | None:
    return next((reason for key, reason in NOT_RUN.items() if command.startswith(key) or key in command), None)


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    blocks = readme_blocks()
    assert {block.language for block in blocks} <= {"bash", "python", "text"}, (
        "a block without a language is not tested"
    )
    for block in blocks:
        assert block.marker == "" or block.marker.startswith("skip: "), f"README line {block.line}: {block.marker}"
    for line, command in readme_commands():
        runnable = command.startswith(("python train.py", "python deploy.py"))
        assert runnable or why_not_run(command), f"README line {line} is neither run nor skipped: {command}"
    assert any(command.startswith("python train.py") and not why_not_run(command) for _, command in readme_commands())


# --- the Python blocks ---


def _fill_hub_cache(cache: Path, name: str) -> None:
    """timm's download cache for ``name``'s published weights, holding random weights of timm's model."""
    import safetensors.torch
    import timm

    revision = "0" * 40
    repo = cache / f"models--{repblocks.get_pretrained_cfg(name)['hf_hub_id'].replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    tensors = {key: value.contiguous() for key, value in timm.create_model(name).state_dict().items()}
    safetensors.torch.save_file(tensors, repo / "snapshots" / revision / "model.safetensors")


@pytest.mark.slow  # builds RepVGG-A0 several times, ResNet-50 and ResNet-18
def test_readme_python_blocks_run_as_one_session(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    torchvision = pytest.importorskip("torchvision")

    def refuse(*args, **kwargs):
        raise OSError("the network is blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fill_hub_cache(tmp_path / "hub", "repvgg_a0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth")
    work = tmp_path / "work"
    work.mkdir()
    torch.save(repblocks.create_model("repvgg_a0").state_dict(), work / "A0-train.pth")
    monkeypatch.chdir(work)

    namespace: dict = {"__name__": "readme"}
    ran = 0
    for block in readme_blocks():
        if block.language != "python" or block.marker.startswith("skip: "):
            continue
        where = f"README.md, block at line {block.line}"
        if ran == 0:  # the first block is the core's API: up to its `import torchvision`, it runs without torchvision
            core, _, rest = block.code.partition("\nimport torchvision")
            with monkeypatch.context() as blocked:
                blocked.setitem(sys.modules, "torchvision", None)  # importing it now raises ImportError
                exec(compile(core, where, "exec"), namespace)  # noqa: S102  (the README's own code)
            assert rest, "the API block says where torchvision comes in"
            exec(compile("\n" * core.count("\n") + "\nimport torchvision" + rest, where, "exec"), namespace)  # noqa: S102
        else:
            exec(compile(block.code, where, "exec"), namespace)  # noqa: S102  (the README's own code)
        ran += 1
    assert ran >= 5
    assert namespace["again"].stem.deploy, "a deploy-form file builds the deploy form"
    assert namespace["backbone"].feature_info.channels() == [96, 192, 1280]


# --- the command lines ---


def _with_settings(command: str, index: int, runs: dict[str, str]) -> list[str]:
    """The command as argv, placeholders pointed at earlier runs, the tiny settings and a run folder appended."""
    if "outputs/train/..." in command:
        command = command.replace("outputs/train/...", runs["previous train"])
    argv = shlex.split(command, comments=True)
    assert argv[0] == "python", command
    script = argv[1]
    argv = [sys.executable, str(ROOT / script), *argv[2:]]
    if script == "train.py":
        run = "outputs/train/RUN" if "first train" not in runs else f"outputs/train/line{index}"
        runs.setdefault("first train", run)
        runs["previous train"] = run
        resumed = any(arg.startswith("ckpt_path=") for arg in argv)
        tiny = [*TINY_TRAIN, "trainer.max_epochs=2"] if resumed else TINY_TRAIN  # one epoch more than it had
        return [*argv, *tiny, f"hydra.run.dir={run}"]
    run = "outputs/deploy/RUN" if "first deploy" not in runs else f"outputs/deploy/line{index}"
    runs.setdefault("first deploy", run)
    return [*argv, *TINY_DEPLOY, f"hydra.run.dir={run}"]


@pytest.mark.slow  # a dozen train.py and deploy.py processes of a few seconds each
def test_readme_command_lines_run(tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    torch.save(repblocks.create_model("repvgg_a0").state_dict(), work / "RepVGG-A0-train.pth")
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18().state_dict(), work / "resnet18-f37072fd.pth")
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs: dict[str, str] = {}
    ran, failures = [], []
    for index, (line, command) in enumerate(readme_commands()):
        if why_not_run(command) or not command.startswith(("python train.py", "python deploy.py")):
            continue
        argv = _with_settings(command, index, runs)
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        ran.append(line)
        if "data.root=~/data" in command:  # no CIFAR-10 here: the home folder is read, and its absence said in one line
            expected = f"error: data.root: CIFAR-10 (cifar-10-batches-py) not found at {home}/data/cifar-10-batches-py"
            if result.returncode != 1 or not result.stderr.strip().splitlines()[-1].startswith(expected):
                failures.append(f"README line {line}: {command}\n{result.stderr[-2000:]}")
            continue
        if result.returncode != 0:
            failures.append(f"README line {line}: {command}\n{result.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
    assert len(ran) >= 8
