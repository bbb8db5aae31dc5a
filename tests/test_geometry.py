"""mask <-> polygon conversions and polygon transforms (usnet_wsi.geometry)."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from shapely import affinity
from shapely.geometry import MultiPolygon, Point, Polygon, box
from skimage.measure import label, points_in_poly

from usnet_wsi.geometry import (fill_polygon, fill_polygons, largest_polygon, mask_to_polygon,
                                pixel_span, pixel_spans, polygon_to_mask, transform_polygon)


def _ellipse_mask(shape, cx, cy, ax, ay, angle=0.0):
    """Pixels whose centre lies in the ellipse (pixel-edge frame: centre of (r, c) is +0.5)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xx - cx) * ca + (yy - cy) * sa
    v = -(xx - cx) * sa + (yy - cy) * ca
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_square_mask_gives_pixel_edge_outline_in_origin_frame():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 3:8] = True  # rows 2..6, cols 3..7: a 5 x 5 block
    poly = mask_to_polygon(mask, origin_xy=(100, 50), simplify_px=0)
    # The outline runs along pixel edges; marching squares cuts each of the 4 convex corners
    # by a right triangle with legs 1/2 (area 1/8).
    assert poly.bounds == (103.0, 52.0, 108.0, 57.0)
    assert poly.area == pytest.approx(25 - 4 * 0.125)
    assert poly.is_valid


def test_hole_is_kept_and_largest_component_wins():
    mask = np.zeros((30, 30), bool)
    mask[2:14, 2:14] = True      # 12 x 12 block...
    mask[6:10, 6:10] = False     # ... with a 4 x 4 hole
    mask[20:24, 20:24] = True    # a smaller separate blob
    poly = mask_to_polygon(mask, simplify_px=0)
    assert isinstance(poly, Polygon) and poly.is_valid
    assert len(poly.interiors) == 1
    # 4 convex outer corners lose 1/8 each; each hole corner adds 1/8 of hole to the shape.
    assert poly.area == pytest.approx(144 - 4 * 0.125 - (16 - 4 * 0.125))
    assert poly.bounds == (2.0, 2.0, 14.0, 14.0)


def test_diagonal_pixels_are_connected():
    mask = np.eye(4, dtype=bool)
    poly = mask_to_polygon(mask, simplify_px=0)
    assert poly.is_valid
    assert polygon_to_mask(poly, mask.shape).tolist() == mask.tolist()


def test_empty_and_bad_masks():
    assert mask_to_polygon(np.zeros((5, 5), bool)) is None
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygon(np.ones((2, 2, 2), bool))


def test_polygon_to_mask_uses_pixel_centres_and_origin():
    rect = box(10.0, 20.0, 13.0, 22.0)  # exactly 3 x 2 pixels in the frame
    out = polygon_to_mask(rect, (5, 6), origin_xy=(9, 19))
    expected = np.zeros((5, 6), bool)
    expected[1:3, 1:4] = True
    assert out.tolist() == expected.tolist()
    # A box that covers less than half of a pixel does not reach its centre.
    assert not polygon_to_mask(box(0, 0, 0.4, 0.4), (2, 2)).any()


def test_polygon_to_mask_respects_holes_and_multipolygons():
    ring = box(0, 0, 6, 6).difference(box(2, 2, 4, 4))
    out = polygon_to_mask(MultiPolygon([ring, box(8, 0, 9, 1)]), (6, 10))
    assert out.sum() == 36 - 4 + 1
    assert not out[2:4, 2:4].any()
    assert out[0, 8]


def _holed_ellipse(cx, cy, ax, ay, angle):
    ell = affinity.rotate(affinity.scale(Point(cx, cy).buffer(1.0), ax, ay), angle)
    return ell.difference(Point(cx + 0.3 * ax, cy - 0.2 * ay).buffer(0.35 * min(ax, ay)))


def test_fill_polygon_writes_the_value_strictly_inside_and_keeps_the_rest():
    poly = _holed_ellipse(20.3, 14.9, 15.2, 9.7, 33.0)
    assert len(poly.interiors) == 1
    out = np.full((30, 45), 7, np.uint32)
    n = fill_polygon(out, poly, 3, origin_xy=(-2, 1))
    # independent reference: skimage's point-in-polygon test on the pixel centres
    ys, xs = np.mgrid[0:30, 0:45] + 0.5
    centres = np.column_stack([xs.ravel() - 2, ys.ravel() + 1])
    inside = points_in_poly(centres, np.asarray(poly.exterior.coords))
    inside &= ~points_in_poly(centres, np.asarray(poly.interiors[0].coords))
    expected = np.where(inside.reshape(30, 45), 3, 7)
    np.testing.assert_array_equal(out, expected)
    assert n == inside.sum() > 100


