"""Resuming a run as it was trained: ``python train.py ckpt_path=RUN/checkpoints/last.ckpt`` and nothing else.

A run's optimizer state only fits the module it was saved from: ``rep_l2=true`` splits the parameter
groups differently, EMA adds weights, ``loss=rdrop`` doubles every batch. So a resumed run takes the
settings its checkpoint records (model and its architecture arguments, loss, ``rep_l2``,
``ema_decay``, the data set) as Hydra overrides placed before the command line's own, and a command
line that sets one of them otherwise is refused in one line, before anything is written. The run's
length (``trainer.max_epochs``, ``max_steps``) is taken too, unless the command line sets either.

The checkpoint is data, never instructions: its architecture passes
:func:`repblocks.run_checkpoint.model_spec`, and a name becomes a config choice (``model=NAME``,
``loss=NAME``, ``data=NAME``) only where it names a file of ours in ``configs/``; a recorded
``_target_`` is matched against our configs' own targets, never instantiated.

A run that has already trained as far as the command asks (its ``last.ckpt`` after the final epoch) is
not trained again: :func:`finished_run` gives the one line to print instead. With a larger
``trainer.max_epochs`` it goes on from where it ended.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repblocks.checkpoint import read_checkpoint
from repblocks.cli import check_overrides, quoted
from repblocks.run_checkpoint import MODEL_CONFIG_KEYS, RunCheckpoint, read_run_checkpoint

# The trainer settings that say how long a run is: recorded in its checkpoints, taken back by a bare resume.
RUN_LENGTH_KEYS = ("max_epochs", "max_steps")

__all__ = [
    "RUN_LENGTH_KEYS",
    "check_resume_fits",
    "check_resumed_as_trained",
    "finished_run",
    "read_resume_checkpoint",
    "recorded_overrides",
    "resume_as_trained",
    "trained_so_far",
]


def resume_as_trained(
    overrides: list[str], ckpt_path: str, config_dir: str | Path
) -> tuple[list[str], DictConfig, str | None]:
    """The command line with the resumed checkpoint's own settings (model, loss, rep_l2, EMA, data) put first.

    Args:
        overrides: The command line's overrides.
        ckpt_path: The checkpoint they resume from.
        config_dir: train.py's ``configs/``.

    Returns:
        The overrides, the config they compose, and the line to print about what was taken from
        the checkpoint (None when nothing was).

    Raises:
        ValueError: A command line that sets one of those settings otherwise, before anything is
            written; one line.
    """
    _, run = read_resume_checkpoint(ckpt_path)
    recorded = recorded_overrides(run, config_dir, overrides)
    overrides = [*recorded, *overrides]
    composed = check_overrides(overrides, config_dir, "train")
    check_resumed_as_trained(run, composed)  # refused: that line alone, not what would have been taken first
    shown = [arg for arg in recorded if not arg.startswith("data.")]  # the data set's own settings: too many to read
    note = f"resuming {run.path} as it was trained: {' '.join(shown)}" if recorded else None
    return overrides, composed, note


def read_resume_checkpoint(ckpt_path: str | None) -> tuple[dict, RunCheckpoint] | None:
    """The checkpoint to resume from, read safely now: a truncated or foreign file fails before any work."""
    if ckpt_path is None:
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {ckpt_path}")
    try:
        checkpoint = read_checkpoint(ckpt_path)
        run = read_run_checkpoint(ckpt_path, checkpoint)
    except ValueError as err:  # truncated, not a checkpoint, a pickle that needs code: one line that names the setting
        raise ValueError(f"ckpt_path: {err}") from None
    if run is None:
        raise ValueError(f"ckpt_path: {ckpt_path} is not a train.py checkpoint (it has no model_name hyper-parameter)")
    return checkpoint, run


def check_resume_fits(ckpt_path: str, checkpoint: dict, saved: RunCheckpoint, module: nn.Module) -> None:
    """Refuse, in one line, a checkpoint whose model is not the one this run's LightningModule builds."""
    ours = module.hparams
    theirs = (saved.model_name, saved.num_classes, saved.in_chans)
    if theirs != (ours["model_name"], ours["num_classes"], ours["in_chans"]):
        raise ValueError(
            f"ckpt_path: {ckpt_path} is a checkpoint of {saved.model_name} with num_classes={saved.num_classes}, "
            f"in_chans={saved.in_chans}; this run builds {ours['model_name']} with num_classes={ours['num_classes']}, "
            f"in_chans={ours['in_chans']} (from model= and the data)"
        )
    misfits = _misfits(module.state_dict(), checkpoint["state_dict"])
    if misfits:
        raise ValueError(
            f"ckpt_path: the weights of {ckpt_path} do not fit this run's model: {misfits} "
            f"(saved with model_kwargs={saved.model_kwargs}, ema_decay={saved.hyper_parameters.get('ema_decay')}; "
            f"this run: model_kwargs={ours['model_kwargs']}, ema_decay={ours['ema_decay']})"
        )


