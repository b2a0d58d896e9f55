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
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["USER_ERRORS", "check_config_choices", "check_overrides", "exit_on_user_error", "one_line"]

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


def _root_cause(error: BaseException) -> BaseException:
    # hydra.utils.instantiate wraps what the constructor raised in an InstantiationException.
    while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__
    return error


def one_line(error: BaseException, *, first_only: bool = False) -> str:
    """The error's message on one line: its non-empty lines joined (or the first alone), stripped."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if first_only else " ".join(lines)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn user mistakes raised inside into ``SystemExit("error: <one line>")``: that line on stderr, status 1."""
    try:
        yield
    except BaseException as raised:  # noqa: BLE001  (filtered just below; the rest is re-raised)
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


def check_overrides(overrides: Sequence[str], config_dir: str | Path, config_name: str) -> None:
    """Compose the config once with the command line's overrides, turning Hydra's errors into one line.

    For the entry scripts, before ``@hydra.main`` runs: Hydra reports a bad override (a key that
    does not exist, a typo in the syntax) in several lines. Hydra is imported here, lazily, so that
    ``repblocks`` itself never needs it. Flags (``--multirun``, ``--cfg job``...) are left to Hydra.

    Raises:
        ValueError: The overrides do not compose; the message is one line.
    """
    if any(arg.startswith("-") for arg in overrides):
        return
    check_config_choices(overrides, config_dir)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
            compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        cause = f" ({one_line(error.__cause__, first_only=True)})" if error.__cause__ is not None else ""
        raise ValueError(f"{one_line(error)}{cause}") from None
