"""Streaming merge of per-tile nuclei: cross-tile de-duplication, overlap clipping, final order.

Tiles arrive in plan (row-major) order, each with the level-0 nuclei it owns (centre inside its
core). Ownership leaves two kinds of conflict near core borders, both resolved here:

1. duplicates: the same physical nucleus owned by two tiles because its centre estimate moved
   across the border (IoU or intersection-over-smaller-area above a threshold): the nucleus
   ranked higher survives;
2. overlaps: distinct nuclei whose outlines overlap: the one ranked higher keeps the shared area,
   the other is cut (largest remaining part kept; dropped when too little is left).

Rank: higher score first; ties go to the lower tile index, then to the position within the tile
in (y, x) order of the centroid. Results never depend on the order nuclei are listed in a tile.

A nucleus is emitted once no future tile can touch it: every nucleus lies inside its tile's read
box, so a row of tiles is final as soon as a tile arrives from a row whose read boxes (and those
of all later rows) start below the row's lowest read-box edge; with halo <= core/2 that is "row
r is final once row r+1 has been fully added". Emission order is (tile index, centroid y,
centroid x), so ids given downstream in emission order are deterministic. Pending nuclei: about
two rows of tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import shapely
from shapely.geometry import Polygon

from usnet_wsi.geometry import largest_polygon
from usnet_wsi.nuclei import Nucleus
from usnet_wsi.tiling import Tile, TilePlan

__all__ = ["MergeStats", "Merger"]

_OVERLAP_EPS_L0 = 1e-6   # l0 px^2: intersections smaller than this are float noise, not overlap
_BOX_TOL_L0 = 1e-3       # l0 px: slack when checking that a nucleus lies in its tile's read box


@dataclass(eq=False)
class _Entry:
    """A pending nucleus: its current (possibly clipped) form and what it was when added."""

    nucleus: Nucleus
    original: Polygon
    seq: int              # global rank among equal scores: plan order, then (y, x) in the tile
    alive: bool = True

    @property
    def priority(self) -> tuple[float, int]:
        """Sort key, highest-ranked first."""
        return (-self.nucleus.score, self.seq)


@dataclass
class MergeStats:
    """Counts for provenance. added = emitted + duplicates + dropped_small + dropped_empty
    (+ nuclei still pending before `flush`)."""

    added: int = 0          # nuclei given to `add`
    emitted: int = 0        # nuclei returned by `add` / `flush`
    duplicates: int = 0     # removed as a duplicate of a higher-ranked nucleus
    clipped: int = 0        # cuts applied (a nucleus may be cut more than once)
    dropped_small: int = 0  # removed because a cut left too little of it
    dropped_empty: int = 0  # given without any area


@dataclass
class _Bucket:
    row: int
    entries: list[_Entry] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    bounds: np.ndarray | None = None      # (n, 4) bounds of the entries' original outlines


class Merger:
    """Streaming de-duplication and overlap clipping of nuclei fed tile by tile in plan order."""

    def __init__(self, plan: TilePlan, iou_threshold: float = 0.3,
                 containment_threshold: float = 0.5, min_keep_fraction: float = 0.3,
                 min_area_l0: float = 4.0) -> None:
        """Prepare a merge over ``plan``.

        Args:
            plan: the tile plan whose tiles will be added (in its order).
            iou_threshold: two nuclei with polygon IoU above this are duplicates.
            containment_threshold: ... or with intersection / smaller area above this.
            min_keep_fraction: a clipped nucleus keeping less than this fraction of its area
                is dropped.
            min_area_l0: a clipped nucleus smaller than this (level-0 px^2) is dropped.
        """
        for name, v in (("iou_threshold", iou_threshold),
                        ("containment_threshold", containment_threshold),
                        ("min_keep_fraction", min_keep_fraction)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not min_area_l0 >= 0:
            raise ValueError(f"min_area_l0 must be >= 0, got {min_area_l0!r}")
        self._plan = plan
        self._iou, self._contain = float(iou_threshold), float(containment_threshold)
        self._keep_frac, self._min_area = float(min_keep_fraction), float(min_area_l0)
        self._release = _release_rows(plan.tiles)
        self._buckets: dict[int, _Bucket] = {}
        self._last_index = -1
        self._seq = 0
        self._flushed = False
        self.stats = MergeStats()

    @property
    def pending_rows(self) -> list[int]:
        """Tile rows that still hold nuclei not yet emitted (for memory checks)."""
        return sorted({b.row for b in self._buckets.values() if any(e.alive for e in b.entries)})

    @property
    def n_pending(self) -> int:
        """Number of nuclei held, not yet emitted."""
        return sum(e.alive for b in self._buckets.values() for e in b.entries)

    def add(self, tile: Tile, nuclei: Iterable[Nucleus]) -> list[Nucleus]:
        """Add the nuclei owned by ``tile``; return the nuclei that became final, in order.

        Tiles must come in plan order (strictly increasing index, tiles of this plan); every
        nucleus must carry ``tile.index`` and lie inside ``tile.read_l0``. ValueError otherwise.
        """
        self._check_tile(tile)
        incoming = self._prepare(tile, list(nuclei))
        self._last_index = tile.index
        done = self._emit(lambda row: self._release[row] is not None
                          and self._release[row] <= tile.row)
        if incoming:
            self._resolve(incoming)
            bucket = self._buckets.setdefault(tile.index, _Bucket(row=tile.row))
            bucket.entries.extend(e for e in incoming if e.alive)
            bucket.box = _union_box(incoming)
            bucket.bounds = shapely.bounds(np.array([e.original for e in bucket.entries],
                                                    dtype=object)).reshape(-1, 4)
        return done

    def flush(self) -> list[Nucleus]:
        """Emit every nucleus still held (call once, after the last tile); no adds after."""
        self._flushed = True
        return self._emit(lambda row: True)

    # -- input ---------------------------------------------------------------------------

    def _check_tile(self, tile: Tile) -> None:
        if self._flushed:
            raise ValueError("Merger.add() after flush(): create a new Merger for a new run")
        tiles = self._plan.tiles
        if not (0 <= tile.index < len(tiles)) or tiles[tile.index] != tile:
            raise ValueError(f"tile {tile.index} (row {tile.row}, col {tile.col}) is not a "
                             "tile of this merger's plan")
        if tile.index <= self._last_index:
            raise ValueError(f"tile {tile.index} added after tile {self._last_index}: "
                             "tiles must be added in plan order")

    def _prepare(self, tile: Tile, nuclei: list[Nucleus]) -> list[_Entry]:
        """Validate, repair and rank one tile's nuclei; assign their global sequence numbers."""
        _check_nuclei(nuclei, tile)
        self.stats.added += len(nuclei)
        polys = np.array([n.polygon_l0 for n in nuclei], dtype=object)
        usable = shapely.is_valid(polys) & (shapely.area(polys) > 0)
        kept: list[Nucleus] = []
        for n, ok in zip(nuclei, usable):
            poly = n.polygon_l0 if ok else largest_polygon(n.polygon_l0)
            if poly is None:
                self.stats.dropped_empty += 1
                continue
            kept.append(n if ok else replace(n, polygon_l0=poly))
        kept = [kept[i] for i in _listing_free_order(kept)]
        entries = [_Entry(n, n.polygon_l0, self._seq + i) for i, n in enumerate(kept)]
        self._seq += len(entries)
        return entries

    # -- conflict resolution -----------------------------------------------------------------

    def _resolve(self, incoming: list[_Entry]) -> None:
        box = _union_box(incoming)
        pool = self._candidates(box) + incoming
        n_old = len(pool) - len(incoming)
        self._suppress_duplicates(pool, n_old)
        old = [e for e in pool[:n_old] if e.alive]
        self._clip_overlaps(old + [e for e in incoming if e.alive], len(old))

    def _candidates(self, box: tuple[float, float, float, float]) -> list[_Entry]:
        """Pending nuclei whose bounding box meets ``box`` (only they can meet a nucleus
        inside it)."""
        out: list[_Entry] = []
        for bucket in self._buckets.values():
            if bucket.box is None or not _boxes_meet(bucket.box, box):
                continue
            b = bucket.bounds
            meets = (b[:, 0] <= box[2]) & (box[0] <= b[:, 2]) & (b[:, 1] <= box[3]) \
                & (box[1] <= b[:, 3])
            out.extend(e for e, m in zip(bucket.entries, meets) if m and e.alive)
        return out

    def _suppress_duplicates(self, pool: list[_Entry], n_old: int) -> None:
        """Greedy (by rank) removal of duplicates among pairs involving a new nucleus."""
        polys = np.array([e.original for e in pool], dtype=object)
        pairs = _intersecting_pairs(polys, n_old)
        if len(pairs) == 0:
            return
        a, b = polys[pairs[:, 0]], polys[pairs[:, 1]]
        inter = shapely.area(shapely.intersection(a, b))
        area_a, area_b = shapely.area(a), shapely.area(b)
        iou = inter / np.maximum(area_a + area_b - inter, 1e-12)
        contain = inter / np.maximum(np.minimum(area_a, area_b), 1e-12)
        dup = pairs[(iou > self._iou) | (contain > self._contain)]
        neighbours: dict[int, list[int]] = {}
        for i, j in dup:
            neighbours.setdefault(int(i), []).append(int(j))
            neighbours.setdefault(int(j), []).append(int(i))
        for i in sorted(neighbours, key=lambda k: pool[k].priority):
            if not pool[i].alive:
                continue
            for j in neighbours[i]:
                if pool[j].alive and pool[j].priority > pool[i].priority:
                    pool[j].alive = False
                    self.stats.duplicates += 1

    def _clip_overlaps(self, pool: list[_Entry], n_old: int) -> None:
        """Cut each lower-ranked nucleus by the higher-ranked ones it overlaps."""
        polys = np.array([e.nucleus.polygon_l0 for e in pool], dtype=object)
        pairs = _intersecting_pairs(polys, n_old)
        if len(pairs) == 0:
            return
        inter = shapely.area(shapely.intersection(polys[pairs[:, 0]], polys[pairs[:, 1]]))
        higher: dict[int, list[int]] = {}
        for (i, j) in pairs[inter > _OVERLAP_EPS_L0]:
            hi, lo = (i, j) if pool[i].priority < pool[j].priority else (j, i)
            higher.setdefault(int(lo), []).append(int(hi))
        for lo in sorted(higher, key=lambda k: pool[k].priority):
            cutters = [pool[h].nucleus.polygon_l0 for h in higher[lo] if pool[h].alive]
            if cutters:
                self._cut(pool[lo], shapely.union_all(cutters))

    def _cut(self, entry: _Entry, cutter: shapely.Geometry) -> None:
        rest = largest_polygon(entry.nucleus.polygon_l0.difference(cutter))
        floor = max(self._keep_frac * entry.original.area, self._min_area)
        if rest is None or rest.area < floor:
            entry.alive = False
            self.stats.dropped_small += 1
            return
        entry.nucleus = replace(entry.nucleus, polygon_l0=rest)
        self.stats.clipped += 1

    # -- output ------------------------------------------------------------------------------

    def _emit(self, row_is_final: Callable[[int], bool]) -> list[Nucleus]:
        done = [i for i, b in self._buckets.items() if row_is_final(b.row)]
        entries = [e for i in done for e in self._buckets.pop(i).entries if e.alive]
        if not entries:
            return []
        polys = np.array([e.nucleus.polygon_l0 for e in entries], dtype=object)
        xy = shapely.get_coordinates(shapely.centroid(polys))
        keys = [(e.nucleus.tile_index, float(y), float(x), e.seq) for e, (x, y) in zip(entries, xy)]
        order = sorted(range(len(entries)), key=keys.__getitem__)
        self.stats.emitted += len(entries)
        return [entries[k].nucleus for k in order]


