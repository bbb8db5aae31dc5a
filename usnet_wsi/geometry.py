"""Nucleus outlines: bool mask <-> shapely polygon, and coordinate transforms on polygons.

Convention (pixel-edge coordinates): pixel (row r, column c) of a mask whose top-left corner
sits at ``origin_xy = (ox, oy)`` covers the square ``[ox + c, ox + c + 1) x [oy + r, oy + r + 1)``
and its centre is ``(ox + c + 0.5, oy + r + 0.5)``. A polygon traced from a mask follows the
marching-squares iso-line at 0.5, which runs along pixel edges and cuts convex pixel corners;
rasterising a polygon marks the pixels whose centre lies strictly inside it (a centre exactly on
the outline is outside; a traced, unsimplified outline never passes through a pixel centre).
The two round-trip. Rasterising has one definition (masks, label images, pyramid levels by
stride sampling): `fill_polygon` tests each candidate centre of one polygon with
`shapely.contains_xy`; `fill_polygons` gives the same pixels for many polygons at once by an
even-odd scanline fill, handing the rare polygon whose outline passes within 1e-7 px of a
sample point to `shapely.contains_xy`.

Frames are the caller's business: `mask_to_polygon` returns coordinates in the frame of
``origin_xy`` (e.g. tile pixels), and `transform_polygon` applies a frame conversion such as
`usnet_wsi.tiling.tile_to_l0`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from skimage.measure import find_contours

__all__ = [
    "fill_polygon", "fill_polygons", "largest_polygon", "mask_to_polygon", "pixel_span",
    "pixel_spans", "polygon_from_rings", "polygon_to_mask", "transform_polygon",
]

CoordFn = Callable[[np.ndarray], np.ndarray]


def largest_polygon(geom: shapely.Geometry | None) -> Polygon | None:
    """Return the largest-area valid Polygon part of ``geom`` (None when it has no area).

    Invalid input is repaired with `shapely.make_valid` first; MultiPolygons and geometry
    collections keep their largest polygonal part, so the result is always a simple,
    valid Polygon (possibly with holes) or None.
    """
    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts = [p for p in _polygon_parts(geom) if p.area > 0.0]
    if not parts:
        return None
    # max() keeps the first of equal areas: deterministic for a given input.
    return max(parts, key=lambda p: p.area)


def _polygon_parts(geom: shapely.Geometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    if hasattr(geom, "geoms"):  # GeometryCollection from make_valid / difference
        return [p for g in geom.geoms for p in _polygon_parts(g)]
    return []


def mask_to_polygon(
    mask: np.ndarray, origin_xy: tuple[float, float] = (0, 0), simplify_px: float = 0.3
) -> Polygon | None:
    """Outline the largest connected part of a bool mask as a valid Polygon.

    Args:
        mask: 2-D array, truthy inside the nucleus.
        origin_xy: position of the mask's top-left pixel corner in the output frame.
        simplify_px: Douglas-Peucker tolerance in mask pixels (plain Douglas-Peucker, or the
            topology-preserving variant where the plain one would give an invalid outline);
            0 keeps every marching-squares vertex. The default stays below 0.35 px, the
            smallest distance from a pixel centre to the traced outline, so simplifying
            (about 3x fewer vertices) practically never changes which pixels are inside;
            0.5 visibly shaves thin shapes.

    Returns:
        The polygon in pixel-edge coordinates of the ``origin_xy`` frame (holes kept), or None
        for an empty mask. Diagonally touching pixels count as connected (8-connectivity).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w), got shape {mask.shape}")
    if not mask.any():
        return None
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.float32)
    padded[1:-1, 1:-1] = mask.astype(bool)
    contours = find_contours(padded, 0.5, fully_connected="high")
    poly = polygon_from_rings([c[:, ::-1] - 0.5 for c in contours], simplify_px)
    ox, oy = float(origin_xy[0]), float(origin_xy[1])
    if poly is not None and (ox or oy):
        poly = shapely.transform(poly, lambda xy: xy + (ox, oy))
    return poly


