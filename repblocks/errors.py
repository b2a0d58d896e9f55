"""The error that command-line tools report as one line: bad input, or a result that fails its checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["FoldError", "Interrupted", "OutputMismatch", "UserError", "user_errors"]


class UserError(ValueError):
    """Something the user can act on, said in one line: a missing file, an unknown name, a failed check.

    Entry scripts print it as ``error: ...`` on stderr and exit 1, without a traceback.
    """


class OutputMismatch(UserError):
    """A converted or exported model whose outputs differ from the model's: it is never shipped, and the run stops.

    Told apart from a converter that cannot take a network at all (an op it lacks), which the export
    stage reports as "not converted" and goes on from.
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


class FoldError(UserError):
    """A fold (Conv+BN pair, re-parameterizable block, collapsed expansion) whose result differs from what it replaced.

    Raised where the fold happens, on a small float64 probe, so a wrong network is never returned.
    ``path`` is the module's name in the network ("" for the module a fold was called on).
    """

    def __init__(self, path: str, module_type: str, error: float, tolerance: float, detail: str = ""):
        self.path, self.module_type, self.error, self.tolerance, self.detail = (
            path,
            module_type,
            error,
            tolerance,
            detail,
        )
        where = f"{path} ({module_type})" if path else module_type
        how = detail or f"relative error {error:.3g} on a float64 probe, tolerance {tolerance:.1g}"
        super().__init__(
            f"folding {where} changed its output: {how}; "
            "this is a bug in the fold, please report it (switch_to_deploy(..., verify=False) skips the check)"
        )

    def within(self, prefix: str) -> FoldError:
        """The same error, for a module found at ``prefix`` + this one's path (a walker adds where it found it)."""
        path = ".".join(part for part in (prefix, self.path) if part)
        return FoldError(path, self.module_type, self.error, self.tolerance, self.detail)
