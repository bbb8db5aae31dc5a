"""Resume journal: a slide's finished tiles, kept so that a killed run continues mid-slide.

While a slide runs, the results of its tiles (the nuclei each tile owns, in level-0 pixels,
before the cross-tile merge) are appended to a hidden folder beside the outputs,
``OUTDIR/.NAME.partial/``, one file per finished band of tiles (normally one tile row):

- ``journal.json``: format, the key (sha256 of the output identity and of the tile plan) and
  the identity itself, to say what changed when a journal cannot be used;
- ``band-FFFFFFFF.npz``: tiles FFFFFFFF... in plan order: per tile its index, detections and
  unreadable-tile records, per nucleus its score, stain and outline (shapely's ragged-array
  form: exact float64 coordinates, no pickle). Each file is written under a temporary name
  and renamed, and carries the key and its tile range.

A re-run of the same command reads the bands in order and merges their tiles exactly as they
were, then predicts only the remaining tiles. Because the merge, the writers and the model's
per-tile output do not depend on where a run was cut, the outputs are byte-identical to an
uninterrupted run. A journal made for another slide, other settings, other weights or
another plan is discarded (the run says why and starts over); so is any band that cannot be
read back whole, with every band after it. The journal is removed once the outputs are
complete.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from usnet_wsi.console import Reporter
from usnet_wsi.engine import TileResult
from usnet_wsi.nuclei import Nucleus
from usnet_wsi.outputs import identity_changes, remove_tree
from usnet_wsi.tiling import Tile, TilePlan
from usnet_wsi.writers.atomic import atomic_path, is_temporary, output_error

FORMAT = 1
HEADER = "journal.json"
_BAND_PREFIX, _BAND_SUFFIX = "band-", ".npz"

FailuresOf = Callable[[list[Tile]], list[dict[str, Any]]]


def journal_dir(out_dir: Path, name: str) -> Path:
    """``OUTDIR/.NAME.partial``: where the journal of slide NAME lives."""
    return Path(out_dir) / f".{name}.partial"


def plan_digest(plan: TilePlan) -> str:
    """sha256 of the tile plan (tile and halo size, every tile's read and core box)."""
    h = hashlib.sha256(f"{plan.tile_px}/{plan.halo_px}/{len(plan.tiles)}".encode())
    boxes = np.array([t.read_l0 + t.core_l0 + (t.row, t.col) for t in plan.tiles], np.float64)
    h.update(boxes.tobytes())
    return h.hexdigest()


def journal_key(identity: dict[str, Any], plan: TilePlan) -> str:
    """What a journal is bound to: the output identity (slide fingerprint, weights, every
    output-changing setting) and the tile plan."""
    text = json.dumps({"format": FORMAT, "identity": identity, "plan": plan_digest(plan)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Journal:
    """The journal of one slide run: `done` holds the resumed tiles, `record` adds new ones.

    Results are buffered and written as one band when a tile row is complete (`flush` writes
    what is buffered at any time)."""

    folder: Path
    key: str
    plan: TilePlan
    failures_of: FailuresOf
    done: list[TileResult] = field(default_factory=list)
    resumed_failures: list[dict[str, Any]] = field(default_factory=list)
    _buffer: list[TileResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._row_end = {t.row: t.index for t in self.plan.tiles}   # last tile of each row

    def record(self, result: TileResult) -> None:
        """Keep one new tile result (tiles come in plan order)."""
        self._buffer.append(result)
        tile = result.tile
        if self._row_end[tile.row] == tile.index:
            self.flush()

    def flush(self) -> None:
        """Write the buffered results as one band (atomically)."""
        if not self._buffer:
            return
        tiles = [r.tile for r in self._buffer]
        data = encode_band(self._buffer, self.failures_of(tiles), self.key)
        _write(self.folder / band_name(tiles[0].index), data)
        self._buffer.clear()

    def has_bands(self) -> bool:
        """Whether any finished tiles are on disk."""
        return any(self.folder.glob(f"{_BAND_PREFIX}*{_BAND_SUFFIX}"))

    def remove(self) -> None:
        """Delete the journal (the outputs are complete)."""
        self._buffer.clear()
        remove_tree(self.folder)


def band_name(first: int) -> str:
    return f"{_BAND_PREFIX}{first:08d}{_BAND_SUFFIX}"


# ---------------------------------------------------------------- band encoding


def encode_band(results: list[TileResult], failures: list[dict[str, Any]], key: str) -> bytes:
    """One band as the bytes of an .npz (numeric arrays only)."""
    nuclei = [n for r in results for n in r.nuclei]
    polys = np.array([n.polygon_l0 for n in nuclei], dtype=object)
    coords, offsets = None, None
    if len(polys):
        kind, coords, offsets = shapely.to_ragged_array(polys)
        if kind != shapely.GeometryType.POLYGON:
            raise TypeError(f"journal bands hold polygons, not {kind!r}")
    arrays = {
        "key": np.frombuffer(bytes.fromhex(key), np.uint8),
        "tiles": np.array([r.tile.index for r in results], np.int64),
        "detected": np.array([r.n_detected for r in results], np.int64),
        "per_tile": np.array([len(r.nuclei) for r in results], np.int64),
        "score": np.array([n.score for n in nuclei], np.float64),
        "od": np.array([n.hematoxylin_od for n in nuclei], np.float64),
        "coords": np.zeros((0, 2)) if coords is None else coords,
        "ring_offsets": np.zeros(1, np.int64) if offsets is None else offsets[0],
        "poly_offsets": np.zeros(1, np.int64) if offsets is None else offsets[1],
        "failures": np.frombuffer(json.dumps(failures).encode(), np.uint8),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_band(path: Path, key: str, plan: TilePlan) -> tuple[list[TileResult], list[dict]]:
    """The tile results of a band file; ValueError when it is not a whole band of this key."""
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - zip, CRC and format errors alike
        raise ValueError(f"unreadable ({type(err).__name__})") from None
    if a.get("key") is None or a["key"].tobytes().hex() != key:
        raise ValueError("made for another run")
    tiles, per_tile = a["tiles"], a["per_tile"]
    if len(tiles) == 0 or np.any(np.diff(tiles) != 1) or tiles[-1] >= len(plan.tiles):
        raise ValueError("tile range is not valid")
    polys = _polygons(a, int(per_tile.sum()))
    at, results = 0, []
    for index, detected, n in zip(tiles.tolist(), a["detected"].tolist(), per_tile.tolist()):
        tile_nuclei = [Nucleus(polygon_l0=polys[at + i], score=float(a["score"][at + i]),
                               tile_index=index, hematoxylin_od=float(a["od"][at + i]))
                       for i in range(n)]
        at += n
        results.append(TileResult(tile=plan.tiles[index], nuclei=tile_nuclei, n_detected=detected))
    failures = json.loads(a["failures"].tobytes().decode())
    return results, failures


def _polygons(a: dict[str, np.ndarray], n: int) -> list[Polygon]:
    if n == 0:
        return []
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, a["coords"],
                                      (a["ring_offsets"], a["poly_offsets"]))
    if len(polys) != n or len(a["score"]) != n or len(a["od"]) != n:
        raise ValueError("nucleus arrays do not agree")
    return list(polys)


def _write(path: Path, data: bytes) -> None:
    """`data` as `path`, written under a temporary name and renamed."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as err:
        raise output_error(path, err) from None


# ---------------------------------------------------------------- opening


@dataclass(frozen=True)
class JournalRequest:
    """What a slide run asks of its journal."""

    folder: Path
    identity: dict[str, Any]
    plan: TilePlan
    resume: bool                      # False: --no-resume, start over
    failures_of: FailuresOf


def open_journal(req: JournalRequest, name: str, reporter: Reporter) -> Journal:
    """The journal for this run: an earlier journal of the same run resumed (its readable
    bands), or a fresh one. Every reason for starting over is reported."""
    key = journal_key(req.identity, req.plan)
    journal = Journal(req.folder, key, req.plan, req.failures_of)
    if req.folder.exists():
        why = _unusable(req, key)
        if why is None:
            _load(journal, name, reporter)
            if journal.done:
                return journal
        else:
            reporter.info(f"{name}: {why}; starting the slide over")
        remove_tree(req.folder)
    _start(req, key)
    return journal


def _unusable(req: JournalRequest, key: str) -> str | None:
    """Why the journal in req.folder cannot be resumed (None: it can)."""
    if not req.resume:
        return "--no-resume: the journal of an earlier interrupted run is discarded"
    try:
        header = json.loads((req.folder / HEADER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "the journal of an earlier interrupted run is unreadable"
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return "the journal of an earlier interrupted run has another format"
    if header.get("key") == key:
        return None
    changes = identity_changes(header.get("identity"), req.identity)
    detail = "; ".join(changes) if changes else "the tile plan differs"
    return f"the journal of an earlier interrupted run was made otherwise ({detail})"


def _load(journal: Journal, name: str, reporter: Reporter) -> None:
    """Read the bands in order into `journal.done`; a bad band and all after it are
    deleted with a warning."""
    bands = sorted(p for p in journal.folder.glob(f"{_BAND_PREFIX}*{_BAND_SUFFIX}"))
    for i, path in enumerate(bands):
        try:
            if path.name != band_name(len(journal.done)):
                raise ValueError("does not follow the previous band")
            results, failures = decode_band(path, journal.key, journal.plan)
        except ValueError as err:
            reporter.warn(f"{name}: resume journal file {path.name} is damaged ({err}); "
                          f"discarded it and {len(bands) - i - 1} later file(s)")
            for bad in bands[i:]:
                remove_tree(bad)
            break
        journal.done.extend(results)
        journal.resumed_failures.extend(failures)
    for leftover in filter(is_temporary, journal.folder.iterdir()):   # cut short by a kill
        remove_tree(leftover)
    if journal.done:
        reporter.info(f"{name}: resuming after {len(journal.done)} of {len(journal.plan.tiles)} "
                      f"tiles (journal in {journal.folder})")


def _start(req: JournalRequest, key: str) -> None:
    header = {"format": FORMAT, "key": key, "identity": req.identity,
              "tiles": len(req.plan.tiles)}
    try:
        req.folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(req.folder, err) from None
    _write(req.folder / HEADER, json.dumps(header, indent=1).encode())
