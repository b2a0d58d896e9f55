"""Load a trained network, convert it to its plain deploy form, verify, export and benchmark it.

    python deploy.py ckpt=outputs/.../last.ckpt          # a train.py checkpoint
    python deploy.py ckpt=outputs/train/RUN quantize=int8 # + int8 (OpenVINO/NNCF, onnxruntime), exported only if top-1 holds
    python deploy.py ckpt=outputs/deploy/.../model.safetensors  # deploy.py's own export: already in deploy form
    python deploy.py ckpt=a0.pth model=repvgg_a0          # a weights file in any layout, train or deploy form
    python deploy.py model=repvgg_a0 bench.image_size=224 # random weights: time an architecture
    python deploy.py source=torchvision:resnet50          # fold Conv+BN in a torchvision model
    python deploy.py +experiment=paper_speed              # the RepVGG paper's speed table

Environment: REPBLOCKS_RUNTIME_LOGS=1 shows the inference runtimes' own lines on stderr (ExecuTorch's
cpuinfo lines, absl's, TensorFlow's oneDNN note, LiteRT's XNNPACK delegate line). Without it they are
kept aside, and logged only when the step that ran them fails. OMP_NUM_THREADS, as bench.threads:
from 1 to 4 per CPU.

Settings: configs/deploy/deploy.yaml. Deploy has a config root of its own so that train.py's
config group ``model`` (configs/model/) does not capture the plain key ``model=NAME``.
``repblocks.deploy.run_deploy`` does the work; this script turns the Hydra config into plain data,
prints the report, and turns bad input into one line on stderr and exit status 1 (Ctrl-C and
SIGTERM: one line and status 130). A run writes its outputs whole at the end or not at all; the
run folder Hydra makes before the run starts is removed again when nothing was written into it.
Given ``out_dir=...`` (and no ``hydra.run.dir``), Hydra's run folder is ``out_dir`` itself: nothing
is made under ``outputs/`` in the working directory, which may then be read-only.

Timing on a machine that other processes use: torch runs on as many threads as the cores they
leave free (``bench.threads`` to choose), and OpenMP's idle threads sleep instead of spinning
(``OMP_WAIT_POLICY=PASSIVE``, unless the environment sets it): a spinning thread on a core another
process also uses holds up the others at every barrier (RepVGG-A0 at batch 1: 96 ms a batch
passive, 1676 ms spinning, with other jobs on the 2 cores). The report gives the other processes'
load while timing and says when it skewed the figures.
"""

# ruff: noqa: E402  (the OpenMP setting below must precede the imports that load torch)
import contextlib
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
# OpenMP reads OMP_NUM_THREADS once, when torch loads it, and a bad value is lines of its own on stderr: it is held
# back until torch is loaded, then put back for repblocks.threads.check_threads to judge, before any work.
omp_num_threads = os.environ.pop("OMP_NUM_THREADS", None)

from repblocks.offline import disable_telemetry

disable_telemetry()  # before any engine loads: onnxruntime reads its switch once, on import

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from repblocks.cli import check_overrides, exit_on_user_error, quote_path_values, sigterm_as_interrupt
from repblocks.config_help import config_help
from repblocks.deploy.outputs import check_out_dir
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.report import console_tables, headline, speed_console_table
from repblocks.files import check_writable_dir
from repblocks.threads import check_threads

if omp_num_threads is not None:
    os.environ["OMP_NUM_THREADS"] = omp_num_threads  # torch's thread count is set from it (repblocks.threads)

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "deploy"
# --help: deploy's settings, described by the comments in its yaml files (configs/deploy/deploy.yaml names the
# resolver in hydra.help.template).
OmegaConf.register_new_resolver(
    "deploy_help",
    lambda: config_help(CONFIG_DIR, "deploy", usage="\n\n".join(__doc__.split("\n\n")[:3]), shown_as="configs/deploy"),
    replace=True,
)
RUN_DIR = "hydra.run.dir"
# The run folder and its parents that are missing before Hydra makes them, deepest first (set before
# main runs): only those are removed again, when the run leaves nothing in them.
made_for_the_run: list[Path] = []


@hydra.main(config_path="configs/deploy", config_name="deploy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Library warnings (torch, onnx) go to the log, so that stderr carries only what went wrong.
    logging.captureWarnings(True)
    try:
        with exit_on_user_error():
            report = run_deploy(DeployConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)))
    finally:
        for folder in made_for_the_run:
            with contextlib.suppress(OSError):  # not empty: it holds the outputs (out_dir is the run folder)
                folder.rmdir()  # only ever removes an empty folder
    console = Console(width=None if sys.stdout.isatty() else 120)  # rich assumes 80 columns in a pipe or log
    if "rows" in report:
        console.print(speed_console_table(report))
        for name, path in report["files"].items():
            console.print(f"{name}: {path}")
    else:
        for table in console_tables(report):
            console.print(table)
        print(headline(report))  # last, and as one line: not wrapped or styled by rich


def pin_run_dir(overrides: list[str], composed: DictConfig) -> tuple[list[str], Path]:
    """Resolve the run folder once (``${now:...}`` included), check it can be made, and hand Hydra that one.

    Hydra makes the run folder before ``main`` runs, and fails with a traceback where it cannot.
    With ``out_dir`` set and ``hydra.run.dir`` not, the run folder is ``out_dir`` (links resolved,
    checked as the run will check it): Hydra writes nothing there, and nothing in the working directory.

    Args:
        overrides: The command line's overrides.
        composed: The config they compose to, with its ``hydra`` node (what ``check_overrides`` returns).

    Raises:
        ValueError: The run folder (or ``out_dir``) cannot be made or written.
    """
    given = {arg.partition("=")[0].lstrip("+~") for arg in overrides}
    if RUN_DIR not in given and not OmegaConf.is_interpolation(composed, "out_dir"):
        run_dir = check_out_dir(composed.out_dir)
    else:
        run_dir = Path(composed.hydra.run.dir)
        check_writable_dir(run_dir, f"the run folder ({RUN_DIR})")
    kept = [arg for arg in overrides if arg.partition("=")[0].lstrip("+~") != RUN_DIR]
    return [*kept, f"{RUN_DIR}={run_dir}"], run_dir


if __name__ == "__main__":
    # SIGTERM (a scheduler, `kill`, `timeout`) is handled as Ctrl-C: temporary files are removed on the way out.
    with sigterm_as_interrupt(), exit_on_user_error():
        overrides = quote_path_values(sys.argv[1:])  # checkpoint names hold '=': quote them for Hydra
        composed = check_overrides(overrides, CONFIG_DIR, "deploy")
        if composed is not None:  # None for flags (--cfg job, --multirun): those are Hydra's own
            check_threads(composed.bench.threads, setting="bench.threads")  # and OMP_NUM_THREADS, as train.py does
            overrides, run_dir = pin_run_dir(overrides, composed)
            made_for_the_run = [folder for folder in [run_dir, *run_dir.parents] if not folder.exists()]
        sys.argv[1:] = quote_path_values(overrides)
        main()
