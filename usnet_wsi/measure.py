"""Per-nucleus measurements with QuPath's names.

Shape measurements are computed on the polygon scaled to micrometres (x by ``mpp_x``, y by
``mpp_y``), so anisotropic pixels are handled exactly. Stain measurements use skimage's
Ruifrok-Johnston H&E-DAB colour deconvolution, reported in optical-density units
(OD = -log10(I / I_max), as QuPath does).
"""

from __future__ import annotations

import math

import numpy as np
import shapely
from scipy.spatial.distance import pdist
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient
from skimage.color import rgb2hed

__all__ = [
    "MEASUREMENT_NAMES",
    "hematoxylin_od_mean",
    "nucleus_measurements",
    "polygon_eccentricity",
    "shape_measurements",
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


def shape_measurements(poly_l0: Polygon, mpp_x: float, mpp_y: float) -> dict[str, float]:
    """Shape measurements of a level-0 polygon, keyed by QuPath's measurement names.

    Area and perimeter (all rings) in µm^2 / µm; circularity = 4*pi*A/P^2; solidity =
    A / convex-hull area; eccentricity from the polygon's second area moments (as skimage
    regionprops does for pixel sets); max caliper = largest distance between convex-hull
    vertices; min caliper = minimum width of the convex hull (rotating calipers).
    Ratios of a zero-area polygon are NaN.
    """
    _check_mpp(mpp_x, mpp_y)
    poly_um = shapely.transform(poly_l0, lambda xy: xy * (float(mpp_x), float(mpp_y)))
    area, perimeter = float(poly_um.area), float(poly_um.length)
    hull = poly_um.convex_hull
    nan = float("nan")
    return {
        AREA: area,
        PERIMETER: perimeter,
        CIRCULARITY: 4.0 * math.pi * area / perimeter**2 if perimeter > 0 else nan,
        SOLIDITY: area / hull.area if hull.area > 0 else nan,
        ECCENTRICITY: polygon_eccentricity(poly_um) if area > 0 else nan,
        MAX_CALIPER: _max_caliper(hull),
        MIN_CALIPER: float(shapely.minimum_width(hull).length),
    }


def nucleus_measurements(
    poly_l0: Polygon, score: float, hematoxylin_od: float, mpp_x: float, mpp_y: float
) -> dict[str, float]:
    """All measurements of one nucleus, in `MEASUREMENT_NAMES` order."""
    values = shape_measurements(poly_l0, mpp_x, mpp_y)
    values[PROBABILITY] = float(score)
    values[HEMATOXYLIN_OD] = float(hematoxylin_od)
    return {name: values[name] for name in MEASUREMENT_NAMES}


def _check_mpp(mpp_x: float, mpp_y: float) -> None:
    for name, value in (("mpp_x", mpp_x), ("mpp_y", mpp_y)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite µm/px, got {value!r}")


def _max_caliper(hull: shapely.Geometry) -> float:
    xy = shapely.get_coordinates(hull)
    return float(pdist(xy).max()) if len(xy) >= 2 else 0.0


def polygon_eccentricity(poly: Polygon) -> float:
    """Eccentricity of the ellipse with the same second area moments as ``poly``.

    sqrt(1 - l2 / l1) with l1 >= l2 the eigenvalues of the area covariance matrix, computed
    exactly from the polygon's vertices (Green's theorem; holes subtract). 0 for a circle.
    """
    poly = orient(poly, sign=1.0)  # exterior counter-clockwise, holes clockwise
    ref = np.asarray(poly.exterior.coords[0])
    sums = np.zeros(6)  # area, Sx, Sy, Sxx, Syy, Sxy (about ref, for precision)
    for ring in (poly.exterior, *poly.interiors):
        sums += _ring_moments(np.asarray(ring.coords) - ref)
    area, sx, sy, sxx, syy, sxy = sums
    cx, cy = sx / area, sy / area
    cov = np.array([[sxx / area - cx * cx, sxy / area - cx * cy],
                    [sxy / area - cx * cy, syy / area - cy * cy]])
    low, high = np.linalg.eigvalsh(cov)
    if high <= 0:
        return 0.0
    return float(math.sqrt(max(0.0, 1.0 - max(low, 0.0) / high)))


def _ring_moments(xy: np.ndarray) -> np.ndarray:
    """Signed area integrals of 1, x, y, x^2, y^2, xy over a closed ring (first == last)."""
    x0, y0, x1, y1 = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]
    cross = x0 * y1 - x1 * y0
    return np.array([
        cross.sum() / 2.0,
        (cross * (x0 + x1)).sum() / 6.0,
        (cross * (y0 + y1)).sum() / 6.0,
        (cross * (x0 * x0 + x0 * x1 + x1 * x1)).sum() / 12.0,
        (cross * (y0 * y0 + y0 * y1 + y1 * y1)).sum() / 12.0,
        (cross * (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0)).sum() / 24.0,
    ])


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
    pixels = rgb[mask][np.newaxis]  # (1, n, 3): deconvolve only the nucleus pixels
    hematoxylin = rgb2hed(pixels)[..., 0]
    return float(hematoxylin.mean() * _SKIMAGE_STAIN_TO_OD)