def _check_nuclei(nuclei: list[Nucleus], tile: Tile) -> None:
    for n in nuclei:
        if n.tile_index != tile.index:
            raise ValueError(f"nucleus of tile {n.tile_index} added with tile {tile.index}")
        if not isinstance(n.polygon_l0, Polygon):
            raise ValueError(f"nucleus polygon must be a shapely Polygon, got {type(n.polygon_l0)}")
        if not math.isfinite(n.score):
            raise ValueError(f"nucleus score must be finite, got {n.score!r}")
    if not nuclei:
        return
    bounds = shapely.bounds(np.array([n.polygon_l0 for n in nuclei], dtype=object))
    rx0, ry0, rx1, ry1 = tile.read_l0
    t = _BOX_TOL_L0
    outside = ((bounds[:, 0] < rx0 - t) | (bounds[:, 1] < ry0 - t)
               | (bounds[:, 2] > rx1 + t) | (bounds[:, 3] > ry1 + t))  # NaN (empty): False
    if outside.any():
        b = tuple(float(v) for v in bounds[np.argmax(outside)])
        raise ValueError(f"nucleus bounds {b} leave tile {tile.index}'s read box "
                         f"{tile.read_l0}: polygons must come from the tile's pixels")


def _listing_free_order(nuclei: list[Nucleus]) -> list[int]:
    """Order of a tile's nuclei by (y, x) of the centroid, then score and outline: a total
    order that ignores the order the nuclei were listed in."""
    polys = np.array([n.polygon_l0 for n in nuclei], dtype=object)
    xy = shapely.get_coordinates(shapely.centroid(polys)) if len(polys) else np.zeros((0, 2))
    wkb = shapely.to_wkb(polys) if len(polys) else []
    ods = [n.hematoxylin_od for n in nuclei]
    keys = [(float(y), float(x), -n.score, w, math.isnan(od), 0.0 if math.isnan(od) else od)
            for (x, y), n, w, od in zip(xy, nuclei, wkb, ods)]
    return sorted(range(len(nuclei)), key=keys.__getitem__)


