"""Engine: streaming order, ownership, and the oracle round-trip through tiling + merge.

The oracle (tests/oracle.py) returns the true nuclei of a synthetic slide for each tile; through
the engine every true nucleus whose centre lies in the region must come back exactly once and
whole, for several tile / halo / scale / ROI settings, whatever the batch size and workers.
"""

from __future__ import annotations

import math
import threading
from collections import Counter

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from oracle import OraclePredictor
from synth import grid_nuclei, paint
from usnet_wsi.engine import (EngineCounts, EngineSettings, StageTimes, batched, merged_nuclei,
                              read_tiles, segment_nuclei, seconds_per_tile, tile_frame,
                              tile_results)
from usnet_wsi.nuclei import tile_nuclei
from usnet_wsi.tiling import claimed, plan_tiles


class ArrayReader:
    """In-memory slide: crops the painted level-0 image (white outside) and resizes it."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.threads: set[str] = set()
        self.reads = 0

    def read_region(self, box_l0, out_size):
        self.threads.add(threading.current_thread().name)
        self.reads += 1
        x0, y0, x1, y1 = box_l0
        h, w = self.image.shape[:2]
        out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = self.image[sy0:sy1, sx0:sx1]
        if out.shape[1::-1] == tuple(out_size):
            return out
        return np.asarray(Image.fromarray(out).resize(out_size, Image.Resampling.LANCZOS))


def _scene(width, height, core_l0, radius=8.0, spacing=46, seed=0):
    nuclei = grid_nuclei(width, height, spacing=spacing, radius=radius, core_l0=core_l0,
                         seed=seed)
    image, labels = paint(width, height, nuclei, [(0, 0, width, height)], seed=seed)
    return nuclei, image, labels


def _run(image, nuclei, roi, mpp_l0, mpp_model, tile_px, halo_px, batch=4, workers=2):
    h, w = image.shape[:2]
    oracle = OraclePredictor(nuclei, w, h, mpp_model, tile_px, halo_px)
    plan = plan_tiles(roi, mpp_l0, mpp_model, tile_px, halo_px)
    counts, times = EngineCounts(), StageTimes()
    out = list(segment_nuclei(ArrayReader(image), plan,
                              oracle, EngineSettings(batch, workers, 2 * batch + workers),
                              times, counts))
    return out, plan, counts


def _truth_id(nucleus, labels) -> int:
    """Label of the true nucleus under the output's centroid (0 = background)."""
    cx, cy = nucleus.centroid_l0
    r, c = int(math.floor(cy)), int(math.floor(cx))
    if not (0 <= r < labels.shape[0] and 0 <= c < labels.shape[1]):
        return 0
    return int(labels[r, c])


def _iou_with_truth(nucleus, labels, label) -> float:
    """IoU of the output polygon (rasterised at pixel centres) with the true label pixels."""
    rows, cols = np.nonzero(labels == label)
    bx0, by0, bx1, by1 = nucleus.bbox_l0
    x0, y0 = math.floor(min(cols.min(), bx0)), math.floor(min(rows.min(), by0))
    x1, y1 = math.ceil(max(cols.max() + 1, bx1)), math.ceil(max(rows.max() + 1, by1))
    xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    pred = shapely.contains_xy(nucleus.polygon_l0, xs[None, :] + 0.5, ys[:, None] + 0.5)
    true = np.zeros_like(pred)
    true[rows - y0, cols - x0] = True
    return float((pred & true).sum() / max((pred | true).sum(), 1))


