"""Nucleus outlines: bool mask <-> shapely polygon, and coordinate transforms on polygons.

Convention (pixel-edge coordinates): pixel (row r, column c) of a mask whose top-left corner
sits at ``origin_xy = (ox, oy)`` covers the square ``[ox + c, ox + c + 1) x [oy + r, oy + r + 1)``
and its centre is ``(ox + c + 0.5, oy + r + 0.5)``. A polygon traced from a mask follows the
marching-squares iso-line at 0.5, which runs along pixel edges and cuts convex pixel corners;
rasterising a polygon marks the pixels whose centre lies strictly inside it (a centre exactly on
the outline is outside; a traced, unsimplified outline never passes through a pixel centre).
The two round-trip. `fill_polygon` is the one rasteriser (masks, label images, pyramid levels
by stride sampling); it tests each candidate centre with `shapely.contains_xy`.

Frames are the caller's business: `mask_to_polygon` returns coordinates in the frame of
``origin_xy`` (e.g. tile pixels), and `transform_polygon` applies a frame conversion such as
`usnet_wsi.tiling.tile_to_l0`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from skimage.measure import find_contours

__all__ = [
    "fill_polygon", "largest_polygon", "mask_to_polygon", "pixel_span", "polygon_from_rings",
    "polygon_to_mask", "transform_polygon",
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


def fill_polygon(out: np.ndarray, poly: shapely.Geometry | None, value: Any = True,
                 origin_xy: tuple[float, float] = (0, 0), stride: int = 1) -> int:
    """Write ``value`` into ``out`` at the pixels whose sample point lies strictly inside ``poly``.

    Pixel ``out[r, c]`` samples the point ``(ox + c * stride + 0.5, oy + r * stride + 0.5)`` of
    the polygon's frame: with stride 1 that is the pixel's centre when ``origin_xy`` is the
    position of ``out``'s top-left pixel corner; with stride ``2**k`` and ``origin_xy`` a
    level-0 position, ``out`` is a window of pyramid level k (stride sampling of level 0).
    Holes are respected; pixels outside the polygon keep their value, so polygons filled later
    overwrite earlier ones. Parts outside the window are cut off. Returns the pixels written.
    """
    if poly is None or poly.is_empty:
        return 0
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return sum(_fill_part(out, part, value, (float(origin_xy[0]), float(origin_xy[1])),
                          int(stride)) for part in _polygon_parts(poly))


def _fill_part(out: np.ndarray, part: Polygon, value: Any, origin_xy: tuple[float, float],
               stride: int) -> int:
    minx, miny, maxx, maxy = part.bounds
    ox, oy = origin_xy
    # One pixel of slack each side: the exact test below decides, rounding cannot lose a pixel.
    r_lo, r_hi = pixel_span(miny, maxy, oy, stride)
    c_lo, c_hi = pixel_span(minx, maxx, ox, stride)
    r_lo, c_lo = max(r_lo - 1, 0), max(c_lo - 1, 0)
    r_hi, c_hi = min(r_hi + 1, out.shape[0]), min(c_hi + 1, out.shape[1])
    if r_lo >= r_hi or c_lo >= c_hi:
        return 0
    xs = np.arange(c_lo, c_hi, dtype=np.float64) * stride + (ox + 0.5)
    ys = np.arange(r_lo, r_hi, dtype=np.float64) * stride + (oy + 0.5)
    inside = shapely.contains_xy(part, xs[None, :], ys[:, None])
    out[r_lo:r_hi, c_lo:c_hi][inside] = value
    return int(np.count_nonzero(inside))


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
