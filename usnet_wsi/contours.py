"""Outlines of many masks at once: marching squares over a strip of zero-framed windows.

`masks_to_polygons` returns for each mask exactly what `geometry.mask_to_polygon` returns (the
same rings, vertex for vertex, start vertex and ring order included, hence the same simplified
polygon), but traces all masks of a tile in a few array operations instead of assembling every
outline vertex by vertex in Python (`skimage.measure.find_contours`), and simplifies and
validates the common one-ring outlines in one vectorised shapely call each.

How the rings are found: each mask is laid, with a frame of zeros, side by side with the others
in one strip. Every 2x2 cell of the strip gives up to two directed segments between the
midpoints of its edges (the table below is skimage's for the 0.5 level, "high" connectivity).
For binary masks every segment end is the start of exactly one other segment, so the segments
form disjoint cycles, which never cross a window's zero frame. skimage joins segments in raster
order, so a ring is listed by its first segment and starts at the end of its last segment.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely.geometry import Polygon

from usnet_wsi.geometry import polygon_from_rings

__all__ = ["masks_to_polygons", "trace_strip"]

# Cell edge midpoints: T(op), B(ottom), L(eft), R(ight). Cell case = ul + 2 ur + 4 ll + 8 lr.
_T, _B, _L, _R = 0, 1, 2, 3
_SEGMENTS: dict[int, list[tuple[int, int]]] = {
    1: [(_T, _L)], 2: [(_R, _T)], 3: [(_R, _L)], 4: [(_L, _B)], 5: [(_T, _B)],
    6: [(_L, _T), (_R, _B)], 7: [(_R, _B)], 8: [(_B, _R)], 9: [(_T, _R), (_B, _L)],
    10: [(_B, _T)], 11: [(_B, _L)], 12: [(_L, _R)], 13: [(_T, _R)], 14: [(_L, _T)],
}
_COUNT = np.array([len(_SEGMENTS.get(k, [])) for k in range(16)], np.int64)
_FROM = np.array([[s[0] for s in _SEGMENTS.get(k, [])] + [0] * (2 - int(_COUNT[k]))
                  for k in range(16)], np.int64)
_TO = np.array([[s[1] for s in _SEGMENTS.get(k, [])] + [0] * (2 - int(_COUNT[k]))
                for k in range(16)], np.int64)
# A point id is 2 * pixel + 0 for the midpoint right of a pixel centre (row r, col c + 0.5),
# 2 * pixel + 1 for the one below it (row r + 0.5, col c); per edge: pixel offset and parity.
_PARITY = np.array([0, 0, 1, 1], np.int64)


def trace_strip(strip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed rings of a binary image whose masks each have a zero frame.

    Returns (coords, ring): (P, 2) float64 (row, col) vertices, each ring closed (its first
    vertex repeated last), rings one after the other in skimage's order; and (P,) ring index."""
    a = np.asarray(strip, dtype=np.uint8)
    h, w = a.shape
    case = a[:-1, :-1] + 2 * a[:-1, 1:] + 4 * a[1:, :-1] + 8 * a[1:, 1:]
    cells = np.flatnonzero((case > 0) & (case < 15))
    if len(cells) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    kind = case.ravel()[cells]
    count = _COUNT[kind]
    seg_cell = np.repeat(np.arange(len(cells)), count)
    seg_j = np.arange(len(seg_cell)) - np.repeat(np.cumsum(count) - count, count)
    seg_kind = kind[seg_cell]
    row, col = np.divmod(cells[seg_cell], w - 1)
    pixel = row * w + col
    offset = np.array([0, w, 0, 1], np.int64)
    start = 2 * (pixel + offset[_FROM[seg_kind, seg_j]]) + _PARITY[_FROM[seg_kind, seg_j]]
    end = 2 * (pixel + offset[_TO[seg_kind, seg_j]]) + _PARITY[_TO[seg_kind, seg_j]]
    return _rings(start, end, w)