def _check_round_trip(out, nuclei, labels, roi, min_iou):
    """Each true nucleus centred clearly inside the ROI: once, whole; clearly outside: never;
    within 1 px of the ROI edge: at most once. No two outputs overlap. (The centre of a
    nucleus cut by the slide edge is the centre of its visible part.)"""
    found = Counter(_truth_id(n, labels) for n in out)
    assert found[0] == 0, "an output nucleus lies on background"
    x0, y0, x1, y1 = roi
    for i in range(1, len(nuclei) + 1):
        rows, cols = np.nonzero(labels == i)
        if not len(rows):
            continue
        cx, cy = cols.mean() + 0.5, rows.mean() + 0.5   # visible centre, pixel-edge frame
        margin = min(cx - x0, x1 - cx, cy - y0, y1 - cy)
        if margin >= 1:
            assert found[i] == 1, f"true nucleus {i} at ({cx}, {cy}) found {found[i]} times"
        elif margin <= -1:
            assert found[i] == 0, f"nucleus {i} outside the ROI was found"
        else:
            assert found[i] <= 1
    for n in out:
        label = _truth_id(n, labels)
        iou = _iou_with_truth(n, labels, label)
        floor = min_iou if (labels == label).sum() >= 50 else 0.3   # slivers cut by the edge
        assert iou >= floor, f"nucleus at {n.centroid_l0} not whole (IoU {iou:.2f})"
    polys = np.array([n.polygon_l0 for n in out], dtype=object)
    tree = shapely.STRtree(polys)
    a, b = tree.query(polys, predicate="intersects")
    pairs = a < b
    assert np.all(shapely.area(shapely.intersection(polys[a[pairs]], polys[b[pairs]])) < 1e-6)


@pytest.mark.parametrize("size, tile_px, halo_px, mpp_l0, mpp_model, roi, min_iou", [
    ((700, 560), 100, 16, 0.5, 0.5, None, 0.85),                 # scale 1, whole slide
    ((640, 480), 80, 20, 0.25, 0.5, None, 0.6),                  # model at half resolution
    ((600, 520), 96, 24, 0.25, 0.37, (53, 71, 401, 333), 0.6),   # non-integer scale + ROI
    ((512, 512), 64, 12, 0.5, 0.5, (0, 0, 512, 200), 0.85),      # ROI on the slide edge
])
def test_oracle_round_trip(size, tile_px, halo_px, mpp_l0, mpp_model, roi, min_iou):
    w, h = size
    read = round(tile_px * mpp_model / mpp_l0)
    core = read - 2 * round(halo_px * read / tile_px)
    nuclei, image, labels = _scene(w, h, core)
    roi_xyxy = (0, 0, w, h) if roi is None else (roi[0], roi[1], roi[0] + roi[2],
                                                 roi[1] + roi[3])
    out, plan, counts = _run(image, nuclei, roi_xyxy, mpp_l0, mpp_model, tile_px, halo_px)
    assert plan.core_size_l0 == core and len(plan.tiles) > 9
    assert counts.tiles == len(plan.tiles) and counts.nuclei == len(out) > 20
    _check_round_trip(out, nuclei, labels, roi_xyxy, min_iou)


def test_batch_size_and_workers_do_not_change_output():
    nuclei, image, _ = _scene(420, 380, 68)
    runs = [_run(image, nuclei, (0, 0, 420, 380), 0.5, 0.5, 100, 16, batch=b, workers=k)[0]
            for b, k in ((1, 0), (3, 2), (16, 4))]
    wkb = [[shapely.to_wkb(n.polygon_l0) + repr((n.score, n.hematoxylin_od)).encode()
            for n in r] for r in runs]
    assert len(wkb[0]) > 20
    assert wkb[0] == wkb[1] == wkb[2]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=st.integers(150, 330), h=st.integers(150, 330), tile_px=st.integers(56, 110),
       halo_frac=st.floats(0.13, 0.3), scale=st.sampled_from([1.0, 1.5, 2.0]),
       roi=st.tuples(st.floats(0, 0.4), st.floats(0, 0.4), st.floats(0.3, 1), st.floats(0.3, 1)),
       seed=st.integers(0, 1000))
