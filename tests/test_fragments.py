"""Box-shaped fragments (usnet_wsi.fragments): shapes with and without cut sides.

Shapes are drawn as masks and traced with `mask_to_polygon`, as `segment` traces its nuclei, or
given as exact polygons; each expectation follows from the definition in the module docstring.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely.geometry import Point, Polygon, box

from usnet_wsi.fragments import (count_box_fragments, cut_sides, is_box_fragment,
                                 label_outlines, min_side_px)
from usnet_wsi.geometry import mask_to_polygon


def disc_mask(r: float, margin: int = 6) -> tuple[np.ndarray, float]:
    """Bool mask of a disc of radius r px; returns (mask, centre coordinate)."""
    n = int(2 * r) + 2 * margin
    yy, xx = np.mgrid[:n, :n] + 0.5
    c = n / 2
    return (xx - c) ** 2 + (yy - c) ** 2 <= r * r, c


def cut_disc(r: float, d: float, axis: str = "x") -> tuple[Polygon, float]:
    """A disc with everything beyond the line at distance d*r from its centre removed (right of
    it for axis 'x', below it for 'y'). Returns (outline, position of the cut line)."""
    mask, c = disc_mask(r)
    cut = int(round(c + d * r))
    if axis == "x":
        mask[:, cut:] = False
    else:
        mask[cut:, :] = False
    return mask_to_polygon(mask), float(cut)


def rounded_square(side: float, radius: float) -> Polygon:
    return box(radius, radius, side - radius, side - radius).buffer(radius, quad_segs=16)


# ----------------------------------------------------------------------------- no cut side

@pytest.mark.parametrize("r", [4, 6, 9, 12, 16, 20, 28, 40])
def test_rasterised_circle_has_none(r):
    mask, _ = disc_mask(r)
    assert cut_sides(mask_to_polygon(mask), min_side_px=6) == []


def test_exact_circle_has_none():
    assert cut_sides(Point(50, 50).buffer(20, quad_segs=32), min_side_px=6) == []


@pytest.mark.parametrize("a,b", [(20, 3), (30, 6), (12, 8), (36, 14)])
@pytest.mark.parametrize("angle", [0.0, math.pi / 6, math.pi / 2])
def test_rasterised_ellipse_has_none(a, b, angle):
    n = 2 * a + 12
    yy, xx = np.mgrid[:n, :n] + 0.5 - n / 2
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    assert not is_box_fragment(mask_to_polygon((u / a) ** 2 + (v / b) ** 2 <= 1), min_side_px=6)


def test_rounded_corners_leave_the_line_gently():
    """Flat sides long enough, but tangent to the rounded corners: no turn, no cut side."""
    shape = rounded_square(40, 8)
    assert cut_sides(shape, min_side_px=6) == []
    assert len(cut_sides(shape, min_side_px=6, min_turn_deg=0)) == 4


def test_thin_sliver_cut_off_is_not_a_side():
    """A cut far from the centre (0.9 r) leaves a chord well under half the disc's extent."""
    outline, _ = cut_disc(20, 0.9)
    assert cut_sides(outline, min_side_px=6) == []


# ----------------------------------------------------------------------------- cut sides

@pytest.mark.parametrize("r", [8, 12, 16, 24])
def test_half_disc_has_one_cut_side(r):
    outline, cut = cut_disc(r, 0.0)
    sides = cut_sides(outline, min_side_px=6)
    assert len(sides) == 1
    side = sides[0]
    assert side.axis == "x" and side.at == pytest.approx(cut, abs=0.5)
    assert side.length == pytest.approx(2 * r, abs=2)
    assert side.turn_deg >= 60


@pytest.mark.parametrize("d", [-0.4, -0.2, 0.2, 0.4])
def test_disc_cut_through_its_middle_half_has_one(d):
    outline, _ = cut_disc(20, d)
    assert len(cut_sides(outline, min_side_px=6)) == 1


