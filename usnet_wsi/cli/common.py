"""Shared CLI plumbing: error reporting with exit codes, verbosity options, value parsers."""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any, Callable, TypeVar

import click

from usnet_wsi.console import Reporter, console
from usnet_wsi.errors import UsageError, UsnetError

F = TypeVar("F", bound=Callable[..., Any])


def report_error(err: BaseException, verbose: bool) -> int:
    """Print a short message (and the fix) on stderr; return the exit code."""
    if verbose:
        console().print(traceback.format_exc(), markup=False)
    if isinstance(err, UsnetError):
        console().print(f"error: {err.message}", style="bold red", markup=False)
        if err.hint:
            console().print(f"  fix: {err.hint}", markup=False)
        return err.exit_code
    console().print(f"error: unexpected {type(err).__name__}: {err}", style="bold red", markup=False)
    console().print("  fix: run again with -v for the traceback and report it", markup=False)
    return 1


def guarded(func: F) -> F:
    """Run a command body; turn UsnetError and unexpected errors into message + exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", 0) >= 2 if isinstance(kwargs.get("verbose"), int) else False
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            console().print("interrupted", markup=False)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - the CLI boundary
            sys.exit(report_error(err, verbose))

    return wrapper  # type: ignore[return-value]


def verbosity_options(func: F) -> F:
    """-q/--quiet and -v/--verbose; the command receives `verbose` as 0 (quiet), 1, 2."""
    func = click.option("-v", "--verbose", "verbose_flag", count=True,
                        help="More detail; -v also shows tracebacks.")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")(func)

    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool, verbose_flag: int, **kwargs: Any) -> Any:
        level = 0 if quiet else 1 + min(verbose_flag, 1)
        return func(*args, verbose=level, **kwargs)

    return wrapper  # type: ignore[return-value]


def make_reporter(verbose: int) -> Reporter:
    return Reporter(verbosity=verbose)


def parse_box(text: str | None, option: str) -> tuple[int, int, int, int] | None:
    """Parse 'X,Y,W,H' (integers, W and H > 0) or raise UsageError naming the option."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not X,Y,W,H", f"give four integers, e.g. {option} 0,0,2000,2000") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise UsageError(f"{option} {text!r}: X,Y must be >= 0 and W,H > 0",
                         f"e.g. {option} 0,0,2000,2000 (level-0 pixels)")
    return x, y, w, h
