"""usnet_wsi.tiling: cores partition the ROI, equal read boxes, frame round trips, ownership."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synth import grid_nuclei, paint

from usnet_wsi.errors import UsageError
from usnet_wsi.tiling import l0_to_tile, owned, plan_tiles, roi_from_xywh, tile_to_l0

FAST = settings(max_examples=100, deadline=None)


@st.composite
def plans(draw, max_side: int = 3000):
    """A plan over a random ROI with a random model/slide resolution ratio, tile and halo."""
    tile_px = draw(st.integers(16, 400))
    halo_px = draw(st.integers(0, (tile_px - 1) // 2))
    mpp_l0 = draw(st.sampled_from([0.1213, 0.2201, 0.25, 0.2527, 0.5, 0.9972]))
    mpp_model = draw(st.sampled_from([0.25, 0.5, 0.3333]))
    side = min(max_side, 40 * round(tile_px * mpp_model / mpp_l0) + 1)   # <= ~40x40 tiles
    x0, y0 = draw(st.integers(0, 5000)), draw(st.integers(0, 5000))
    w, h = draw(st.integers(1, side)), draw(st.integers(1, side))
    try:
        plan = plan_tiles((x0, y0, x0 + w, y0 + h), mpp_l0, mpp_model, tile_px, halo_px)
    except UsageError:   # settings leaving no core are refused; covered in another test
        read = round(tile_px * mpp_model / mpp_l0)
        halo = round(halo_px * read / tile_px)
        assert read - 2 * halo < 1 or (halo_px > 0 and halo == 0)
        plan = draw(st.nothing())
    return plan, mpp_l0, mpp_model


@FAST
@given(plans())
def test_cores_partition_the_roi(args):
    plan, _, _ = args
    x0, y0, x1, y1 = plan.roi_l0
    assert len(plan.tiles) == plan.n_rows * plan.n_cols
    xs = sorted({(t.core_l0[0], t.core_l0[2]) for t in plan.tiles})
    ys = sorted({(t.core_l0[1], t.core_l0[3]) for t in plan.tiles})
    # x intervals tile [x0, x1) end to end, without gap or overlap; same for y
    assert xs[0][0] == x0 and xs[-1][1] == x1 and len(xs) == plan.n_cols
    assert ys[0][0] == y0 and ys[-1][1] == y1 and len(ys) == plan.n_rows
    assert all(a[1] == b[0] for a, b in zip(xs, xs[1:]))
    assert all(a[1] == b[0] for a, b in zip(ys, ys[1:]))
    # every full core has the core size; only the last column/row is clipped
    assert all(b - a == plan.core_size_l0 for a, b in xs[:-1] + ys[:-1])
    assert 0 < xs[-1][1] - xs[-1][0] <= plan.core_size_l0
    assert 0 < ys[-1][1] - ys[-1][0] <= plan.core_size_l0
    assert sum((t.core_l0[2] - t.core_l0[0]) * (t.core_l0[3] - t.core_l0[1])
               for t in plan.tiles) == (x1 - x0) * (y1 - y0)


@FAST
@given(plans(max_side=400))
def test_cores_cover_every_roi_pixel_once(args):
    plan, _, _ = args
    x0, y0, x1, y1 = plan.roi_l0
    count = np.zeros((y1 - y0, x1 - x0), np.int32)
    for t in plan.tiles:
        cx0, cy0, cx1, cy1 = t.core_l0
        count[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] += 1
    assert (count == 1).all()


@FAST
@given(plans())
def test_read_boxes_same_size_and_hold_core_plus_halo(args):
    plan, mpp_l0, mpp_model = args
    assert plan.read_size_l0 == round(plan.tile_px * mpp_model / mpp_l0)
    assert plan.core_size_l0 == plan.read_size_l0 - 2 * plan.halo_l0 >= 1
    assert plan.l0_per_tile_px == plan.read_size_l0 / plan.tile_px
    for i, t in enumerate(plan.tiles):
        rx0, ry0, rx1, ry1 = t.read_l0
        cx0, cy0, cx1, cy1 = t.core_l0
        assert (rx1 - rx0, ry1 - ry0) == (plan.read_size_l0, plan.read_size_l0)
        assert (rx0, ry0) == (cx0 - plan.halo_l0, cy0 - plan.halo_l0)
        assert rx1 >= cx1 + plan.halo_l0 and ry1 >= cy1 + plan.halo_l0
        assert t.index == i
    order = [(t.row, t.col) for t in plan.tiles]
    assert order == sorted(order)


@FAST
@given(plans(), st.lists(st.tuples(st.floats(-50, 450), st.floats(-50, 450)), min_size=1,
                         max_size=20))
def test_frame_round_trip(args, pts):
    plan, _, _ = args
    t = plan.tiles[len(plan.tiles) // 2]
    xy_tile = np.array(pts, dtype=float)
    xy_l0 = tile_to_l0(xy_tile, t, plan)
    np.testing.assert_allclose(l0_to_tile(xy_l0, t, plan), xy_tile, atol=1e-7)
    corners = tile_to_l0(np.array([[0, 0], [plan.tile_px, plan.tile_px]]), t, plan)
    np.testing.assert_allclose(corners.ravel(), t.read_l0, atol=1e-7)


@FAST
@given(plans(max_side=1500), st.data())
def test_every_roi_point_owned_by_exactly_one_tile(args, data):
    plan, _, _ = args
    x0, y0, x1, y1 = plan.roi_l0
    # integers (incl. the core borders themselves) and arbitrary floats inside the ROI
    borders_x = [t.core_l0[0] for t in plan.tiles] + [x1 - 1]
    borders_y = [t.core_l0[1] for t in plan.tiles] + [y1 - 1]
    pts = [(bx, by) for bx in borders_x[:10] for by in borders_y[:10]]
    pts += data.draw(st.lists(st.tuples(st.floats(x0, x1, exclude_max=True),
                                        st.floats(y0, y1, exclude_max=True)), max_size=30))
    xy = np.array(pts, dtype=float)
    hits = np.sum([owned(t, xy) for t in plan.tiles], axis=0)
    assert (hits == 1).all()
    outside = np.array([[x0 - 0.5, y0], [x1, y0], [x0, y1], [x1 + 3.2, y1 + 7]], dtype=float)
    assert not np.any([owned(t, outside) for t in plan.tiles])


def test_owned_is_half_open():
    plan = plan_tiles((0, 0, 200, 100), 0.25, 0.25, tile_px=100, halo_px=0)
    left, right = plan.tiles
    on_border = np.array([[100.0, 50.0], [99.999, 50.0], [0.0, 0.0], [200.0, 0.0]])
    assert owned(left, on_border).tolist() == [False, True, True, False]
    assert owned(right, on_border).tolist() == [True, False, False, False]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1999), st.integers(0, 1499), st.sampled_from([0.05, 0.1, 0.25, 1.0]))
def test_tissue_filter_keeps_every_tile_within_the_halo(tx, ty, scale):
    """One tissue speck: every tile whose core lies within the halo of it is kept, far tiles go."""
    roi = (0, 0, 2000, 1500)
    plan_all = plan_tiles(roi, 0.25, 0.5, tile_px=100, halo_px=10)   # read 200, halo 20, core 160
    mask = np.zeros((round(1500 * scale), round(2000 * scale)), bool)
    mx, my = min(int(tx * scale), mask.shape[1] - 1), min(int(ty * scale), mask.shape[0] - 1)
    mask[my, mx] = True
    kept = {(t.row, t.col) for t in
            plan_tiles(roi, 0.25, 0.5, 100, 10, tissue=mask, tissue_scale=scale).tiles}
    # the speck covers level-0 [mx/scale, (mx+1)/scale) x [my/scale, (my+1)/scale)
    sx0, sx1, sy0, sy1 = mx / scale, (mx + 1) / scale, my / scale, (my + 1) / scale
    slack = 2 / scale + 1
    for t in plan_all.tiles:
        cx0, cy0, cx1, cy1 = t.core_l0
        gap = max(cx0 - sx1, sx0 - cx1, cy0 - sy1, sy0 - cy1, 0)
        if gap <= plan_all.halo_l0:
            assert (t.row, t.col) in kept
        elif gap > plan_all.halo_l0 + slack:
            assert (t.row, t.col) not in kept
    assert {t.index for t in plan_all.tiles} == set(range(plan_all.n_grid))


def test_tissue_filter_empty_and_full():
    roi = (100, 100, 1100, 900)
    none = plan_tiles(roi, 0.5, 0.5, 300, 32, tissue=np.zeros((90, 110), bool), tissue_scale=0.1)
    full = plan_tiles(roi, 0.5, 0.5, 300, 32, tissue=np.ones((90, 110), bool), tissue_scale=0.1)
    assert none.tiles == () and (none.n_rows, none.n_cols) == (4, 5)
    assert len(full.tiles) == 20 == full.n_grid
    assert [t.index for t in full.tiles] == list(range(20))


def test_plan_numbers_for_a_40x_slide_and_a_20x_model():
    plan = plan_tiles((0, 0, 1000, 700), mpp_l0=0.25, mpp_model=0.5, tile_px=300, halo_px=32)
    assert (plan.read_size_l0, plan.halo_l0, plan.core_size_l0) == (600, 64, 472)
    assert (plan.n_rows, plan.n_cols) == (2, 3)
    assert plan.tiles[-1].core_l0 == (944, 472, 1000, 700)
    assert plan.tiles[-1].read_l0 == (880, 408, 1480, 1008)


@pytest.mark.parametrize("kw", [dict(roi_l0=(10, 10, 10, 50)), dict(roi_l0=(0, 50, 10, 40)),
                                dict(mpp_l0=0.0), dict(mpp_l0=float("nan")), dict(mpp_model=-1),
                                dict(halo_px=150), dict(halo_px=-1),
                                dict(mpp_l0=100.0)])   # 300 px at 0.25 -> 1 l0 px: no core
def test_bad_settings_are_usage_errors(kw):
    args = dict(roi_l0=(0, 0, 500, 500), mpp_l0=0.25, mpp_model=0.25, tile_px=300, halo_px=32)
    args.update(kw)
    with pytest.raises(UsageError) as err:
        plan_tiles(**args)
    assert err.value.hint


def test_roi_from_xywh():
    assert roi_from_xywh(None, 800, 600) == (0, 0, 800, 600)
    assert roi_from_xywh((100, 50, 200, 100), 800, 600) == (100, 50, 300, 150)
    assert roi_from_xywh((700, 500, 500, 500), 800, 600) == (700, 500, 800, 600)
    with pytest.raises(UsageError, match="outside"):
        roi_from_xywh((900, 0, 10, 10), 800, 600)


def test_grid_nuclei_on_core_borders_and_edges_are_owned_once():
    """The synthetic grid puts centres exactly on core borders and nuclei on the slide edges;
    ownership still gives each centre to exactly one tile, and each nucleus is painted."""
    W, H = 1000, 800
    plan = plan_tiles((0, 0, W, H), 0.25, 0.25, tile_px=300, halo_px=32)
    core = plan.core_size_l0
    nuclei = grid_nuclei(W, H, spacing=60, radius=9, core_l0=core)
    xy = np.array([(n.cx, n.cy) for n in nuclei])
    on_x, on_y = np.isin(xy[:, 0], [core, 2 * core]), np.isin(xy[:, 1], [core, 2 * core])
    assert (on_x & on_y).sum() >= 4 and on_x.sum() > 10 and on_y.sum() > 10
    rx = np.array([n.rx for n in nuclei])
    assert (xy[:, 0] - rx <= 0).any() and (xy[:, 0] + rx >= W - 1).any()     # left/right edges
    assert (xy[:, 1] - rx <= 0).any() and (xy[:, 1] + rx >= H - 1).any()     # top/bottom edges
    hits = np.sum([owned(t, xy) for t in plan.tiles], axis=0)
    assert (hits == 1).all()
    _, labels = paint(W, H, nuclei, tissue=[(0, 0, W, H)])
    assert set(np.unique(labels)) == set(range(len(nuclei) + 1))   # none hidden by another