def polygon_from_rings(rings_xy: list[np.ndarray], simplify_px: float) -> Polygon | None:
    """The polygon `mask_to_polygon` makes of a mask's traced rings ((n, 2) closed x, y
    vertex arrays): nested rings composed even-odd (outlines and holes), the largest valid
    part kept, then simplified."""
    rings = [Polygon(c) for c in rings_xy if len(c) >= 4]
    if not rings:
        return None
    geom = reduce(shapely.symmetric_difference, rings)
    poly = largest_polygon(geom)
    if poly is None:
        return None
    if simplify_px > 0:
        poly = _simplified(poly, simplify_px)
    return poly


def pixel_span(lo: float, hi: float, origin: float = 0.0, stride: int = 1) -> tuple[int, int]:
    """Half-open range of pixel indices i whose sample point ``origin + i * stride + 0.5`` lies
    strictly between lo and hi (e.g. the rows a polygon with y-bounds lo, hi can cover)."""
    s = int(stride)
    return (math.floor((lo - origin - 0.5) / s) + 1, math.ceil((hi - origin - 0.5) / s))


def pixel_spans(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`pixel_span` (origin 0, stride 1) of many (lo, hi) pairs at once: int64 starts, ends."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return np.floor(lo - 0.5).astype(np.int64) + 1, np.ceil(hi - 0.5).astype(np.int64)


def fill_polygon(out: np.ndarray, poly: shapely.Geometry | None, value: Any = True,
                 origin_xy: tuple[float, float] = (0, 0), stride: int = 1) -> int:
    """Write ``value`` into ``out`` at the pixels whose sample point lies strictly inside ``poly``.

    Pixel ``out[r, c]`` samples the point ``(ox + c * stride + 0.5, oy + r * stride + 0.5)`` of
    the polygon's frame: with stride 1 that is the pixel's centre when ``origin_xy`` is the
    position of ``out``'s top-left pixel corner; with stride ``2**k`` and ``origin_xy`` a
    level-0 position, ``out`` is a window of pyramid level k (stride sampling of level 0).
    Holes are respected; pixels outside the polygon keep their value. Parts outside the window
    are cut off. Returns the pixels written. (`fill_polygons` gives the same pixels for many
    polygons at once, faster.)
    """
    if poly is None or poly.is_empty:
        return 0
    grid = _Grid.of(out, origin_xy, stride)
    r_lo, c_lo, inside = _inside_window(grid, poly)
    out[r_lo:r_lo + inside.shape[0], c_lo:c_lo + inside.shape[1]][inside] = value
    return int(np.count_nonzero(inside))


def fill_polygons(out: np.ndarray, polys: Sequence[shapely.Geometry | None],
                  values: Sequence[Any], origin_xy: tuple[float, float] = (0, 0),
                  stride: int = 1) -> int:
    """`fill_polygon` for each polygon in turn (later ones overwrite earlier ones where they
    overlap), for all of them at once: an even-odd scanline fill of every ring's edges at the
    sample rows. A polygon whose outline passes within 1e-7 of a sample point (where float
    arithmetic could place a point on the outline inside) is decided by
    `shapely.contains_xy` instead, so the pixels are exactly those whose sample point is
    strictly inside. Returns the pixels written (counted once per polygon)."""
    grid = _Grid.of(out, origin_xy, stride)
    polys = np.asarray([p if p is not None else shapely.Polygon() for p in polys], dtype=object)
    if len(polys) != len(values):
        raise ValueError(f"{len(polys)} polygons but {len(values)} values")
    parts, owner = shapely.get_parts(polys, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    vertex_owner = owner[ring_part[ring]]
    same = ring[:-1] == ring[1:]
    a, b, edge_owner = xy[:-1][same], xy[1:][same], vertex_owner[:-1][same]
    exact = np.zeros(len(polys), bool)
    exact[vertex_owner[grid.at_point(xy)]] = True
    exact[edge_owner[(a[:, 1] == b[:, 1]) & grid.on_row(a[:, 1])]] = True
    flat, poly_of = _scan_spans(grid, a, b, edge_owner, exact)
    if exact.any():
        more = [_inside_pixels(grid, polys[k], k) for k in np.flatnonzero(exact)]
        flat = np.concatenate([flat] + [m[0] for m in more])
        poly_of = np.concatenate([poly_of] + [m[1] for m in more])
    _paint_in_order(out, flat, poly_of, values)
    return int(len(flat))


@dataclass(frozen=True)
class _Grid:
    """Sample points of `out`: x = ox + c * stride + 0.5, y = oy + r * stride + 0.5."""

    shape: tuple[int, int]
    ox: float
    oy: float
    stride: int

    @classmethod
    def of(cls, out: np.ndarray, origin_xy: tuple[float, float], stride: int) -> "_Grid":
        if int(stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        return cls(out.shape, float(origin_xy[0]), float(origin_xy[1]), int(stride))

    def col(self, x: np.ndarray) -> np.ndarray:
        """Fractional column index of frame x (exact for power-of-two strides)."""
        return (x - (self.ox + 0.5)) / self.stride

    def row(self, y: np.ndarray) -> np.ndarray:
        return (y - (self.oy + 0.5)) / self.stride

    def on_row(self, y: np.ndarray) -> np.ndarray:
        """Within `_TIE` of a sample row."""
        return _near_integer(self.row(y), _TIE / self.stride)

    def at_point(self, xy: np.ndarray) -> np.ndarray:
        """Within `_TIE` of a sample point (the scanline cannot tell that a vertex there is on
        the outline; points on a horizontal edge are found with `on_row`)."""
        return self.on_row(xy[:, 1]) & _near_integer(self.col(xy[:, 0]), _TIE / self.stride)


_TIE = 1e-7     # frame units: closer than this to a sample point is decided by GEOS


def _near_integer(v: np.ndarray, tol: float) -> np.ndarray:
    return np.abs(v - np.round(v)) < tol


def _scan_spans(grid: _Grid, a: np.ndarray, b: np.ndarray, edge_owner: np.ndarray,
                exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel indices strictly inside each polygon (even-odd over its rings' edges) and the
    polygon of each; polygons with a crossing within `_TIE` of a sample point are marked in
    `exact` (in place) and left out."""
    h, w = grid.shape
    ya, yb = a[:, 1], b[:, 1]
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    r0 = np.clip(np.floor(grid.row(lo)), 0, h).astype(np.int64)       # one row of slack:
    r1 = np.clip(np.floor(grid.row(hi)) + 1, 0, h).astype(np.int64)   # decided exactly below
    edge, r = _expand(r0, np.maximum(r1 - r0, 0))
    ys = grid.oy + r * grid.stride + 0.5
    keep = (ys >= lo[edge]) & (ys < hi[edge])                          # half-open in y
    edge, r, ys = edge[keep], r[keep], ys[keep]
    t = (ys - ya[edge]) / (yb[edge] - ya[edge])
    xc = grid.col(a[edge, 0] + t * (b[edge, 0] - a[edge, 0]))
    poly = edge_owner[edge]
    exact[poly[_near_integer(xc, _TIE / grid.stride)]] = True
    order = np.lexsort((xc, poly * grid.shape[0] + r))
    xc, r, poly = xc[order], r[order], poly[order]
    c0 = np.clip(np.floor(xc[0::2]) + 1, 0, w).astype(np.int64)      # strictly right of entry
    c1 = np.clip(np.ceil(xc[1::2]), 0, w).astype(np.int64)           # strictly left of exit
    span, col = _expand(c0, np.maximum(c1 - c0, 0))
    poly = poly[0::2][span]
    good = ~exact[poly]
    return (r[0::2][span] * w + col)[good], poly[good]


def _expand(start: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, start[i] + j) for every i and j < count[i]."""
    i = np.repeat(np.arange(len(count)), count)
    j = np.arange(len(i)) - np.repeat(np.cumsum(count) - count, count)
    return i, start[i] + j


def _inside_window(grid: _Grid, poly: shapely.Geometry) -> tuple[int, int, np.ndarray]:
    """(row, column, bool mask) of the window around `poly` whose sample points
    `shapely.contains_xy` puts strictly inside it."""
    minx, miny, maxx, maxy = poly.bounds
    h, w = grid.shape
    r_lo, r_hi = pixel_span(miny, maxy, grid.oy, grid.stride)
    c_lo, c_hi = pixel_span(minx, maxx, grid.ox, grid.stride)
    # One pixel of slack each side: the exact test below decides, rounding cannot lose a pixel.
    r_lo, c_lo = min(max(r_lo - 1, 0), h), min(max(c_lo - 1, 0), w)
    r_hi, c_hi = max(min(r_hi + 1, h), r_lo), max(min(c_hi + 1, w), c_lo)
    xs = np.arange(c_lo, c_hi, dtype=np.float64) * grid.stride + (grid.ox + 0.5)
    ys = np.arange(r_lo, r_hi, dtype=np.float64) * grid.stride + (grid.oy + 0.5)
    return r_lo, c_lo, shapely.contains_xy(poly, xs[None, :], ys[:, None])


def _inside_pixels(grid: _Grid, poly: shapely.Geometry, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the pixels `_inside_window` finds, and k for each."""
    r_lo, c_lo, inside = _inside_window(grid, poly)
    rr, cc = np.nonzero(inside)
    flat = (rr + r_lo).astype(np.int64) * grid.shape[1] + (cc + c_lo)
    return flat, np.full(len(flat), k, np.int64)


def _paint_in_order(out: np.ndarray, flat: np.ndarray, poly: np.ndarray,
                    values: Sequence[Any]) -> None:
    """out.flat[flat] = values[poly] (flat indices of a C-ordered `out`; any strides), the
    highest polygon index winning where pixels repeat."""
    if not len(flat):
        return
    if (poly != poly[0]).any():                 # several polygons: they may claim one pixel
        base = int(flat.min())
        claim = np.full(int(flat.max()) - base + 1, -1, np.int32)
        claim[flat - base] = poly
        lost = claim[flat - base] != poly       # pixels claimed more than once
        if lost.any():
            np.maximum.at(claim, flat[lost] - base, poly[lost])
            winner = claim[flat - base] == poly
            flat, poly = flat[winner], poly[winner]
    vals = np.asarray(values)[poly]
    if out.flags.c_contiguous:
        out.reshape(-1)[flat] = vals
    else:
        rows, cols = np.divmod(flat, out.shape[1])
        out[rows, cols] = vals


def _simplified(poly: Polygon, tolerance: float) -> Polygon:
    """Plain Douglas-Peucker (fast) when its result is a valid polygon, else the slower
    topology-preserving simplification."""
    fast = poly.simplify(tolerance, preserve_topology=False)
    if isinstance(fast, Polygon) and not fast.is_empty and fast.is_valid and fast.area > 0:
        return fast
    return largest_polygon(poly.simplify(tolerance, preserve_topology=True)) or poly


def polygon_to_mask(
    poly: shapely.Geometry, shape_hw: tuple[int, int], origin_xy: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """Rasterise a (Multi)Polygon: True for pixels whose centre lies strictly inside it.

    Args:
        poly: polygon in the same frame as ``origin_xy`` (holes are respected).
        shape_hw: (height, width) of the output mask.
        origin_xy: position of the output's top-left pixel corner in the polygon's frame.

    Returns:
        bool array of ``shape_hw``; parts outside the window are cut off (see `fill_polygon`).
    """
    out = np.zeros((int(shape_hw[0]), int(shape_hw[1])), dtype=bool)
    fill_polygon(out, poly, True, origin_xy)
    return out


def transform_polygon(poly: Polygon, fn: CoordFn) -> Polygon:
    """Apply an (N, 2) -> (N, 2) coordinate function (e.g. a frame conversion) to a polygon.

    The function receives float64 ``(x, y)`` rows and must return the same number of rows.
    Validity is kept for the affine maps used between frames (translation and scaling).
    """
    return shapely.transform(poly, lambda xy: np.asarray(fn(xy), dtype=np.float64))
