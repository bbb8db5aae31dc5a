"""Error tree. Every error carries the offending value, the rule and a one-line fix (hint).

The CLI turns these into a short message on stderr and an exit code: 2 for usage errors
(bad arguments or options), 1 for runtime errors (a file that cannot be read, a failed run).
"""

from __future__ import annotations


class UsnetError(Exception):
    """Base class: `message` says what is wrong, `hint` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def __reduce__(self) -> tuple:
        """Pickled with its hint (errors cross from worker processes to the caller)."""
        return type(self), (self.message, self.hint)


class UsageError(UsnetError):
    """Bad command-line arguments or settings (exit 2)."""

    exit_code = 2


class InputError(UsnetError):
    """An input file exists but cannot be used (missing, empty, wrong format...)."""


class SlideError(InputError):
    """The slide cannot be opened or read, or its resolution is unknown."""


class WeightsError(InputError):
    """A weights bundle is missing, corrupt, of the wrong format or version, or unsafe."""


class DataError(InputError):
    """Training or evaluation data cannot be used (unreadable, mismatched, not instance maps)."""


class OutputError(UsnetError):
    """The output location cannot be written."""


class ClusterError(UsnetError):
    """The dask cluster cannot be reached or cannot run a slide."""


def explain(err: BaseException) -> tuple[str, str, int]:
    """(message, fix, exit code) of any error: a UsnetError's own, else an 'unexpected' one."""
    if isinstance(err, UsnetError):
        return err.message, err.hint, err.exit_code
    return (f"unexpected {type(err).__name__}: {err}",
            "run again with -v for the traceback and report it", 1)