def _misfits(expected_state: Mapping, found_state: Mapping) -> str:
    """The keys missing, unexpected or of another shape in ``found_state``, counted, with the first of each; '' when none."""
    expected = {key: tuple(value.shape) for key, value in expected_state.items()}
    found = {key: tuple(value.shape) for key, value in found_state.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & found.keys() if expected[key] != found[key])
    return ", ".join(
        f"{len(keys)} {what} (first: {keys[0]})"
        for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
        if keys
    )


def recorded_overrides(run: RunCheckpoint, config_dir: str | Path, given: Sequence[str]) -> list[str]:
    """The overrides that rebuild ``run``'s training setup, leaving out the keys ``given`` already sets.

    Args:
        run: The checkpoint to resume (read through :func:`repblocks.run_checkpoint.read_run_checkpoint`).
        config_dir: train.py's ``configs/``: the only source of config choices.
        given: The command line's overrides; their keys win (a conflict is refused afterwards by
            :func:`check_resumed_as_trained`).
    """
    config_dir = Path(config_dir)
    hparams = run.hyper_parameters
    recorded: dict[str, object] = {}
    if (config_dir / "model" / f"{run.model_name}.yaml").is_file():
        recorded["model"] = run.model_name
    for key, value in run.model_kwargs.items():  # architecture arguments only (model_spec)
        recorded[f"++model.{key}"] = value
    loss = _group_of_target(config_dir / "loss", hparams.get("loss"))
    if loss is not None:
        recorded["loss"] = loss
    for key in ("rep_l2", "ema_decay"):
        if key in hparams and (hparams[key] is None or isinstance(hparams[key], (bool, int, float))):
            recorded[key] = hparams[key]
    data = run.data or {}
    data_group = _group_of_target(config_dir / "data", str(data.get("_target_", "")).rpartition(".")[2])
    if data_group is not None:
        recorded["data"] = data_group
        own_keys = OmegaConf.load(config_dir / "data" / f"{data_group}.yaml").keys()
        for key in own_keys:
            if key != "_target_" and key in data and _plain(data[key]):
                recorded[f"data.{key}"] = data[key]
    given_keys = {_key(arg) for arg in given}
    length = hparams.get("run_length")
    if isinstance(length, Mapping) and not given_keys & {f"trainer.{key}" for key in RUN_LENGTH_KEYS}:
        for key in RUN_LENGTH_KEYS:  # both or neither: a command line that sets one sets the run's length anew
            if key in length and (length[key] is None or _count(length[key])):
                recorded[f"trainer.{key}"] = length[key]
    groups = ("model", "loss", "data")  # their values are file names of ours, checked above: never quoted
    return [
        f"{key}={value if key in groups else _hydra_value(value)}"
        for key, value in recorded.items()
        if _key(key) not in given_keys
    ]


