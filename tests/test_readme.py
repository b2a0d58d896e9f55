"""The README's code, run as written: its Python blocks as one session, its train.py/deploy.py command lines.

How a block is chosen, and what the test adds (nothing else is changed):

- Every fenced ``python`` block runs, in README order, in one namespace (the README says they read as
  one session), in an empty temporary working folder: a file a block reads, an earlier block writes
  (``RepVGG-A0-train.pth``). The network is blocked; what the README downloads is there as if downloaded
  (:func:`_downloaded`): ``pretrained=True`` reads timm's weights from a Hugging Face cache holding random
  weights of timm's model, and torchvision's ``weights="DEFAULT"`` reads its download folder filled the
  same way. A block preceded by ``<!-- readme-test: skip: REASON -->`` is skipped and listed with its reason.
- Every line of a ``bash`` block that runs ``python train.py`` or ``python deploy.py`` runs as written,
  in README order, in one empty folder where the first Python block has run (it writes the weights file
  the deploy lines read), with a home folder holding torchvision's download and ``$HOME`` expanded as the
  shell would. The test appends :data:`TINY_TRAIN` / :data:`TINY_DEPLOY` (Hydra takes the last value of
  a key, so the README's own settings stay on the line and only the length shrinks), and a run folder of
  its own to a line that names none (two runs in one second would share the default, dated one); the
  folders the README names (``outputs/train/a0``, ``outputs/deploy/a0``) are the ones later lines read.
  Every other line is in :data:`NOT_RUN` with the reason; a new README line that is in neither fails
  :func:`test_every_readme_command_is_run_or_skipped_with_a_reason`.
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


def _downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> None:
    """Block the network, and put there what the README downloads, as its download would: random weights.

    timm's RepVGG-A0 (``pretrained=True``) in a Hugging Face cache, torchvision's ResNet-18
    (``weights="DEFAULT"``, ``resnet18-f37072fd.pth``) in torch hub's folder under ``torch_home``.
    """
    constants = pytest.importorskip("huggingface_hub.constants")
    torchvision = pytest.importorskip("torchvision")

    def refuse(*args, **kwargs):
        raise OSError("the network is blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fill_hub_cache(tmp_path / "hub", "repvgg_a0")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), torch_home / "hub/checkpoints/resnet18-f37072fd.pth")


def _run_python_block(block: Block, namespace: dict, monkeypatch: pytest.MonkeyPatch, *, first: bool) -> None:
    where = f"README.md, block at line {block.line}"
    if not first:
        exec(compile(block.code, where, "exec"), namespace)  # noqa: S102  (the README's own code)
        return
    # The first block is the core's API: up to its `import torchvision`, it runs without torchvision.
    core, _, rest = block.code.partition("\nimport torchvision")
    with monkeypatch.context() as blocked:
        blocked.setitem(sys.modules, "torchvision", None)  # importing it now raises ImportError
        exec(compile(core, where, "exec"), namespace)  # noqa: S102  (the README's own code)
    assert rest, "the API block says where torchvision comes in"
    exec(compile("\n" * core.count("\n") + "\nimport torchvision" + rest, where, "exec"), namespace)  # noqa: S102


def _python_blocks() -> list[Block]:
    return [block for block in readme_blocks() if block.language == "python" and not block.marker.startswith("skip: ")]


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
    _downloaded(tmp_path, monkeypatch, torch_home=tmp_path / "torch")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # empty: what a block reads, an earlier one writes

    namespace: dict = {"__name__": "readme"}
    blocks = _python_blocks()
    for index, block in enumerate(blocks):
        _run_python_block(block, namespace, monkeypatch, first=index == 0)
    assert len(blocks) >= 5
    assert namespace["again"].stem.deploy, "a deploy-form file builds the deploy form"
    assert namespace["backbone"].feature_info.channels() == [96, 192, 1280]


# --- the command lines ---


def _with_settings(command: str, index: int, home: Path) -> list[str]:
    """The command as argv ($HOME expanded, as the shell does), the tiny settings and, where it names none, a run folder."""
    argv = shlex.split(command.replace("$HOME", str(home)), comments=True)
    assert argv[0] == "python" and "$" not in command.replace("$HOME", ""), command
    script = argv[1]
    argv = [sys.executable, str(ROOT / script), *argv[2:]]
    tiny = TINY_TRAIN if script == "train.py" else TINY_DEPLOY
    if script == "train.py" and any(arg.startswith("ckpt_path=") for arg in argv):
        tiny = [*TINY_TRAIN, "trainer.max_epochs=2"]  # one epoch more than the run it resumes had
    named = any(arg.startswith(("hydra.run.dir=", "out_dir=")) for arg in argv)
    return [*argv, *tiny, *([] if named else [f"hydra.run.dir=outputs/{Path(script).stem}/line{index}"])]


@pytest.mark.slow  # a dozen train.py and deploy.py processes of a few seconds each
def test_readme_command_lines_run(tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    _downloaded(tmp_path, monkeypatch, torch_home=home / ".cache" / "torch")
    monkeypatch.chdir(work)
    _run_python_block(_python_blocks()[0], {"__name__": "readme"}, monkeypatch, first=True)
    assert (work / "RepVGG-A0-train.pth").is_file(), "the deploy lines read the weights the API block writes"
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ran, failures = [], []
    for index, (line, command) in enumerate(readme_commands()):
        if why_not_run(command) or not command.startswith(("python train.py", "python deploy.py")):
            continue
        argv = _with_settings(command, index, home)
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
