"""Per-nucleus measurements with QuPath's names.

Shape measurements are computed on the polygon scaled to micrometres (x by ``mpp_x``, y by
``mpp_y``), so anisotropic pixels are handled exactly. Stain measurements use skimage's
Ruifrok-Johnston H&E-DAB colour deconvolution, reported in optical-density units
(OD = -log10(I / I_max), as QuPath does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry import Polygon
from skimage.color import rgb2hed

__all__ = [
    "MEASUREMENT_NAMES",
    "eccentricities",
    "hematoxylin_od",
    "hematoxylin_od_mean",
    "measurement_rows",
    "nucleus_measurements",
    "polygon_eccentricity",
    "shape_measurements",
    "shape_table",
]

PROBABILITY = "Detection probability"
AREA = "Nucleus: Area µm^2"
PERIMETER = "Nucleus: Perimeter µm"
CIRCULARITY = "Nucleus: Circularity"
SOLIDITY = "Nucleus: Solidity"
ECCENTRICITY = "Nucleus: Eccentricity"
MAX_CALIPER = "Nucleus: Max caliper µm"
MIN_CALIPER = "Nucleus: Min caliper µm"
HEMATOXYLIN_OD = "Hematoxylin OD mean"

MEASUREMENT_NAMES: tuple[str, ...] = (
    PROBABILITY, AREA, PERIMETER, CIRCULARITY, SOLIDITY, ECCENTRICITY, MAX_CALIPER,
    MIN_CALIPER, HEMATOXYLIN_OD,
)

# skimage.color.separate_stains divides natural-log OD by ln(1e-6): its output is
# -log10(I) / 6. Multiplying by 6 gives optical density in the usual base-10 units.
_SKIMAGE_STAIN_TO_OD = -math.log10(1e-6)


def shape_table(polys_l0: Sequence[Polygon], mpp_x: float, mpp_y: float) -> dict[str, np.ndarray]:
    """Shape measurements of many level-0 polygons at once, keyed by QuPath's names.

    Area and perimeter (all rings) in µm^2 / µm; circularity = 4*pi*A/P^2; solidity =
    A / convex-hull area; eccentricity from the polygon's second area moments (as skimage
    regionprops does for pixel sets); max caliper = largest distance between convex-hull
    vertices; min caliper = minimum width of the convex hull (rotating calipers). Computed on
    the polygons scaled to micrometres, so anisotropic pixels are exact. Ratios of a zero-area
    polygon are NaN.
    """
    _check_mpp(mpp_x, mpp_y)
    geoms = np.asarray(polys_l0, dtype=object).reshape(-1)
    um = shapely.transform(geoms, lambda xy: xy * (float(mpp_x), float(mpp_y)))
    area, perimeter = shapely.area(um), shapely.length(um)
    hull = shapely.convex_hull(um)
    hull_area = shapely.area(hull)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            AREA: area,
            PERIMETER: perimeter,
            CIRCULARITY: np.where(perimeter > 0, 4.0 * math.pi * area / perimeter**2, np.nan),
            SOLIDITY: np.where(hull_area > 0, area / hull_area, np.nan),
            ECCENTRICITY: np.where(area > 0, eccentricities(um), np.nan),
            MAX_CALIPER: _max_calipers(hull),
            MIN_CALIPER: shapely.length(shapely.minimum_width(hull)),
        }


def shape_measurements(poly_l0: Polygon, mpp_x: float, mpp_y: float) -> dict[str, float]:
    """`shape_table` of one polygon."""
    return {k: float(v[0]) for k, v in shape_table([poly_l0], mpp_x, mpp_y).items()}


def measurement_rows(polys_l0: Sequence[Polygon], scores: Sequence[float],
                     hematoxylin_od: Sequence[float], mpp_x: float,
                     mpp_y: float) -> list[dict[str, float]]:
    """All measurements of many nuclei, one dict per nucleus in `MEASUREMENT_NAMES` order."""
    if len(polys_l0) == 0:
        return []
    table = shape_table(polys_l0, mpp_x, mpp_y)
    table[PROBABILITY] = np.asarray(scores, dtype=np.float64)
    table[HEMATOXYLIN_OD] = np.asarray(hematoxylin_od, dtype=np.float64)
    columns = [table[name].tolist() for name in MEASUREMENT_NAMES]
    return [dict(zip(MEASUREMENT_NAMES, row)) for row in zip(*columns)]


def nucleus_measurements(
    poly_l0: Polygon, score: float, hematoxylin_od: float, mpp_x: float, mpp_y: float
) -> dict[str, float]:
    """All measurements of one nucleus, in `MEASUREMENT_NAMES` order."""
    return measurement_rows([poly_l0], [score], [hematoxylin_od], mpp_x, mpp_y)[0]


def _check_mpp(mpp_x: float, mpp_y: float) -> None:
    for name, value in (("mpp_x", mpp_x), ("mpp_y", mpp_y)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite µm/px, got {value!r}")


def _max_calipers(hulls: np.ndarray) -> np.ndarray:
    """Largest distance between the vertices of each hull: all pairs of a group of hulls at
    once, groups of similar vertex counts bounded to about `_PAIR_BUDGET` pairs."""
    xy, index = shapely.get_coordinates(hulls, return_index=True)
    counts = np.bincount(index, minlength=len(hulls))
    starts = np.concatenate(([0], np.cumsum(counts)))
    out = np.zeros(len(hulls))
    order = np.argsort(counts, kind="stable")
    lo = int(np.searchsorted(counts[order], 2))           # fewer than 2 vertices: 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and (hi - lo + 1) * int(counts[order[hi]]) ** 2 <= _PAIR_BUDGET:
            hi += 1
        out[order[lo:hi]] = _group_max_distance(xy, starts, counts, order[lo:hi])
        lo = hi
    return out


_PAIR_BUDGET = 1 << 16     # pairs per group: its arrays stay in the CPU caches


def _group_max_distance(xy: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                        group: np.ndarray) -> np.ndarray:
    """Max vertex distance of the hulls `group`, padded by repeating each hull's first vertex
    (a repeated vertex adds no new distance). sqrt of the largest squared distance, which is
    the largest of the square roots."""
    k = np.arange(int(counts[group].max()))
    take = starts[group, None] + np.where(k < counts[group, None], k, 0)
    pts = xy[take]                                         # (g, m, 2)
    dx = pts[:, :, None, 0] - pts[:, None, :, 0]
    dy = pts[:, :, None, 1] - pts[:, None, :, 1]
    return np.sqrt((dx * dx + dy * dy).max(axis=(1, 2)))


def eccentricities(polys: np.ndarray) -> np.ndarray:
    """Eccentricity of the ellipse with the same second area moments as each polygon:
    sqrt(1 - l2 / l1), l1 >= l2 the eigenvalues of the area covariance matrix, computed exactly
    from the vertices (Green's theorem; holes subtract). 0 for a circle."""
    oriented = shapely.orient_polygons(polys, exterior_cw=False)   # holes clockwise
    rings, ring_poly = shapely.get_rings(oriented, return_index=True)
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    ref = np.zeros((len(polys), 2))
    first = np.searchsorted(ring_poly, np.arange(len(polys)))
    has = first < len(ring_poly)
    ref[has] = shapely.get_coordinates(shapely.get_point(rings[first[has]], 0))
    xy = xy - ref[ring_poly[ring_of]]                    # about a vertex, for precision
    same = ring_of[1:] == ring_of[:-1]
    x0, y0, x1, y1 = xy[:-1, 0][same], xy[:-1, 1][same], xy[1:, 0][same], xy[1:, 1][same]
    owner = ring_poly[ring_of[1:][same]]
    cross = x0 * y1 - x1 * y0
    terms = (cross / 2, cross * (x0 + x1) / 6, cross * (y0 + y1) / 6,
             cross * (x0 * x0 + x0 * x1 + x1 * x1) / 12,
             cross * (y0 * y0 + y0 * y1 + y1 * y1) / 12,
             cross * (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) / 24)
    area, sx, sy, sxx, syy, sxy = (np.bincount(owner, t, minlength=len(polys)) for t in terms)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx, cy = sx / area, sy / area
        a, c = sxx / area - cx * cx, syy / area - cy * cy
        b = sxy / area - cx * cy
    half = np.sqrt(((a - c) / 2) ** 2 + b * b)
    high, low = (a + c) / 2 + half, np.maximum((a + c) / 2 - half, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.sqrt(np.maximum(0.0, 1.0 - low / high))
    return np.where(high > 0, ecc, 0.0)


def polygon_eccentricity(poly: Polygon) -> float:
    """`eccentricities` of one polygon."""
    return float(eccentricities(np.array([poly], dtype=object))[0])


def hematoxylin_od_mean(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Mean hematoxylin optical density (base-10 OD units) of the RGB pixels under ``mask``.

    Args:
        rgb: (h, w, 3) RGB image, uint8 (0-255) or float (0-1).
        mask: bool (h, w), True inside the nucleus.

    Returns:
        The mean of skimage's `rgb2hed` hematoxylin channel over the mask, in OD units
        (negative stain amounts are clipped to 0 as skimage does); NaN for an empty mask.
    """
    rgb, mask = np.asarray(rgb), np.asarray(mask, dtype=bool)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != mask.shape:
        raise ValueError(
            "rgb must be (h, w, 3) and mask (h, w) of the same h, w; "
            f"got {rgb.shape} and {mask.shape}"
        )
    if not mask.any():
        return float("nan")
    return float(hematoxylin_od(rgb[mask]).mean())


def hematoxylin_od(pixels: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (base-10 OD units) of (n, 3) RGB pixels (deconvolved
    alone, not as an image)."""
    if len(pixels) == 0:
        return np.zeros(0)
    return rgb2hed(np.asarray(pixels)[np.newaxis])[0, :, 0] * _SKIMAGE_STAIN_TO_OD