def check_resumed_as_trained(run: RunCheckpoint, composed: DictConfig) -> None:
    """Refuse a resumed run whose model, loss, ``rep_l2`` or ``ema_decay`` is not the one its checkpoint trained.

    Raises:
        ValueError: One line naming each setting, as recorded and as set now.
    """
    hparams = run.hyper_parameters
    model = OmegaConf.to_container(composed.model, resolve=True)
    ours = {key: value for key, value in model.items() if key not in MODEL_CONFIG_KEYS}
    differences = []
    if model.get("name") != run.model_name:
        differences.append(f"model={run.model_name} (this command: model={model.get('name')})")
    for key in sorted(set(ours) | set(run.model_kwargs)):
        if key in run.model_kwargs and ours.get(key) != run.model_kwargs[key]:
            differences.append(f"model.{key}={_hydra_value(run.model_kwargs[key])} (this command: {ours.get(key)})")
    loss = str(composed.loss.get("_target_", "")).rpartition(".")[2]
    if hparams.get("loss") and loss != hparams["loss"]:
        differences.append(f"loss {hparams['loss']} (this command: {loss})")
    for key in ("rep_l2", "ema_decay"):
        if key in hparams and composed.get(key) != hparams[key]:
            differences.append(f"{key}={_hydra_value(hparams[key])} (this command: {_hydra_value(composed.get(key))})")
    if differences:
        raise ValueError(
            f"ckpt_path: {run.path} was trained with {'; '.join(differences)}: a resumed run continues as it "
            f"was trained (its optimizer state fits only that); drop the override, or start a new run without ckpt_path"
        )


def trained_so_far(checkpoint: Mapping) -> tuple[int, int] | None:
    """The epochs whose training batches all ran, and the optimizer steps, of a Lightning checkpoint; None: not one.

    The epochs are the fit loop's ``processed`` count, which Lightning compares with ``max_epochs``
    when it resumes: a checkpoint saved at the end of the third epoch counts 3, one saved by a
    Ctrl-C in the fourth counts 3 as well.
    """
    try:
        epochs = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        steps = checkpoint["global_step"]
    except (KeyError, TypeError):
        return None
    if not all(_count(value) for value in (epochs, steps)):
        return None
    return epochs, steps


def finished_run(ckpt_path: str | os.PathLike, trainer: Mapping) -> str | None:
    """One line saying that ``ckpt_path``'s run has trained all that ``trainer`` asks; None when there is more to do.

    Args:
        ckpt_path: The checkpoint to resume. One that cannot be read gives None: the resume itself
            says what is wrong with it.
        trainer: The composed ``trainer`` config (``max_epochs``, ``max_steps``), as Lightning would read it.
    """
    try:  # mmap: only the loop state is read, not the weights, however large the checkpoint
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises several kinds for junk and truncation; the resume reports them in one line
        return None
    trained = trained_so_far(checkpoint) if isinstance(checkpoint, Mapping) else None
    if trained is None:
        return None
    epochs, steps = trained
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if max_epochs is None and (max_steps is None or max_steps == -1):
        max_epochs = 1000  # Lightning's default when neither is set
    if max_steps is not None and max_steps > 0 and steps >= max_steps:
        reached, more = f"trainer.max_steps={max_steps}", f"trainer.max_steps above {steps}"
    elif max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        reached, more = f"trainer.max_epochs={max_epochs}", f"trainer.max_epochs above {epochs}"
    else:
        return None
    return (
        f"{ckpt_path} has finished: {epochs} epochs, {steps} steps trained, {reached} reached; "
        f"nothing to resume (to train on, set {more})"
    )


def _group_of_target(group_dir: Path, class_name: object) -> str | None:
    """The option of a config group whose ``_target_`` is the class ``class_name``, among our own config files."""
    if not isinstance(class_name, str) or not class_name:
        return None
    for path in sorted(group_dir.glob("*.yaml")):
        config = OmegaConf.load(path)  # a global-package option (loss/rdrop.yaml) nests its node under the group's name
        target = config.get("_target_") or (config.get(group_dir.name) or {}).get("_target_")
        if isinstance(target, str) and target.rpartition(".")[2] == class_name:
            return path.stem
    return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _plain(value: object) -> bool:
    """A value an override can carry as it is: a scalar, or a list of scalars (mean, std)."""
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value))


def _hydra_value(value: object) -> str:
    """``value`` in Hydra's override grammar; strings are quoted, so a path or a name is read as text."""
    if isinstance(value, Mapping):
        raise TypeError("mappings are not written as overrides")
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return quoted(str(value))
