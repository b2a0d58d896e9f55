"""The error that command-line tools report as one line: bad input, or a result that fails its checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["Interrupted", "UserError", "user_errors"]


class UserError(ValueError):
    """Something the user can act on, said in one line: a missing file, an unknown name, a failed check.

    Entry scripts print it as ``error: ...`` on stderr and exit 1, without a traceback.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the work; the message says where, and what was (not) kept.

    The library raises this, never ``SystemExit``: only entry scripts decide how a process ends
    (:func:`repblocks.cli.exit_on_user_error` prints the message and exits with status 130).
    """


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Within this block, the library's own input errors (``FileNotFoundError``, ``ValueError``) become :class:`UserError`.

    Wrap only code that reads user input (files, names), so that bugs elsewhere keep their traceback.
    """
    try:
        yield
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
