"""The outputs of one slide as one set: names, manifest, identity, staging and the swap.

A run writes its new outputs into a hidden staging folder in OUTDIR
(``.usnet-tmp-<host>-<pid>-<random>``); each writer is atomic inside it. When all are
complete they are swapped in together: the old run.json is moved aside first, then the other
old outputs, then the new outputs are renamed into place with run.json last. If anything fails
the old set is put back. Signals are held off during the swap (a few renames), and a swap cut
short by a kill is rolled back by the next run in that folder (`clean_stale`). So OUTDIR holds
the old complete set or the new complete set; a set without run.json is never complete.

run.json records a *manifest* (each output's size and a cheap fingerprint) and an *identity*
(version, slide fingerprint and every setting that changes the output). A later run skips a
slide only when the manifest matches the files and the identity matches its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usnet_wsi.errors import OutputError
from usnet_wsi.writers.atomic import NAME_MAX, owner_tag, stale_temporaries

STAGE_PREFIX = ".usnet-tmp-"
_SWAP_FILE = "swap.json"
_END_BYTES = 1 << 16


@dataclass(frozen=True)
class OutputPaths:
    """The outputs of one slide in OUTDIR, named after the slide."""

    geojson: Path
    zarr: Path
    overview: Path
    run_json: Path

    def all(self) -> tuple[Path, ...]:
        return (self.geojson, self.zarr, self.overview, self.run_json)

    def other_geojson(self) -> Path:
        """The GeoJSON name of the other compression (an old set may have used it)."""
        name = self.geojson.name
        alt = name[:-3] if name.endswith(".gz") else name + ".gz"
        return self.geojson.with_name(alt)


def output_paths(out_dir: Path, name: str, geojson_gz: bool) -> OutputPaths:
    """OUTDIR/NAME.geojson[.gz], NAME.zarr, NAME.overview.png, NAME.run.json."""
    d = Path(out_dir)
    return OutputPaths(geojson=d / f"{name}.geojson{'.gz' if geojson_gz else ''}",
                       zarr=d / f"{name}.zarr", overview=d / f"{name}.overview.png",
                       run_json=d / f"{name}.run.json")


def check_name_length(paths: OutputPaths) -> None:
    """OutputError when an output name would be longer than a file name may be."""
    longest = max((p.name for p in paths.all() + (paths.geojson.with_suffix(".gz"),)),
                  key=lambda n: len(n.encode()))
    if len(longest.encode()) > NAME_MAX:
        raise OutputError(f"the output name {longest[:40]}... would be {len(longest.encode())} "
                          f"bytes, over the {NAME_MAX}-byte limit for a file name",
                          "give the slide a shorter name (rename it, or link to it with a "
                          "shorter name: ln -s LONG-NAME.svs short.svs)")


# ---------------------------------------------------------------- manifest and identity


def fingerprint_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of the first and last 64 KiB (a file) or of the listing of names and
    sizes plus every zarr.json (a zarr store)."""
    h = hashlib.sha256()
    if path.is_dir():
        size = 0
        for rel, full in sorted(_walk(path)):
            n = full.stat().st_size
            size += n
            h.update(f"{rel}\0{n}\0".encode())
            if full.name == "zarr.json":
                h.update(full.read_bytes())
        return {"size": size, "sha256": h.hexdigest()}
    size = path.stat().st_size
    with path.open("rb") as fh:
        h.update(fh.read(_END_BYTES))
        if size > _END_BYTES:
            fh.seek(max(size - _END_BYTES, _END_BYTES))
            h.update(fh.read(_END_BYTES))
    return {"size": size, "sha256": h.hexdigest()}


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    for folder, _, files in os.walk(root):
        for f in files:
            full = Path(folder) / f
            yield full.relative_to(root).as_posix(), full


def manifest(paths: OutputPaths) -> dict[str, dict[str, Any]]:
    """{file name: fingerprint} of the outputs other than run.json."""
    return {p.name: fingerprint_file(p) for p in (paths.geojson, paths.zarr, paths.overview)}


def manifest_problem(record: dict[str, Any], folder: Path) -> str | None:
    """Why the files in `folder` are not the ones run.json describes (None: they are)."""
    recorded = record.get("manifest")
    if not isinstance(recorded, dict) or not recorded:
        return "run.json has no manifest of its files"
    for name, fp in recorded.items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        try:
            if fingerprint_file(path) != fp:
                return f"{name} is not the file run.json describes"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    return None


# settings recorded in the identity since a later version, with the value earlier runs had
IDENTITY_DEFAULTS: dict[str, Any] = {"tta": "none"}


