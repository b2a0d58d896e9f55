"""Train a zoo model with Lightning, configured by Hydra.

    python train.py model=repvgg_a0                      # digits, embedded: no download
    python train.py model=repvgg_a0 loss=rdrop trainer=cpu trainer.max_epochs=50
    python train.py data=cifar10 data.root=~/data trainer.precision=bf16-mixed
    python train.py ckpt_path=outputs/train/.../checkpoints/last.ckpt   # resume
    python train.py model=qarepvgg_a0 +experiment=qat qat.init=outputs/train/.../RUN   # int8 QAT of a run

Outputs land in the run directory (``hydra.run.dir=...`` to choose it): ``config.yaml``
(resolved), ``checkpoints/`` (best and last, each written atomically), ``logs/``,
``deploy_weights/<model>_deploy.safetensors``, ``metrics.json`` and ``training_curves.png``. A folder that holds a run is not
reused by another one; resuming from a checkpoint inside it continues that run there. A resumed
run takes its checkpoint's model, loss, rep_l2, EMA and data settings, and its length (``repblocks/train/resume.py``).
Settings, folders and the resumed checkpoint are checked before any data is read. Every object a
run trains with (network, data module, LightningModule, optimizer, schedule, trainer) is a Hydra target
in ``configs/``, built by :func:`repblocks.train.fit.fit`; ``+experiment=qat`` runs
:func:`repblocks.train.qat.quantization_aware_training` instead.

On a machine other processes use, training runs on as many threads as the cores they leave free
(``threads=N`` to choose, from 1 to 4 per CPU), with as many data-loading workers as fit beside them, and OpenMP's idle
threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless the environment sets it):
see :mod:`repblocks.threads`. Written to a log or a pipe, progress is a line per epoch.
"""

# ruff: noqa: E402  (the OpenMP setting below must precede the imports that load torch)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP (repblocks/threads.py)
# OpenMP reads OMP_NUM_THREADS once, when torch loads it, and a bad value is lines of its own on stderr: it is held
# back until torch is loaded, then put back for repblocks.threads.check_threads to judge, before any work.
omp_num_threads = os.environ.pop("OMP_NUM_THREADS", None)

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from repblocks.cli import PATH_KEYS, check_overrides, exit_on_user_error, quote_path_values
from repblocks.config_help import config_help
from repblocks.threads import check_threads
from repblocks.train.console import log_from_rank_zero, quiet_lightning
from repblocks.train.fit import fit
from repblocks.train.qat import quantization_aware_training
from repblocks.train.qat import summary as qat_summary
from repblocks.train.report import summary
from repblocks.train.resources import first_process, use_free_cores
from repblocks.train.resume import finished_run, resume_as_trained
from repblocks.train.run_folder import check_run_folder

if omp_num_threads is not None:
    os.environ["OMP_NUM_THREADS"] = omp_num_threads  # torch's thread count is set from it (repblocks.threads)

log_from_rank_zero()  # under DDP, each line once: the other processes log their errors only
quiet_lightning()  # Lightning's advice on every run (a cloud logger's tip, a deprecation inside it): no news about the run
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# --help: train.py's config groups and settings, described by the comments in their yaml files (configs/train.yaml
# names the resolver in hydra.help.template); configs/deploy/ is deploy.py's own config root, not a group of train's.
OmegaConf.register_new_resolver(
    "train_help",
    lambda: config_help(CONFIG_DIR, "train", usage="\n\n".join(__doc__.split("\n\n")[:2]), skip=["deploy"]),
    replace=True,
)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run what the config asks for: training (:func:`repblocks.train.fit.fit`), or ``+experiment=qat``.

    Returns:
        The metrics written to ``metrics.json`` (best ``val_acc``, ``val_acc_deploy``,
        ``max_abs_err``, ``best_ckpt``, ``deploy_weights``, ...).
    """
    choice = use_free_cores(cfg)
    if cfg.get("qat") is not None:  # +experiment=qat: fine-tune a finished run with fake quantization, export int8
        return quantization_aware_training(cfg)
    return fit(cfg, choice)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train; return the monitored metric (best ``val_acc``), which Hydra's sweepers optimize."""
    with exit_on_user_error():
        metrics = train(cfg)
    if first_process():
        print(qat_summary(metrics) if cfg.get("qat") is not None else summary(metrics))
    return metrics.get("val_acc")


if __name__ == "__main__":
    # Checkpoint names hold '=': quote them for Hydra.
    sys.argv[1:] = quote_path_values(sys.argv[1:], (*PATH_KEYS, "qat.init"))
    with exit_on_user_error():
        composed, note = check_overrides(sys.argv[1:], CONFIG_DIR, "train"), None
        if composed is not None:  # threads=, OMP_NUM_THREADS: one line now, not a crash once torch starts them
            check_threads(composed.get("threads"))
        if composed is not None and composed.ckpt_path is not None and composed.get("qat") is None:
            # A resumed run takes its checkpoint's model, loss, rep_l2, EMA, data settings and length (repblocks/train/resume.py).
            sys.argv[1:], composed, note = resume_as_trained(sys.argv[1:], composed.ckpt_path, CONFIG_DIR)
            if (finished := finished_run(composed.ckpt_path, composed.trainer)) is not None:
                print(finished)  # one line, exit 0: a finished run is no error, and is not trained again
                sys.exit(0)
        if composed is not None:  # before Hydra writes its logs and .hydra/ into the run folder
            check_run_folder(composed.hydra.run.dir, ckpt_path=composed.ckpt_path, new_run=first_process())
        if note and first_process():  # once nothing refuses the command line: a refusal is its one line
            print(note, file=sys.stderr)
    main()
