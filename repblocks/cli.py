"""What the entry scripts (train.py, deploy.py) share: one-line errors for user mistakes.

A user mistake (a missing file, an unknown name, a bad value) ends the program with one line on
stderr and exit status 1. Anything else is a bug and keeps its traceback. The library marks the
mistakes it recognizes as :class:`repblocks.errors.UserError` (a ``ValueError``); the training
stack reports bad configs through Hydra's ``instantiate`` and Lightning, so the types they raise
for those count too. This module sees Hydra's exceptions by name and imports Hydra only inside
:func:`check_overrides`, so ``repblocks`` never needs it.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from repblocks.errors import Interrupted
from repblocks.signals import interrupt_on_signals, received

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "PATH_KEYS",
    "USER_ERRORS",
    "check_config_choices",
    "check_overrides",
    "exit_on_user_error",
    "one_line",
    "quote_path_values",
    "quoted",
    "sigterm_as_interrupt",
]

# FloatingPointError: a NaN loss; MisconfigurationException (Lightning): e.g. a GPU asked for and absent.
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    ValueError,
    FloatingPointError,
    pickle.UnpicklingError,
)
_USER_ERROR_NAMES = {"MisconfigurationException", "ConfigCompositionException", "MissingConfigException"}


# How a traceback's last line starts: the exception's (dotted) type name and a colon.
_EXCEPTION_TYPE = re.compile(r"(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*: ")


def _root_cause(error: BaseException) -> BaseException:
    # hydra.utils.instantiate wraps what the constructor raised in an InstantiationException.
    while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__
    return error


def one_line(error: BaseException, *, first_only: bool = False) -> str:
    """The error's message on one line: its non-empty lines joined (or the first alone), stripped.

    An error re-raised from a DataLoader worker carries the worker's traceback in its message;
    its last line is the original ``<ExceptionType>: <message>``, and the message is what is kept.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any(line.startswith("Original Traceback") for line in lines):
        exception_type = _EXCEPTION_TYPE.match(lines[-1])
        return lines[-1][exception_type.end() :] if exception_type else lines[-1]
    return lines[0] if first_only else " ".join(lines)


