"""Outlines of many masks at once (usnet_wsi.contours) against the one-mask reference
(skimage's find_contours and geometry.mask_to_polygon): the same vertices, in the same order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from skimage.measure import find_contours

from usnet_wsi.contours import masks_to_polygons, trace_strip
from usnet_wsi.geometry import mask_to_polygon


def _framed(mask: np.ndarray) -> np.ndarray:
    return np.pad(mask.astype(bool), 1)


@settings(max_examples=150, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 9), st.integers(1, 9))))
def test_rings_equal_find_contours_vertex_for_vertex(mask: np.ndarray) -> None:
    img = _framed(mask)
    coords, ring = trace_strip(img)
    expected = find_contours(img.astype(np.float32), 0.5, fully_connected="high")
    got = [coords[ring == r] for r in range(int(ring.max()) + 1)] if len(ring) else []
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def _labels(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """Touching, overlapping-then-painted blobs of random shape, some with holes and
    diagonal-only neighbours, as a label map (label k = k-th blob)."""
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size] + 0.5
    for k in range(1, n + 1):
        cx, cy = rng.uniform(0, size, 2)
        ax, ay = rng.uniform(1.5, 9, 2)
        blob = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
        blob &= rng.random((size, size)) > 0.08                # ragged edges, pin holes
        labels[blob] = k
    return labels


def test_tile_outlines_equal_one_mask_at_a_time() -> None:
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(12):
        labels = _labels(rng, 96, 40)
        boxes = ndimage.find_objects(labels)
        keys = np.array([k for k, b in enumerate(boxes) if b is not None])
        for simplify in (0.3, 0.0):
            got = masks_to_polygons(labels, boxes, keys, simplify)
            for k, poly in zip(keys, got):
                ref = mask_to_polygon(labels[boxes[k]] == k + 1, simplify_px=simplify)
                assert (poly is None) == (ref is None)
                if ref is not None:
                    assert poly.wkb == ref.wkb, (trial, k)
                    checked += 1
    assert checked > 500


def test_a_subset_of_labels_and_the_empty_cases() -> None:
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 1
    labels[10:15, 3:9] = 2
    labels[4:8, 12:18] = 3
    boxes = ndimage.find_objects(labels)
    got = masks_to_polygons(labels, boxes, np.array([2, 0]))
    assert [p.wkb for p in got] == [mask_to_polygon(labels[boxes[k]] == k + 1).wkb
                                   for k in (2, 0)]
    assert masks_to_polygons(labels, boxes, np.array([], np.int64)) == []
    coords, ring = trace_strip(np.zeros((4, 4), bool))
    assert coords.shape == (0, 2) and len(ring) == 0