def test_horizontal_cut_is_found_on_y():
    outline, cut = cut_disc(16, 0.0, axis="y")
    [side] = cut_sides(outline, min_side_px=6)
    assert side.axis == "y" and side.at == pytest.approx(cut, abs=0.5)


def test_square_has_four():
    sides = cut_sides(box(10, 10, 30, 30), min_side_px=6)
    assert sorted((s.axis, s.at) for s in sides) == [("x", 10), ("x", 30), ("y", 10), ("y", 30)]
    assert all(s.length == 20 and s.turn_deg == pytest.approx(90) for s in sides)


def test_one_sharp_end_is_enough():
    """A piece cut at a crop corner: sides meet the corner at 90 degrees, and the rounded
    corner opposite it at a tangent. Each side turns sharply at one end only."""
    piece = box(0, 0, 30, 22).union(box(0, 0, 22, 30)).union(Point(22, 22).buffer(8, quad_segs=16))
    sides = {(s.axis, s.at): s for s in cut_sides(piece, min_side_px=6)}
    assert set(sides) == {("x", 0), ("x", 30), ("y", 0), ("y", 30)}
    assert sides[("x", 30)].length == pytest.approx(22, abs=3)   # + the arc within tol_px
    assert sides[("x", 30)].turn_deg == pytest.approx(90)


def test_rasterised_square_has_four():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    assert len(cut_sides(mask_to_polygon(mask), min_side_px=6)) == 4


def test_short_sides_need_min_side_px():
    square = box(0, 0, 4, 4)
    assert cut_sides(square, min_side_px=6) == []
    assert len(cut_sides(square, min_side_px=3)) == 4


def test_side_on_the_image_border_is_not_counted():
    outline, cut = cut_disc(16, 0.0)
    assert is_box_fragment(outline, min_side_px=6)
    frame = (0.0, 0.0, cut, 100.0)          # the image ends where the disc was cut
    assert not is_box_fragment(outline, min_side_px=6, frame=frame)
    frame_far = (0.0, 0.0, cut + 10, 100.0)
    assert is_box_fragment(outline, min_side_px=6, frame=frame_far)


def test_ring_forms_agree():
    """A shapely Polygon, its closed ring and its open ring give the same sides."""
    outline, _ = cut_disc(12, 0.0)
    closed = np.asarray(outline.exterior.coords)
    expected = cut_sides(outline, min_side_px=6)
    assert cut_sides(closed, min_side_px=6) == expected
    assert cut_sides(closed[:-1], min_side_px=6) == expected
    assert cut_sides(np.roll(closed[:-1], 7, axis=0), min_side_px=6) == expected


def test_count_box_fragments():
    circle = mask_to_polygon(disc_mask(14)[0])
    half, _ = cut_disc(14, 0.0)
    shapes = [circle, half, box(0, 0, 20, 20), rounded_square(40, 8), circle]
    assert count_box_fragments(shapes, min_side_px=6) == 2
    assert count_box_fragments([], min_side_px=6) == 0


def test_min_side_px_scales_with_resolution():
    assert min_side_px(0.25) == pytest.approx(6.0)
    assert min_side_px(0.5) == pytest.approx(3.0)
    assert min_side_px(0.2527) == pytest.approx(6 * 0.25 / 0.2527)
    with pytest.raises(ValueError):
        min_side_px(0)


def test_label_outlines_trace_every_instance():
    labels = np.zeros((80, 120), np.uint16)
    mask, _ = disc_mask(12)
    h, w = mask.shape
    labels[5:5 + h, 5:5 + w][mask] = 3             # a disc (ids need not be contiguous)
    half = mask.copy()
    half[:, w // 2:] = False
    labels[5:5 + h, 60:60 + w][half] = 7            # a half disc
    outlines = label_outlines(labels)
    assert len(outlines) == 2
    assert sorted(round(o.area) for o in outlines) == sorted(
        round(mask_to_polygon(m).area) for m in (mask, half))
    assert count_box_fragments(outlines, min_side_px=6, frame=(0, 0, 120, 80)) == 1
