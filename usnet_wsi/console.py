"""The one console (stderr) and the progress renderers.

Library code never prints. It accepts a `Reporter` and calls `reporter.info/warn/debug`
and `reporter.task(...)` to report progress; the CLI picks the renderer:
rich (interactive terminal), plain (logs, pipes) or none (`-q`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console: Console | None = None


def console() -> Console:
    """The shared rich Console, writing to stderr."""
    global _console
    if _console is None:
        _console = Console(stderr=True, highlight=False)
    return _console


class Task(Protocol):
    def advance(self, n: int = 1, **fields: object) -> None: ...


class Reporter:
    """Messages and progress. verbosity: 0 quiet (warnings only), 1 normal, 2 verbose."""

    def __init__(self, verbosity: int = 1, style: str = "auto") -> None:
        self.verbosity = verbosity
        if style == "auto":
            style = "rich" if console().is_terminal else "plain"
        self.style = "none" if verbosity == 0 else style

    def info(self, msg: str) -> None:
        if self.verbosity >= 1:
            console().print(msg, markup=False, soft_wrap=True)

    def warn(self, msg: str) -> None:
        console().print(f"warning: {msg}", style="yellow", markup=False, soft_wrap=True)

    def debug(self, msg: str) -> None:
        if self.verbosity >= 2:
            console().print(msg, style="dim", markup=False, soft_wrap=True)

    def error(self, msg: str, hint: str = "", detail: str = "") -> None:
        """An error, always shown: `detail` (a traceback) first, then the message and the fix."""
        out = console()
        if detail:
            out.print(detail, markup=False, soft_wrap=True)
        out.print(f"error: {msg}", style="bold red", markup=False, soft_wrap=True)
        if hint:
            out.print(f"  fix: {hint}", markup=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        """Context manager yielding a task whose `advance(n, **fields)` updates progress."""
        if self.style == "rich":
            with _RichTask(description, total) as t:
                yield t
        elif self.style == "plain":
            t = _PlainTask(description, total)
            yield t
            t.finish()
        else:
            yield _NullTask()


class _NullTask:
    def advance(self, n: int = 1, **fields: object) -> None:
        return None


class _PlainTask:
    """One line every few seconds: done/total, rate, ETA and any extra fields."""

    def __init__(self, description: str, total: int | None, every_s: float = 5.0) -> None:
        self.description, self.total, self.every_s = description, total, every_s
        self.done, self.fields = 0, {}
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        total = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f" eta {max(self.total - self.done, 0) / rate:.0f}s"
        line = f"{self.description}: {self.done}{total} ({rate:.2f}/s){eta} {extra}"
        console().print(line.rstrip(), markup=False, soft_wrap=True)

    def finish(self) -> None:
        self._emit(time.monotonic())


class _RichTask:
    def __init__(self, description: str, total: int | None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console(),
            transient=False,
        )
        self.description, self.total = description, total

    def __enter__(self) -> "_RichTask":
        self.progress.start()
        self.task_id = self.progress.add_task(self.description, total=self.total, extra="",
                                              rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, n: int = 1, **fields: object) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task_id, advance=n, extra=extra)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task_id, rate=f"{speed:.2f}/s" if speed else "")
