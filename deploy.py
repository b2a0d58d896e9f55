"""Load a trained network, convert it to its plain deploy form, verify, export and benchmark it.

    python deploy.py ckpt=outputs/.../last.ckpt          # a train.py checkpoint
    python deploy.py ckpt=a0.pth model=repvgg_a0          # a weights file in any layout
    python deploy.py model=repvgg_a0 bench.image_size=224 # random weights: time an architecture
    python deploy.py source=torchvision:resnet50          # fold Conv+BN in a torchvision model
    python deploy.py +experiment=paper_speed              # the RepVGG paper's speed table

Settings: configs/deploy/deploy.yaml. Deploy has a config root of its own so that train.py's
config group ``model`` (configs/model/) does not capture the plain key ``model=NAME``.
``repblocks.deploy.run_deploy`` does the work; this script turns the Hydra config into plain data,
prints the report, and turns bad input into one line on stderr and exit status 1.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from repblocks.cli import check_overrides, exit_on_user_error, quote_path_values
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.report import console_tables, speed_console_table

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "deploy"


@hydra.main(config_path="configs/deploy", config_name="deploy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Library warnings (torch, onnx) go to the log, so that stderr carries only what went wrong.
    logging.captureWarnings(True)
    with exit_on_user_error():
        report = run_deploy(DeployConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)))
    console = Console(width=None if sys.stdout.isatty() else 120)  # rich assumes 80 columns in a pipe or log
    if "rows" in report:
        console.print(speed_console_table(report))
    else:
        for table in console_tables(report):
            console.print(table)
    for name, path in report["files"].items():
        console.print(f"{name}: {path}")


if __name__ == "__main__":
    sys.argv[1:] = quote_path_values(sys.argv[1:])  # checkpoint names hold '=': quote them for Hydra
    with exit_on_user_error():
        check_overrides(sys.argv[1:], CONFIG_DIR, "deploy")
    main()