_INTERRUPTED = "interrupted: stopped before finishing; no partial output was kept"


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn user mistakes raised inside into ``SystemExit("error: <one line>")``: that line on stderr, status 1.

    Ctrl-C (and SIGTERM under :func:`sigterm_as_interrupt`) ends with one line and status 130, after
    the cleanup that the interrupted code does on its way out (temporary files are removed); so does
    any error raised after such a signal (a library that caught the interrupt and failed later).
    """
    try:
        yield
    except KeyboardInterrupt as interrupt:
        said = str(interrupt) if isinstance(interrupt, Interrupted) else ""
        sys.stderr.write(f"{said or _INTERRUPTED}\n")
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except BaseException as raised:  # noqa: BLE001  (filtered just below; the rest is re-raised)
        if received() is not None:  # a library swallowed the interrupt, and failed for it (repblocks.signals)
            sys.stderr.write(f"{_INTERRUPTED}\n")
            raise SystemExit(130) from None
        error = _root_cause(raised)
        if isinstance(error, USER_ERRORS) or type(error).__name__ in _USER_ERROR_NAMES:
            message = one_line(error)
        elif isinstance(error, TypeError) and error is not raised:
            # A config key the target does not take (loss.alpha with loss=ce): name the target too.
            message = f"{one_line(raised, first_only=True)} {type(error).__name__}({one_line(error)})"
        else:
            raise
        # SystemExit with a message: Python prints it to stderr and exits with status 1.
        raise SystemExit(f"error: {message}") from None


def check_config_choices(overrides: Sequence[str], config_dir: str | Path) -> None:
    """Check ``group=option`` command-line overrides against the files in ``config_dir/group/``.

    Hydra's own message for an unknown option spans many lines; this one names the option and
    lists the existing ones on one line.

    Raises:
        ValueError: An override names an option that has no ``config_dir/group/option.yaml``.
    """
    config_dir = Path(config_dir)
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        group = config_dir / key
        if not sep or "/" in key or not group.is_dir() or value in ("", "null"):
            continue
        options = sorted(path.stem for path in group.glob("*.yaml"))
        if value not in options:
            raise ValueError(f"unknown {key} {value!r}; available: {', '.join(options)}")


def check_overrides(overrides: Sequence[str], config_dir: str | Path, config_name: str) -> DictConfig | None:
    """Compose the config once with the command line's overrides, turning Hydra's errors into one line.

    For the entry scripts, before ``@hydra.main`` runs: Hydra reports a bad override (a key that
    does not exist, a typo in the syntax) in several lines. Hydra is imported here, lazily, so that
    ``repblocks`` itself never needs it. Flags (``--multirun``, ``--cfg job``...) are left to Hydra.

    Returns:
        The composed config (an omegaconf ``DictConfig``) with its ``hydra`` node, so the caller can
        check what Hydra will use before Hydra writes anything (``hydra.run.dir``); None when the
        command line holds flags. The job is named ``config_name``, as ``@hydra.main`` names it
        after the script.

    Raises:
        ValueError: The overrides do not compose; the message is one line.
    """
    if any(arg.startswith("-") for arg in overrides):
        return None
    check_config_choices(overrides, config_dir)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3", job_name=config_name):
            composed = compose(config_name, overrides=list(overrides), return_hydra_config=True)
            choices = [arg for arg in overrides if _is_group_choice(arg, config_dir)]
            defaults = compose(config_name, overrides=choices) if len(choices) < len(overrides) else composed
    except (HydraException, OmegaConfBaseException) as error:
        cause = f" ({one_line(error.__cause__, first_only=True)})" if error.__cause__ is not None else ""
        raise ValueError(f"{one_line(error)}{cause}") from None
    check_value_types(overrides, defaults)
    return composed


def _is_group_choice(override: str, config_dir: str | Path) -> bool:
    key = override.lstrip("+~").partition("=")[0]
    return "/" not in key and (Path(config_dir) / key).is_dir()


# A setting whose default is one of these takes only values of the same kind (or null).
_KINDS = {bool: (bool,), int: (int,), float: (int, float)}
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def check_value_types(overrides: Sequence[str], defaults) -> None:
    """Check that each ``key=value`` override has the kind of value of the key's default.

    Hydra's configs are untyped YAML: ``trainer.max_epochs=abc`` composes, and fails deep inside
    the run with a traceback. A setting whose default is a boolean, an integer or a number takes
    only that (or null); settings whose default is null or a string are left to their users.

    Raises:
        ValueError: A value of another kind; one line naming the setting, its default and the value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for override in OverridesParser.create().parse_overrides([arg for arg in overrides if "=" in arg]):
        if override.is_add() or override.is_delete() or override.is_sweep_override():
            continue
        try:
            default = OmegaConf.select(defaults, override.key_or_group, throw_on_missing=False)
        except Exception:  # an interpolation that only resolves inside the running app (${hydra:...})
            continue
        kind = type(default)
        value = override.value()
        if kind not in _KINDS or value is None:
            continue
        if not isinstance(value, _KINDS[kind]) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(
                f"{override.key_or_group} must be {_KIND_NAMES[kind]} (default {json.dumps(default)}), got {value!r}"
            )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does, instead of killing the process outright.

    Killed outright, a process runs no ``finally`` block, so a file being written under a
    temporary name stays behind; raised as an exception, the writers' cleanup runs. Both signals are
    also remembered, so that a library that swallows the interrupt does not let the work go on
    (:mod:`repblocks.signals`).
    """
    with interrupt_on_signals():
        yield


# Settings whose values are file paths. Hydra's override grammar gives '=', ',', brackets and
# quotes a meaning, so a path holding them (train.py's own "epoch=003-val_acc=0.9778.ckpt") fails
# to parse or turns into a sweep; such values are quoted before Hydra reads the command line.
PATH_KEYS = ("ckpt", "ckpt_path", "out_dir", "data.root", "paths.output_dir", "hydra.run.dir", "hydra.sweep.dir")
_PLAIN_PATH = re.compile(r"[\w\-+./:@%]*")  # no "~": Hydra reads it as an operator, even inside a value


def quote_path_values(argv: Sequence[str], keys: Sequence[str] = PATH_KEYS) -> list[str]:
    """``argv`` with each ``key=value`` of a path setting quoted when Hydra would not read ``value`` as it is.

    Values already quoted, and every other argument, pass unchanged.
    """
    result = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and not _PLAIN_PATH.fullmatch(value) and value[:1] not in "'\"":
            arg = f"{key}={quoted(value)}"
        result.append(arg)
    return result


def quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override value, read back as exactly this text."""
    # Hydra unescapes backslashes only before a quote and at the end of a quoted value.
    escaped = re.sub(r"(\\*)'", lambda m: 2 * m[1] + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: 2 * m[1], escaped)
    return f"'{escaped}'"