def _rings(start: np.ndarray, end: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Order the directed segments (point ids, in emission order) into closed rings."""
    ids, frm = np.unique(start, return_inverse=True)
    to = np.searchsorted(ids, end)
    n = len(ids)
    seg_of = np.empty(n, np.int64)
    seg_of[frm] = np.arange(n)                         # the segment leaving each point
    graph = coo_matrix((np.ones(n, np.int8), (frm, to)), shape=(n, n)).tocsr()
    _, comp = connected_components(graph, directed=True, connection="weak")
    n_rings = int(comp.max()) + 1
    first = np.full(n_rings, n, np.int64)
    last = np.full(n_rings, -1, np.int64)
    np.minimum.at(first, comp, seg_of)
    np.maximum.at(last, comp, seg_of)
    ring_start = to[last]                              # the point its last segment ends at
    rank = _distance_from(ring_start, frm, to)
    ring_rank = np.empty(n_rings, np.int64)
    ring_rank[np.argsort(first)] = np.arange(n_rings)  # rings in order of their first segment
    order = np.lexsort((rank, ring_rank[comp]))
    sizes = np.bincount(ring_rank[comp], minlength=n_rings)
    # each ring closed: its start point once more after its last vertex
    ends = np.cumsum(sizes)
    pos = np.insert(order, ends, ring_start[np.argsort(ring_rank)])
    ring = np.repeat(np.arange(n_rings), sizes + 1)
    pid = ids[pos]
    pixel, below = np.divmod(pid, 2)
    r, c = np.divmod(pixel, w)
    coords = np.column_stack([r + 0.5 * below, c + 0.5 * (1 - below)]).astype(np.float64)
    return coords, ring


def _distance_from(roots: np.ndarray, frm: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Steps from its ring's root to every point along the segments (pointer jumping)."""
    n = len(frm)
    prev = np.empty(n, np.int64)
    prev[to] = frm
    prev[roots] = roots
    dist = np.ones(n, np.int64)
    dist[roots] = 0
    while True:
        up = prev[prev]
        if np.array_equal(up, prev):
            return dist
        dist = dist + dist[prev]
        prev = up


def masks_to_polygons(labels: np.ndarray, boxes: Sequence[tuple[slice, slice]],
                      keys: np.ndarray, simplify_px: float = 0.3,
                      pixels: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> list[Polygon | None]:
    """For each label index k in `keys`: `mask_to_polygon(labels[boxes[k]] == k + 1,
    simplify_px=simplify_px)` (in the frame of its box's corner), for all at once. `boxes`:
    `scipy.ndimage.find_objects(labels)`; `pixels`: `np.nonzero(labels)` when known."""
    keys = np.asarray(keys, np.int64)
    if len(keys) == 0:
        return []
    strip, left = _strip(labels, boxes, keys, pixels or np.nonzero(labels))
    coords, ring = trace_strip(strip)
    if len(ring) == 0:
        return [None] * len(keys)
    owner = np.searchsorted(left, coords[:, 1], side="right") - 1   # window of each vertex
    xy = np.column_stack([coords[:, 1] - left[owner], coords[:, 0]]) - 0.5
    ring_owner = owner[np.r_[0, np.flatnonzero(np.diff(ring)) + 1]]
    return _polygons(xy, ring, ring_owner, len(keys), simplify_px)


def _strip(labels: np.ndarray, boxes: Sequence[tuple[slice, slice]], keys: np.ndarray,
           pixels: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The masks side by side, each in a frame of zeros; and the strip column where each
    mask's frame starts."""
    y0 = np.array([boxes[k][0].start for k in keys], np.int64)
    y1 = np.array([boxes[k][0].stop for k in keys], np.int64)
    x0 = np.array([boxes[k][1].start for k in keys], np.int64)
    x1 = np.array([boxes[k][1].stop for k in keys], np.int64)
    width = x1 - x0 + 2
    left = np.cumsum(width) - width
    strip = np.zeros((int((y1 - y0).max()) + 2, int(width.sum())), np.uint8)
    slot = np.full(int(labels.max()) + 1, -1, np.int64)
    slot[keys + 1] = np.arange(len(keys))
    rows, cols = pixels
    s = slot[labels[rows, cols]]
    inside = s >= 0
    rows, cols, s = rows[inside], cols[inside], s[inside]
    strip[rows - y0[s] + 1, cols - x0[s] + 1 + left[s]] = 1
    return strip, left.astype(np.float64)


def _polygons(xy: np.ndarray, ring: np.ndarray, ring_owner: np.ndarray, n: int,
              simplify_px: float) -> list[Polygon | None]:
    """One polygon per mask from its rings: one-ring masks vectorised, others one by one."""
    bounds = np.r_[0, np.flatnonzero(np.diff(ring)) + 1, len(ring)]
    parts = [xy[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    n_rings = np.bincount(ring_owner, minlength=n)
    out: list[Polygon | None] = [None] * n
    single = np.flatnonzero((n_rings == 1)[ring_owner] & (np.diff(bounds) >= 4))
    for r, poly in zip(single, _single_ring_polygons(xy, ring, single, parts, simplify_px)):
        out[ring_owner[r]] = poly
    for k in np.flatnonzero(n_rings > 1):
        out[k] = polygon_from_rings([parts[r] for r in np.flatnonzero(ring_owner == k)],
                                    simplify_px)
    return out


def _single_ring_polygons(xy: np.ndarray, ring: np.ndarray, rings: np.ndarray,
                          parts: list[np.ndarray], simplify_px: float) -> list[Polygon | None]:
    """Polygons of the given one-ring masks; those whose outline or simplification is not
    plainly valid go through `polygon_from_rings` (repairs and the careful simplification)."""
    if len(rings) == 0:
        return []
    pick = np.isin(ring, rings)
    polys = shapely.polygons(shapely.linearrings(
        xy[pick], indices=np.searchsorted(rings, ring[pick])))
    ok = shapely.is_valid(polys) & (shapely.area(polys) > 0)
    simple = polys
    if simplify_px > 0:
        simple = shapely.simplify(polys, simplify_px, preserve_topology=False)
        ok &= (shapely.get_type_id(simple) == 3) & ~shapely.is_empty(simple)
        ok &= shapely.is_valid(simple) & (shapely.area(simple) > 0)
    out: list[Polygon | None] = list(simple)
    for i in np.flatnonzero(~ok):
        out[i] = polygon_from_rings([parts[rings[i]]], simplify_px)
    return out