def _intersecting_pairs(polys: np.ndarray, first_new: int) -> np.ndarray:
    """(k, 2) index pairs (i < j) of intersecting polygons where j >= first_new."""
    if first_new >= len(polys):
        return np.zeros((0, 2), dtype=np.intp)
    tree = shapely.STRtree(polys)
    src, hit = tree.query(polys[first_new:], predicate="intersects")
    j = src + first_new
    keep = hit < j
    return np.stack([hit[keep], j[keep]], axis=1)


def _release_rows(tiles: tuple[Tile, ...]) -> dict[int, int | None]:
    """For each tile row r: the first row R > r whose arrival makes row r final (None: flush).

    Row r is final when the read boxes of all rows >= R start at or below the lowest read-box
    edge of row r, so no later nucleus can overlap one of row r by a positive area.
    """
    reach: dict[int, int] = {}
    start: dict[int, int] = {}
    for t in tiles:
        reach[t.row] = max(reach.get(t.row, t.read_l0[3]), t.read_l0[3])
        start[t.row] = min(start.get(t.row, t.read_l0[1]), t.read_l0[1])
    rows = sorted(reach)
    suffix_min: dict[int, float] = {}
    low = math.inf
    for r in reversed(rows):
        low = min(low, start[r])
        suffix_min[r] = low
    return {r: next((q for q in rows if q > r and suffix_min[q] >= reach[r]), None) for r in rows}


def _union_box(entries: list[_Entry]) -> tuple[float, float, float, float]:
    b = shapely.bounds(np.array([e.original for e in entries], dtype=object))
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def _boxes_meet(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