def test_round_trip_property(w, h, tile_px, halo_frac, scale, roi, seed):
    halo_px = max(round(halo_frac * tile_px), math.ceil(9 / scale) + 1)  # halo >= a nucleus
    if 2 * halo_px >= tile_px - 8:
        halo_px = (tile_px - 10) // 2
    x0, y0 = int(roi[0] * w), int(roi[1] * h)
    x1, y1 = max(x0 + 1, int(x0 + roi[2] * (w - x0))), max(y0 + 1, int(y0 + roi[3] * (h - y0)))
    read = round(tile_px * scale)
    core = read - 2 * round(halo_px * read / tile_px)
    nuclei, image, labels = _scene(w, h, core, radius=7.0, spacing=34, seed=seed)
    out, _, _ = _run(image, nuclei, (x0, y0, x1, y1), 0.25, 0.25 * scale, tile_px, halo_px,
                     batch=3, workers=2)
    _check_round_trip(out, nuclei, labels, (x0, y0, x1, y1), 0.55 if scale > 1 else 0.8)


def test_read_tiles_keeps_plan_order_and_bounded_window():
    nuclei, image, _ = _scene(300, 300, 40)
    plan = plan_tiles((0, 0, 300, 300), 0.5, 0.5, 60, 10)
    reader = ArrayReader(image)
    gen = read_tiles(reader, plan, workers=3, window=4, times=StageTimes())
    first = next(gen)
    assert first[0] is plan.tiles[0]
    assert reader.reads <= 4                      # never more than the window ahead
    rest = list(gen)
    assert [t.index for t, _ in [first] + rest] == list(range(len(plan.tiles)))
    assert all(rgb.shape == (60, 60, 3) and rgb.dtype == np.uint8 for _, rgb in rest)
    np.testing.assert_array_equal(rest[0][1], reader.read_region(plan.tiles[1].read_l0,
                                                                 (60, 60)))
    assert all(name.startswith("usnet-read") for name in reader.threads - {"MainThread"})


def test_batched():
    assert [len(b) for b in batched(range(10), 4)] == [4, 4, 2]
    assert list(batched([], 3)) == []


def test_claimed_grows_core_inside_roi_only():
    plan = plan_tiles((0, 0, 300, 300), 0.5, 0.5, 100, 20)   # core 60
    t = plan.tiles[0]                                         # core (0, 0, 60, 60)
    pts = np.array([[59.5, 10], [60.5, 10], [61.5, 10], [-0.5, 10], [10, 60.9]])
    assert claimed(t, plan, pts).tolist() == [True, True, False, False, True]


def test_tile_nuclei_maps_labels_to_level0_and_drops_unowned():
    plan = plan_tiles((0, 0, 400, 400), 0.25, 0.5, 100, 20)  # 2 l0 px per tile px, core 120
    tile = plan.tiles[1]                # core x 120..240, y 0..120; read x 80..280, y -40..160
    labels = np.zeros((100, 100), np.int32)
    labels[30:40, 40:50] = 1            # centre (45, 35) tile px -> (170, 30) l0: owned
    labels[2:12, 2:12] = 2              # centre (7, 7) -> (94, -26): in the halo
    rgb = np.full((100, 100, 3), 230, np.uint8)
    rgb[30:40, 40:50] = (60, 30, 120)
    out = tile_nuclei(tile_frame(tile, plan), rgb, labels, np.array([0.9, 0.8], np.float32))
    assert len(out) == 1
    n = out[0]
    assert n.bbox_l0 == pytest.approx((80 + 2 * 40, -40 + 2 * 30, 80 + 2 * 50, -40 + 2 * 40), abs=1.1)
    assert 0.85 * 400 <= n.polygon_l0.area <= 400            # 10x10 tile px = 20x20 l0 px
    assert n.score == pytest.approx(0.9) and n.tile_index == tile.index
    assert n.hematoxylin_od > 0.3                             # dark purple under the mask
    pale = tile_nuclei(tile_frame(tile, plan), np.full((100, 100, 3), 230, np.uint8), labels,
                       np.array([0.9, 0.8], np.float32))
    assert pale[0].hematoxylin_od < n.hematoxylin_od