def identity_changes(old: Any, new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every output-changing setting that differs."""
    if not isinstance(old, dict):
        return ["made by an older usnet-wsi that did not record its settings"]
    was = {**IDENTITY_DEFAULTS, **old}
    return [f"{k}: {_show(was.get(k))} -> {_show(v)}" for k, v in new.items() if was.get(k) != v]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "..."
    return str(value)


def read_record(path: Path) -> dict[str, Any] | None:
    """run.json as a dict, or None when absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- staging and swap


class Stage:
    """A hidden staging folder in OUTDIR holding the new outputs until `commit()`."""

    def __init__(self, final: OutputPaths) -> None:
        self.final = final
        self.dir = final.run_json.parent / f"{STAGE_PREFIX}{owner_tag()}"
        try:
            self.dir.mkdir()
        except OSError as err:
            raise OutputError(f"cannot write to {self.dir.parent}: {err.strerror or err}",
                              "check that the output folder is writable and has free space") \
                from None
        # short names inside: writers add their own temporary suffix to these
        self.paths = OutputPaths(geojson=self.dir / ("g" + "".join(final.geojson.suffixes)),
                                 zarr=self.dir / "z.zarr", overview=self.dir / "o.png",
                                 run_json=self.dir / "r.json")

    def commit(self) -> None:
        """Swap the staged outputs in for the old set (run.json last); restore the old set
        if that fails. Signals wait until the swap is over."""
        with _signals_held():
            swap(self.dir, self._moves())
        remove_tree(self.dir)

    def _moves(self) -> list[tuple[Path, Path]]:
        f, s = self.final, self.paths
        return [(s.zarr, f.zarr), (s.geojson, f.geojson), (s.overview, f.overview),
                (s.run_json, f.run_json)]

    def abort(self) -> None:
        remove_tree(self.dir)


def swap(stage: Path, moves: list[tuple[Path, Path]]) -> None:
    """Move the old finals into `stage` (run.json first), the new ones into place (run.json
    last). `swap.json` in `stage` lets `recover` finish the job after a kill."""
    finals = [dst for _, dst in moves]
    old = [finals[-1]] + finals[:-1] + [_other_geojson(finals)]
    backups = [(p, stage / f"old-{i}") for i, p in enumerate(old) if os.path.lexists(p)]
    plan = {"new": [[dst.name, src.name] for src, dst in moves],
            "old": [[p.name, b.name] for p, b in backups]}
    (stage / _SWAP_FILE).write_text(json.dumps(plan), encoding="utf-8")
    done: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for p, b in backups:
            os.replace(p, b)
            done.append((p, b))
        for src, dst in moves:
            os.replace(src, dst)
            placed.append(dst)
    except BaseException:
        _roll_back(placed, done)
        raise


def _other_geojson(finals: list[Path]) -> Path:
    name = finals[1].name
    return finals[1].with_name(name[:-3] if name.endswith(".gz") else name + ".gz")


def _roll_back(placed: list[Path], backups: list[tuple[Path, Path]]) -> None:
    """Remove new outputs put in place and move the old ones back (run.json, moved first,
    comes back last)."""
    for p in placed:
        remove_tree(p)
    for p, b in reversed(backups):
        if os.path.lexists(b):
            remove_tree(p)
            os.replace(b, p)


def recover(stage: Path) -> None:
    """Finish a swap that a killed process left: if its new run.json never arrived, put the
    old set back. Then remove the staging folder."""
    try:
        plan = json.loads((stage / _SWAP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        plan = None
    if plan and not (stage.parent / plan["new"][-1][0]).exists():
        placed = [stage.parent / final for final, staged in plan["new"]
                  if not os.path.lexists(stage / staged)]
        backups = [(stage.parent / n, stage / b) for n, b in plan["old"]]
        _roll_back(placed, backups)
    remove_tree(stage)


def clean_stale(folder: Path) -> list[str]:
    """Remove this tool's temporaries in `folder` left by processes that no longer run
    (rolling back an interrupted swap first); returns their names."""
    removed = []
    for path in stale_temporaries(folder):
        try:
            if path.name.startswith(STAGE_PREFIX) and path.is_dir():
                recover(path)
            else:
                remove_tree(path)
        except OSError:
            continue
        removed.append(path.name)
    return removed


def remove_tree(path: Path) -> None:
    """Remove a file or folder, best effort (never raises)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (main thread on POSIX; else a no-op)."""
    usable = hasattr(signal, "pthread_sigmask") and \
        threading.current_thread() is threading.main_thread()
    held = {signal.SIGINT, signal.SIGTERM}
    if usable:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if usable:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
