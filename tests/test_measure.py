"""Measurements against analytic shapes and pure-stain colours (usnet_wsi.measure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely.geometry import Polygon, box
from skimage.color import hed_from_rgb, rgb_from_hed
from skimage.measure import regionprops

from usnet_wsi.geometry import polygon_to_mask
from usnet_wsi.measure import (
    MEASUREMENT_NAMES,
    hematoxylin_od_mean,
    nucleus_measurements,
    polygon_eccentricity,
    shape_measurements,
)

QUPATH_NAMES = (
    "Detection probability", "Nucleus: Area µm^2", "Nucleus: Perimeter µm",
    "Nucleus: Circularity", "Nucleus: Solidity", "Nucleus: Eccentricity",
    "Nucleus: Max caliper µm", "Nucleus: Min caliper µm", "Hematoxylin OD mean",
)


def _ellipse_um(a: float, b: float, n: int, angle: float = 0.0) -> np.ndarray:
    """Vertices (µm) of the n-gon inscribed in an ellipse with semi-axes a >= b."""
    t = 2 * np.pi * np.arange(n) / n
    x, y = a * np.cos(t), b * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([x * ca - y * sa, x * sa + y * ca], axis=1) + 500.0


def _to_pixels(xy_um: np.ndarray, mpp_x: float, mpp_y: float) -> Polygon:
    return Polygon(xy_um / (mpp_x, mpp_y))


@pytest.mark.parametrize("mpp_x, mpp_y", [(0.25, 0.25), (0.5, 0.2)])
def test_circle_regular_polygon_exact_and_close_to_circle(mpp_x, mpp_y):
    r, n = 5.0, 256
    m = shape_measurements(_to_pixels(_ellipse_um(r, r, n), mpp_x, mpp_y), mpp_x, mpp_y)
    # Exact values of the regular n-gon inscribed in the circle (pixels scaled back to µm).
    area_ngon = 0.5 * n * r * r * math.sin(2 * math.pi / n)
    perim_ngon = 2 * n * r * math.sin(math.pi / n)
    assert m["Nucleus: Area µm^2"] == pytest.approx(area_ngon, rel=1e-9)
    assert m["Nucleus: Perimeter µm"] == pytest.approx(perim_ngon, rel=1e-9)
    circularity = 4 * math.pi * area_ngon / perim_ngon**2
    assert m["Nucleus: Circularity"] == pytest.approx(circularity, rel=1e-9)
    assert m["Nucleus: Max caliper µm"] == pytest.approx(2 * r, rel=1e-9)          # n even
    assert m["Nucleus: Min caliper µm"] == pytest.approx(2 * r * math.cos(math.pi / n), rel=1e-9)
    assert m["Nucleus: Solidity"] == pytest.approx(1.0, abs=1e-12)
    assert m["Nucleus: Eccentricity"] == pytest.approx(0.0, abs=1e-5)
    # ...and within the n-gon's deviation (relative error ~ (pi/n)^2) of the true circle.
    tol = 2 * (math.pi / n) ** 2
    assert m["Nucleus: Area µm^2"] == pytest.approx(math.pi * r * r, rel=tol)
    assert m["Nucleus: Perimeter µm"] == pytest.approx(2 * math.pi * r, rel=tol)
    assert m["Nucleus: Circularity"] == pytest.approx(1.0, rel=tol)


@pytest.mark.parametrize("angle", [0.0, 0.3, math.pi / 4])
def test_rectangle_anisotropic_pixels(angle):
    w, h, mpp_x, mpp_y = 12.0, 4.0, 0.5, 0.25
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    m = shape_measurements(_to_pixels(corners @ rot.T + 100.0, mpp_x, mpp_y), mpp_x, mpp_y)
    assert m["Nucleus: Area µm^2"] == pytest.approx(w * h, rel=1e-9)
    assert m["Nucleus: Perimeter µm"] == pytest.approx(2 * (w + h), rel=1e-9)
    circularity = 4 * math.pi * w * h / (2 * (w + h)) ** 2
    assert m["Nucleus: Circularity"] == pytest.approx(circularity, rel=1e-9)
    assert m["Nucleus: Solidity"] == pytest.approx(1.0, rel=1e-9)
    assert m["Nucleus: Max caliper µm"] == pytest.approx(math.hypot(w, h), rel=1e-9)
    assert m["Nucleus: Min caliper µm"] == pytest.approx(h, rel=1e-9)
    # Uniform rectangle: variances w^2/12 and h^2/12 along its axes.
    assert m["Nucleus: Eccentricity"] == pytest.approx(math.sqrt(1 - (h / w) ** 2), rel=1e-9)


@pytest.mark.parametrize("a, b", [(6.0, 3.0), (5.0, 4.5), (9.0, 1.5)])
def test_ellipse_eccentricity_is_exact_for_inscribed_polygon(a, b):
    # An inscribed n-gon of an ellipse is the affine image of a regular n-gon, whose second
    # moments are isotropic: its eccentricity equals the ellipse's exactly.
    mpp_x, mpp_y = 0.3, 0.2
    poly = _to_pixels(_ellipse_um(a, b, 64, angle=0.7), mpp_x, mpp_y)
    m = shape_measurements(poly, mpp_x, mpp_y)
    assert m["Nucleus: Eccentricity"] == pytest.approx(math.sqrt(1 - (b / a) ** 2), rel=1e-9)
    assert m["Nucleus: Max caliper µm"] == pytest.approx(2 * a, rel=2 * (math.pi / 64) ** 2)
    assert m["Nucleus: Min caliper µm"] == pytest.approx(2 * b, rel=2 * (math.pi / 64) ** 2)


def test_eccentricity_agrees_with_regionprops_on_a_raster():
    poly = Polygon(_ellipse_um(30.0, 18.0, 128, angle=0.4) - 440.0)  # pixels, within 120 x 120
    mask = polygon_to_mask(poly, (120, 120))
    ecc_pixels = regionprops(mask.astype(np.uint8))[0].eccentricity
    # Pixelisation perturbs the moments by O(1 / radius); allow a few percent.
    assert polygon_eccentricity(poly) == pytest.approx(ecc_pixels, abs=0.02)


def test_concave_shape_and_hole():
    ell = Polygon([(0, 0), (2, 0), (2, 1), (1, 1), (1, 2), (0, 2)])  # L of 3 unit squares
    m = shape_measurements(ell, 1.0, 1.0)
    assert m["Nucleus: Area µm^2"] == pytest.approx(3.0)
    assert m["Nucleus: Solidity"] == pytest.approx(3.0 / 3.5)
    ring = box(0, 0, 10, 10).difference(box(4, 4, 6, 6))
    m = shape_measurements(ring, 2.0, 2.0)
    assert m["Nucleus: Area µm^2"] == pytest.approx(4 * (100 - 4))
    assert m["Nucleus: Perimeter µm"] == pytest.approx(2 * (40 + 8))  # both rings count
    assert m["Nucleus: Eccentricity"] == pytest.approx(0.0, abs=1e-9)
    # Removing an off-centre hole breaks the symmetry.
    assert polygon_eccentricity(box(0, 0, 10, 10).difference(box(1, 1, 3, 9))) > 0.1


def test_names_and_order_are_qupaths():
    assert MEASUREMENT_NAMES == QUPATH_NAMES
    poly = Polygon(_ellipse_um(4.0, 3.0, 32))
    values = nucleus_measurements(poly, score=0.75, hematoxylin_od=0.4, mpp_x=1.0, mpp_y=1.0)
    assert tuple(values) == QUPATH_NAMES
    assert values["Detection probability"] == 0.75
    assert values["Hematoxylin OD mean"] == 0.4
    assert set(shape_measurements(poly, 1.0, 1.0)) == set(QUPATH_NAMES[1:-1])


@pytest.mark.parametrize("mpp", [0.0, -1.0, math.nan, math.inf])
def test_bad_mpp_is_rejected(mpp):
    with pytest.raises(ValueError, match="mpp_x"):
        shape_measurements(box(0, 0, 1, 1), mpp, 1.0)


def _stain_rgb(conc: float, stain: int) -> np.ndarray:
    """Float RGB transmission of a pure stain: I = 10^(-conc * OD-vector of the stain)."""
    return 10.0 ** (-conc * rgb_from_hed[stain])


def test_hematoxylin_od_of_pure_stains_float_input():
    h_conc = 0.6
    rgb = np.ones((4, 6, 3))              # white background (OD 0)
    rgb[1:3, 1:4] = _stain_rgb(h_conc, 0)  # the nucleus: pure hematoxylin
    rgb[0, 5] = _stain_rgb(0.8, 1)          # eosin outside the mask must not count
    mask = np.zeros((4, 6), bool)
    mask[1:3, 1:4] = True
    assert hematoxylin_od_mean(rgb, mask) == pytest.approx(h_conc, rel=1e-9)
    mask[0, 5] = True                      # pure eosin carries no hematoxylin
    assert hematoxylin_od_mean(rgb, mask) == pytest.approx(h_conc * 6 / 7, rel=1e-9)


def test_hematoxylin_od_uint8_within_rounding_error():
    h_conc = 0.5
    intensity = _stain_rgb(h_conc, 0) * 255
    rgb = np.broadcast_to(np.round(intensity).astype(np.uint8), (3, 3, 3))
    # Rounding moves each channel by <= 0.5 grey levels: dOD_c <= 0.5 / (ln 10 * I_c), and the
    # hematoxylin row of the inverse stain matrix weighs the channels.
    tol = float(np.sum(np.abs(hed_from_rgb[:, 0]) * 0.5 / (math.log(10) * intensity)))
    assert hematoxylin_od_mean(rgb, np.ones((3, 3), bool)) == pytest.approx(h_conc, abs=tol)


def test_hematoxylin_od_empty_and_mismatched():
    rgb = np.zeros((3, 3, 3), np.uint8)
    assert math.isnan(hematoxylin_od_mean(rgb, np.zeros((3, 3), bool)))
    with pytest.raises(ValueError, match="same h, w"):
        hematoxylin_od_mean(rgb, np.ones((3, 4), bool))
    with pytest.raises(ValueError):
        hematoxylin_od_mean(rgb[..., 0], np.ones((3, 3), bool))


def test_min_caliper_is_the_minimum_width_not_a_rectangle_side():
    # Equilateral triangle of side s: minimum width is its height sqrt(3)/2 * s.
    s = 10.0
    tri = Polygon([(0, 0), (s, 0), (s / 2, s * math.sqrt(3) / 2)])
    m = shape_measurements(tri, 1.0, 1.0)
    assert m["Nucleus: Min caliper µm"] == pytest.approx(s * math.sqrt(3) / 2, rel=1e-9)
    assert m["Nucleus: Max caliper µm"] == pytest.approx(s, rel=1e-9)