def test_tile_nuclei_skips_labels_without_pixels_and_keeps_label_order():
    plan = plan_tiles((0, 0, 200, 200), 0.5, 0.5, 100, 20)    # scale 1, core 60
    tile = plan.tiles[0]                                        # read box -20..80
    labels = np.zeros((100, 100), np.int32)
    labels[40:50, 40:50] = 3
    labels[25:35, 25:35] = 1                                    # label 2 has no pixel
    out = tile_nuclei(tile_frame(tile, plan), np.full((100, 100, 3), 200, np.uint8), labels,
                      np.array([0.9, 0.8, 0.7], np.float32))
    assert [n.score for n in out] == pytest.approx([0.9, 0.7])


def test_empty_plan_yields_nothing():
    nuclei, image, _ = _scene(200, 200, 60)
    plan = plan_tiles((0, 0, 200, 200), 0.5, 0.5, 100, 20, tissue=np.zeros((20, 20), bool),
                      tissue_scale=0.1)
    assert plan.tiles == ()
    oracle = OraclePredictor(nuclei, 200, 200, 0.5, 100, 20)
    steps = list(merged_nuclei(ArrayReader(image), plan, oracle, EngineSettings()))
    assert [s.nuclei for s in steps] == [[]] and oracle.calls == 0


def test_horizon_is_kept():
    """No nucleus yielded after a step reaches above that step's horizon."""
    nuclei, image, _ = _scene(500, 500, 68)
    plan = plan_tiles((0, 0, 500, 500), 0.5, 0.5, 100, 16)
    oracle = OraclePredictor(nuclei, 500, 500, 0.5, 100, 16)
    steps = list(merged_nuclei(ArrayReader(image), plan, oracle, EngineSettings(batch_size=5)))
    for k, step in enumerate(steps):
        later = [n for s in steps[k + 1:] for n in s.nuclei]
        assert all(n.bbox_l0[1] >= step.horizon_y_l0 for n in later)
    assert any(0 < s.horizon_y_l0 < 400 for s in steps)       # it does move down the slide


def test_predictor_errors_propagate_and_threads_stop():
    class Broken(OraclePredictor):
        def predict(self, tiles, meta=None, regions=None):
            raise RuntimeError("boom")

    nuclei, image, _ = _scene(300, 300, 68)
    plan = plan_tiles((0, 0, 300, 300), 0.5, 0.5, 100, 16)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="boom"):
        list(segment_nuclei(ArrayReader(image), plan, Broken(nuclei, 300, 300, 0.5, 100, 16),
                            EngineSettings()))
    assert threading.active_count() <= before


def test_the_model_works_on_the_next_batch_while_this_one_is_handed_on():
    """The predictor runs in a device thread one batch ahead: while the calling thread holds
    the first batch's results (the generator is suspended), the next batch is predicted."""
    second_started = threading.Event()

    class Watched(OraclePredictor):
        threads: set[str] = set()

        def predict(self, tiles, meta=None, regions=None):
            self.threads.add(threading.current_thread().name)
            if meta[0].index > 0:
                second_started.set()
            return super().predict(tiles, meta, regions)

    nuclei, image, _ = _scene(300, 300, 68)
    plan = plan_tiles((0, 0, 300, 300), 0.5, 0.5, 100, 16)
    oracle = Watched(nuclei, 300, 300, 0.5, 100, 16)
    results = tile_results(ArrayReader(image), plan, oracle, EngineSettings(batch_size=2),
                           StageTimes())
    first = next(results)
    assert first.tile.index == 0
    assert second_started.wait(10), "the next batch was not predicted ahead"
    rest = list(results)
    assert [r.tile.index for r in [first] + rest] == list(range(len(plan.tiles)))
    assert all(name.startswith("usnet-device") for name in oracle.threads)


def test_seconds_per_tile_times_the_predictor():
    oracle = OraclePredictor([], 100, 100, 0.5, 64, 8)
    assert seconds_per_tile(oracle, batch_size=2) > 0
    assert oracle.calls == 2