def test_fill_polygon_centre_on_the_outline_is_outside():
    out = np.zeros((6, 6), np.uint8)
    fill_polygon(out, box(1.5, 1.5, 4.5, 4.5), 1)  # centres 1.5 and 4.5 lie on the edges
    expected = np.zeros((6, 6), np.uint8)
    expected[2:4, 2:4] = 1
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_fill_polygon_with_stride_samples_level_0(stride):
    """A level-k window (stride 2**k) holds exactly the level-0 pixels [r * s, c * s]."""
    rng = np.random.default_rng(stride)
    level0 = np.zeros((400, 500), np.uint32)
    polys = [_holed_ellipse(*rng.uniform(0, 400, 2), *rng.uniform(8, 60, 2), rng.uniform(0, 180))
             for _ in range(12)]
    for i, poly in enumerate(polys, start=1):
        fill_polygon(level0, poly, i)
    row0, col0 = 3, 5  # the window's top-left pixel, in level-k pixels
    window = np.zeros((400 // stride - row0, 500 // stride - col0), np.uint32)
    for i, poly in enumerate(polys, start=1):
        fill_polygon(window, poly, i, origin_xy=(col0 * stride, row0 * stride), stride=stride)
    sampled = level0[row0 * stride :: stride, col0 * stride :: stride][: window.shape[0],
                                                                       : window.shape[1]]
    np.testing.assert_array_equal(window, sampled)
    assert len(np.unique(window)) > 6


def _contains_reference(shape, polys, values, origin, stride=1):
    """The definition: each polygon in turn writes its value where shapely.contains_xy puts
    the sample point (origin + index * stride + 0.5) strictly inside."""
    out = np.zeros(shape, np.int64)
    xs = np.arange(shape[1]) * stride + origin[0] + 0.5
    ys = np.arange(shape[0]) * stride + origin[1] + 0.5
    for poly, value in zip(polys, values):
        if poly is not None:
            out[shapely.contains_xy(poly, xs[None, :], ys[:, None])] = value
    return out


def _degenerate_polygons(rng):
    """Outlines through sample points: vertices on pixel centres, horizontal and vertical edges
    along sample rows and columns, diagonals through centres, points 1e-12 off a centre, a
    spike, a hole, and a multipolygon."""
    return [
        box(10.5, 10.5, 20.5, 14.5),                                   # edges on sample lines
        Polygon([(30.5, 5.5), (40.5, 15.5), (30.5, 25.5), (20.5, 15.5)]),   # diamond on centres
        Polygon([(45, 2.5 + 1e-12), (60.5, 2.5), (60.5 - 1e-12, 12), (45, 12)]),
        Polygon([(5.5, 30.5), (25.5, 31.5), (6.5, 32.5), (15.5, 45.5)]),    # concave, on centres
        Polygon([(50, 30), (50.5, 45.5), (51, 30)]),                   # thin spike
        box(60, 30, 80, 50).difference(box(65.5, 35.5, 70.5, 40.5)),   # hole on sample lines
        MultiPolygon([box(2.5, 50.5, 6.5, 54.5), box(8.25, 50.1, 12.5, 58.5)]),
        Polygon(rng.uniform(0, 90, (12, 2)).round(0) + 0.5).buffer(0),  # random, on centres
    ]


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_fill_polygons_is_exactly_contains_xy_in_turn(stride):
    rng = np.random.default_rng(11 + stride)
    ellipses = [_holed_ellipse(*rng.uniform(-10, 100, 2), *rng.uniform(3, 25, 2),
                               rng.uniform(0, 180)) for _ in range(60)]
    # later polygons overlap earlier ones: the later value must win
    polys = _degenerate_polygons(rng) + ellipses + [None, Polygon()]
    values = list(rng.permutation(len(polys)) + 1)
    for origin in [(0.0, 0.0), (-3.0, 2.5), (1.25, -0.75)]:
        shape = (96 // stride, 90 // stride)
        want = _contains_reference(shape, polys, values, origin, stride)
        got = np.zeros(shape, np.int64)
        n = fill_polygons(got, polys, values, origin, stride)
        np.testing.assert_array_equal(got, want)
        one_by_one = np.zeros(shape, np.int64)
        counts = [fill_polygon(one_by_one, p, v, origin, stride) for p, v in zip(polys, values)]
        np.testing.assert_array_equal(one_by_one, want)
        assert n == sum(counts)
        assert len(np.unique(want)) > 20


def test_fill_polygons_on_traced_outlines_gives_back_the_masks():
    rng = np.random.default_rng(5)
    masks = [_ellipse_mask((40, 40), *rng.uniform(10, 30, 2), *rng.uniform(3, 12, 2),
                           rng.uniform(0, 3)) for _ in range(8)]
    polys = [mask_to_polygon(m, simplify_px=0) for m in masks]
    for m, p in zip(masks, polys):
        out = np.zeros((40, 40), np.int64)
        fill_polygons(out, [p], [1])
        np.testing.assert_array_equal(out.astype(bool), label(m) == np.bincount(
            label(m).ravel())[1:].argmax() + 1)
    out = np.zeros((40, 40), np.int64)
    fill_polygons(out, polys, list(range(1, 9)))
    np.testing.assert_array_equal(out, _contains_reference((40, 40), polys, range(1, 9), (0, 0)))


def test_fill_polygons_writes_into_a_strided_window_and_checks_its_input():
    base = np.zeros((20, 30), np.uint16)
    window = base[5:15, ::2]                               # not C-contiguous
    polys = [box(1, 1, 9, 6), box(4, 3, 12, 9)]
    fill_polygons(window, polys, [3, 4])
    np.testing.assert_array_equal(window, _contains_reference((10, 15), polys, [3, 4], (0, 0)))
    assert base[:5].sum() == 0 and base[5:15, 1::2].sum() == 0
    with pytest.raises(ValueError, match="values"):
        fill_polygons(window, polys, [1])
    with pytest.raises(ValueError, match="stride"):
        fill_polygons(window, polys, [1, 2], stride=0)


def test_fill_polygon_rejects_a_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        fill_polygon(np.zeros((3, 3)), box(0, 0, 2, 2), 1, stride=0)


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(-50, 50), size=st.floats(0, 30))
def test_pixel_span_is_the_pixels_whose_centre_is_strictly_between(lo, size):
    hi = lo + size
    centres = np.arange(-60, 90) + 0.5
    expected = np.arange(-60, 90)[(centres > lo) & (centres < hi)]
    start, stop = pixel_span(lo, hi)
    assert list(range(max(start, -60), stop)) == expected.tolist()


@settings(max_examples=50, deadline=None)
@given(lo=st.lists(st.floats(-50, 50), min_size=1, max_size=20),
       size=st.lists(st.floats(0, 30), min_size=20, max_size=20))
def test_pixel_spans_are_pixel_span_of_each(lo, size):
    hi = [a + b for a, b in zip(lo, size)]
    starts, stops = pixel_spans(np.array(lo), np.array(hi))
    assert list(zip(starts.tolist(), stops.tolist())) == [pixel_span(a, b)
                                                          for a, b in zip(lo, hi)]


def test_pixel_span_with_origin_and_stride():
    # samples 10 + 4 i + 0.5: 2.5, 6.5, 10.5, 14.5, 18.5 for i = -2 .. 2
    assert pixel_span(6.5, 18.5, origin=10, stride=4) == (0, 2)
    assert pixel_span(6.4, 18.6, origin=10, stride=4) == (-1, 3)


@settings(max_examples=60, deadline=None)
@given(
    ax=st.floats(2.5, 12.0), ay=st.floats(2.5, 12.0), angle=st.floats(0, np.pi),
    dx=st.floats(-0.5, 0.5), dy=st.floats(-0.5, 0.5),
    ox=st.integers(-1000, 1000), oy=st.integers(-1000, 1000),
)
def test_round_trip_small_nuclei(ax, ay, angle, dx, dy, ox, oy):
    shape = (32, 32)
    mask = _ellipse_mask(shape, 16 + dx, 16 + dy, ax, ay, angle)
    if mask.sum() < 12:
        return  # too few pixels to call a nucleus
    poly = mask_to_polygon(mask, origin_xy=(ox, oy))  # default simplification
    assert poly.is_valid
    back = polygon_to_mask(poly, shape, origin_xy=(ox, oy))
    assert _iou(mask, back) > 0.9
    # The polygon area tracks the pixel count within the corner cuts along the boundary.
    assert abs(poly.area - mask.sum()) < 0.25 * poly.length


@settings(max_examples=60, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_any_mask_gives_its_largest_component_exactly(mask):
    poly = mask_to_polygon(mask, simplify_px=0)
    if not mask.any():
        assert poly is None
        return
    assert isinstance(poly, Polygon) and poly.is_valid and poly.area > 0
    # Unsimplified, the outline rasterises back to exactly one 8-connected component of the
    # mask (holes included), and no other component has a larger outline.
    back = polygon_to_mask(poly, mask.shape)
    labels = label(mask, connectivity=2)
    components = [labels == k for k in range(1, labels.max() + 1)]
    assert any(np.array_equal(back, c) for c in components)
    assert all(mask_to_polygon(c, simplify_px=0).area <= poly.area + 1e-9 for c in components)


def test_largest_polygon_repairs_and_picks_biggest():
    bowtie = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])  # self-intersecting
    part = largest_polygon(bowtie)
    assert isinstance(part, Polygon) and part.is_valid
    assert part.area == pytest.approx(4.0)
    two = MultiPolygon([box(0, 0, 1, 1), box(5, 5, 8, 8)])
    assert largest_polygon(two).equals(box(5, 5, 8, 8))
    assert largest_polygon(Polygon()) is None
    assert largest_polygon(None) is None


def test_transform_polygon_applies_frame_conversion():
    poly = box(0, 0, 10, 5).difference(box(2, 2, 3, 3))
    out = transform_polygon(poly, lambda xy: xy * (2.0, 0.5) + (100.0, 200.0))
    assert out.bounds == (100.0, 200.0, 120.0, 202.5)
    assert out.area == pytest.approx(poly.area * 2.0 * 0.5)
    assert len(out.interiors) == 1 and out.is_valid
