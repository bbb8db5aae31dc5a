"""Shared CLI plumbing: error reporting with exit codes, verbosity options, value parsers."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import traceback
from typing import Any, Callable, TypeVar

import click

from usnet_wsi.console import Reporter, console
from usnet_wsi.errors import UsageError, explain

F = TypeVar("F", bound=Callable[..., Any])


def report_error(err: BaseException, verbose: bool) -> int:
    """Print a short message (and the fix) on stderr; return the exit code."""
    message, hint, code = explain(err)
    Reporter(style="none").error(message, hint, traceback.format_exc() if verbose else "")
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM (batch schedulers, `docker stop`), raised in the main thread like Ctrl-C so that
    the same clean-up runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into `Terminated` while the block runs (main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:          # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(func: F) -> F:
    """Run a command body; turn UsnetError and unexpected errors into message + exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", 0) >= 2 if isinstance(kwargs.get("verbose"), int) else False
        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Terminated:
            console().print("terminated (SIGTERM): stopped; unfinished outputs were removed",
                            markup=False, soft_wrap=True)
            sys.exit(143)
        except KeyboardInterrupt:
            console().print("interrupted (Ctrl-C): stopped; unfinished outputs were removed",
                            markup=False, soft_wrap=True)
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
