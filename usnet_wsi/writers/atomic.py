"""Atomic outputs: write to a temporary name beside the final one, rename when complete.

A temporary is a hidden sibling of the final path, ``.<name>.tmp-<host>-<pid>-<random>``, so it
lives on the same file system (the rename is atomic for files) and never looks like a finished
output. The name always fits in 255 bytes (a long ``<name>`` is shortened), and it records the
host and process that own it, so a later run can remove the temporaries of runs that were
killed (`remove_stale`) without touching those of a live process.
On error the temporary is removed and the final path is left as it was: either absent or the
previous complete output. An existing final output is replaced on commit; whether replacing is
allowed (``--overwrite``) is the caller's decision, not the writer's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from usnet_wsi.errors import OutputError

_TMP_MARK = ".tmp-"
NAME_MAX = 255                     # bytes in one file name on common file systems
_OWNER_RE = re.compile(r"(?:\.tmp-|^\.usnet-tmp-)([0-9a-f]{4})-(\d+)-[0-9a-f]+$")


def host_tag() -> str:
    """4 hex digits naming this machine (temporaries of other hosts are never removed)."""
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFF:04x}"


def owner_tag() -> str:
    """``<host>-<pid>-<random>``: who owns a temporary, unique per call."""
    return f"{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_name(final_name: str) -> str:
    """``.<final_name>.tmp-<owner>``, the final name shortened so the whole fits NAME_MAX bytes."""
    tail = f"{_TMP_MARK}{owner_tag()}"
    room = NAME_MAX - 1 - len(tail.encode())
    head = final_name.encode()[:room].decode("utf-8", errors="ignore")
    return f".{head}{tail}"


def output_error(path: Path, exc: OSError) -> OutputError:
    """An OutputError for an OS failure while writing `path`, with the usual fixes."""
    reason = exc.strerror or str(exc)
    return OutputError(
        f"cannot write {path}: {reason}",
        hint="check that the output folder exists, is writable and has free disk space",
    )


class AbortOnError:
    """Context-manager mixin for streaming writers: `close()` on success, `abort()` on error."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def call_or_abort(path: Path, abort: Callable[[], None], fn: Callable[..., Any],
                  *args: Any) -> None:
    """Run fn(*args); on any error call `abort` (which removes the temporary) and re-raise,
    OS errors as an OutputError naming `path`."""
    try:
        fn(*args)
    except OSError as exc:
        abort()
        raise output_error(path, exc) from exc
    except BaseException:
        abort()
        raise


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, best effort: never raises (it runs while another
    error is being reported, which it must not mask)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


class AtomicTarget:
    """A temporary path for `final` with explicit `commit()` / `abort()`.

    For streaming writers whose lifetime is not one `with` block. The caller creates a file
    or a directory at `temp`; `commit()` renames it onto `final`; `abort()` removes it.
    """

    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)
        parent = self.final.parent
        if not parent.is_dir():
            raise OutputError(
                f"output folder {parent} does not exist",
                hint="create the folder first or choose another output path",
            )
        if not os.access(parent, os.W_OK):
            raise OutputError(
                f"output folder {parent} is not writable",
                hint="choose a folder you can write to, or fix its permissions",
            )
        self.temp = parent / temp_name(self.final.name)
        self.done = False

    def commit(self) -> None:
        """Move the temporary onto the final path (replacing an older output)."""
        if self.done:
            return
        if not self.temp.exists():
            raise OutputError(f"nothing was written for {self.final}", hint="report this as a bug")
        try:
            if self.final.is_dir() and not self.final.is_symlink():
                self._replace_directory()
            else:
                os.replace(self.temp, self.final)
        except OSError as exc:
            self.abort()
            raise output_error(self.final, exc) from exc
        self.done = True

    def _replace_directory(self) -> None:
        """Swap an existing final directory for the temporary; restore it if that fails."""
        old = self.final.with_name(temp_name(self.final.name))
        os.replace(self.final, old)
        try:
            os.replace(self.temp, self.final)
        except OSError:
            os.replace(old, self.final)
            raise
        _remove(old)

    def abort(self) -> None:
        """Remove the temporary (file or directory); the final path is untouched."""
        if not self.done:
            _remove(self.temp)
            self.done = True


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` if the block succeeds.

    The block writes a file or creates a directory at the yielded path. If the block raises,
    the temporary is removed, nothing is left behind and the exception propagates.
    """
    target = AtomicTarget(final)
    try:
        yield target.temp
    except BaseException:
        target.abort()
        raise
    target.commit()


def is_temporary(path: str | Path) -> bool:
    """True for a name made by `AtomicTarget` (an unfinished or abandoned output)."""
    name = Path(path).name
    return name.startswith(".") and _TMP_MARK in name


def owner_pid(name: str) -> int | None:
    """The pid that owns a temporary of this tool made on this host, else None."""
    m = _OWNER_RE.search(name)
    if m is None or m.group(1) != host_tag():
        return None
    return int(m.group(2))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:            # exists, owned by someone else
        return True
    return True


def stale_temporaries(folder: str | Path) -> list[Path]:
    """This tool's hidden temporaries in `folder` whose owning process (on this host) is gone."""
    out = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for path in entries:
        pid = owner_pid(path.name) if path.name.startswith(".") else None
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            out.append(path)
    return sorted(out)


def outputs_complete(paths: Iterable[str | Path]) -> bool:
    """True when every path exists as a finished output.

    A file must be non-empty; a directory (zarr store) must contain its root `zarr.json`.
    Temporaries never count, since they have other names.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            if not (path / "zarr.json").is_file():
                return False
        elif not (path.is_file() and path.stat().st_size > 0):
            return False
    return True
