"""Nucleus outlines: bool mask <-> shapely polygon, and coordinate transforms on polygons.

Convention (pixel-edge coordinates): pixel (row r, column c) of a mask whose top-left corner
sits at ``origin_xy = (ox, oy)`` covers the square ``[ox + c, ox + c + 1) x [oy + r, oy + r + 1)``
and its centre is ``(ox + c + 0.5, oy + r + 0.5)``. A polygon traced from a mask follows the
marching-squares iso-line at 0.5, which runs along pixel edges and cuts convex pixel corners;
rasterising a polygon marks the pixels whose centre lies inside it. The two round-trip.

Frames are the caller's business: `mask_to_polygon` returns coordinates in the frame of
``origin_xy`` (e.g. tile pixels), and `transform_polygon` applies a frame conversion such as
`usnet_wsi.tiling.tile_to_l0`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours

__all__ = ["largest_polygon", "mask_to_polygon", "polygon_to_mask", "transform_polygon"]

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
        simplify_px: Douglas-Peucker tolerance (topology preserving), in mask pixels;
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
    padded = np.pad(mask.astype(bool), 1).astype(np.float32)
    if not padded.any():
        return None
    contours = find_contours(padded, 0.5, fully_connected="high")
    rings = [Polygon(c[:, ::-1] - 0.5) for c in contours if len(c) >= 4]
    if not rings:
        return None
    # Even-odd composition: nested rings alternate between outlines and holes.
    geom = reduce(shapely.symmetric_difference, rings)
    poly = largest_polygon(geom)
    if poly is None:
        return None
    if simplify_px > 0:
        poly = largest_polygon(poly.simplify(simplify_px, preserve_topology=True)) or poly
    ox, oy = float(origin_xy[0]), float(origin_xy[1])
    if ox or oy:
        poly = shapely.transform(poly, lambda xy: xy + (ox, oy))
    return poly


def polygon_to_mask(
    poly: shapely.Geometry, shape_hw: tuple[int, int], origin_xy: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """Rasterise a (Multi)Polygon: True for pixels whose centre lies inside it.

    Args:
        poly: polygon in the same frame as ``origin_xy`` (holes are respected).
        shape_hw: (height, width) of the output mask.
        origin_xy: position of the output's top-left pixel corner in the polygon's frame.

    Returns:
        bool array of ``shape_hw``; parts outside the window are cut off.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    out = np.zeros((h, w), dtype=bool)
    if poly is None or poly.is_empty:
        return out
    ox, oy = float(origin_xy[0]), float(origin_xy[1])
    for part in _polygon_parts(poly):
        _fill_ring(out, part.exterior, ox, oy, True)
        for hole in part.interiors:
            _fill_ring(out, hole, ox, oy, False)
    return out


def _fill_ring(out: np.ndarray, ring: shapely.LinearRing, ox: float, oy: float,
               value: bool) -> None:
    xy = np.asarray(ring.coords)
    # skimage.draw puts pixel centres on integer (row, col); ours sit at +0.5.
    rr, cc = draw_polygon(xy[:, 1] - oy - 0.5, xy[:, 0] - ox - 0.5, shape=out.shape)
    out[rr, cc] = value


def transform_polygon(poly: Polygon, fn: CoordFn) -> Polygon:
    """Apply an (N, 2) -> (N, 2) coordinate function (e.g. a frame conversion) to a polygon.

    The function receives float64 ``(x, y)`` rows and must return the same number of rows.
    Validity is kept for the affine maps used between frames (translation and scaling).
    """
    return shapely.transform(poly, lambda xy: np.asarray(fn(xy), dtype=np.float64))
