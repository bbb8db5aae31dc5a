"""Streaming cross-tile merge: de-duplication, overlap clipping, order, memory (usnet_wsi.merge)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Point, Polygon, box

from usnet_wsi.geometry import mask_to_polygon, polygon_to_mask, transform_polygon
from usnet_wsi.merge import Merger
from usnet_wsi.nuclei import Nucleus
from usnet_wsi.tiling import TilePlan, owned, plan_tiles, tile_to_l0

# 100 px read boxes, 10 px halo, 80 px cores (mpp 1 everywhere keeps frames easy to read).
HALO, CORE = 10, 80


def _plan(n_cols: int = 3, n_rows: int = 3, halo_px: int = HALO, tile_px: int = 100) -> TilePlan:
    core = tile_px - 2 * halo_px
    return plan_tiles((0, 0, n_cols * core, n_rows * core), 1.0, 1.0, tile_px=tile_px,
                      halo_px=halo_px)


def _disk(cx: float, cy: float, r: float, wobble: float = 0.0, seed: int = 0) -> Polygon:
    """A 48-gon disk; `wobble` perturbs the radius per vertex (a slightly different outline)."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    rr = r + wobble * np.random.default_rng(seed).uniform(-1, 1, t.size)
    return Polygon(np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], axis=1))


def _owner(plan: TilePlan, poly: Polygon) -> int:
    c = np.array([[poly.centroid.x, poly.centroid.y]])
    return next(t.index for t in plan.tiles if owned(t, c)[0])


def _by_tile(plan: TilePlan, nuclei: list[tuple[Polygon, float]]) -> dict[int, list[Nucleus]]:
    out: dict[int, list[Nucleus]] = {t.index: [] for t in plan.tiles}
    for poly, score in nuclei:
        k = _owner(plan, poly)
        out[k].append(Nucleus(poly, score, k))
    return out


def _run(plan: TilePlan, per_tile: dict[int, list[Nucleus]], **kw) -> tuple[list[Nucleus], Merger]:
    merger = Merger(plan, **kw)
    out: list[Nucleus] = []
    for tile in plan.tiles:
        out += merger.add(tile, per_tile.get(tile.index, []))
    return out + merger.flush(), merger


def _assert_valid_and_disjoint(out: list[Nucleus]) -> None:
    polys = [n.polygon_l0 for n in out]
    assert all(isinstance(p, Polygon) and p.is_valid and p.area > 0 for p in polys)
    tree = shapely.STRtree(polys)
    a, b = tree.query(polys, predicate="intersects")
    pairs = a < b
    if pairs.any():
        arr = np.array(polys, dtype=object)
        inter = shapely.area(shapely.intersection(arr[a[pairs]], arr[b[pairs]]))
        assert inter.max() < 1e-6


# -- de-duplication --------------------------------------------------------------------------


@pytest.mark.parametrize("score_left, score_right, winner", [
    (0.9, 0.8, 0), (0.7, 0.95, 1), (0.8, 0.8, 0),  # equal scores: the lower tile index wins
])
def test_same_nucleus_from_two_tiles_is_kept_once(score_left, score_right, winner):
    plan = _plan()
    # One physical nucleus on the core border x = 80 between tiles 0 and 1: each tile saw a
    # slightly different outline and put its centre on its own side of the border.
    left = _disk(79.0, 40.0, 7.0, wobble=0.6, seed=1)
    right = _disk(81.2, 40.5, 7.3, wobble=0.6, seed=2)
    assert _owner(plan, left) == 0 and _owner(plan, right) == 1
    per_tile = {0: [Nucleus(left, score_left, 0)], 1: [Nucleus(right, score_right, 1)]}
    out, merger = _run(plan, per_tile)
    assert len(out) == 1
    assert out[0].tile_index == winner
    assert out[0].polygon_l0.equals((left, right)[winner])
    assert merger.stats.duplicates == 1 and merger.stats.emitted == 1


def test_contained_nucleus_is_a_duplicate_even_with_low_iou():
    plan = _plan()
    big = _disk(79.0, 120.0, 9.0)
    small = _disk(82.0, 120.0, 4.0)   # inside `big`: IoU ~ 0.2, containment 1.0
    out, _ = _run(plan, _by_tile(plan, [(big, 0.6), (small, 0.9)]))
    assert len(out) == 1 and out[0].polygon_l0.equals(small)


# -- overlap clipping --------------------------------------------------------------------------


def test_overlap_goes_to_the_higher_score_and_outlines_stay_valid():
    plan = _plan()
    a = _disk(76.0, 40.0, 6.0)     # tile 0
    b = _disk(86.0, 40.0, 6.0)     # tile 1; overlaps `a` a little (IoU well under 0.3)
    assert _owner(plan, a) != _owner(plan, b)
    out, merger = _run(plan, _by_tile(plan, [(a, 0.6), (b, 0.9)]))
    assert len(out) == 2
    kept_a, kept_b = sorted(out, key=lambda n: n.centroid_l0[0])
    assert kept_b.polygon_l0.equals(b)                   # the higher score is untouched
    assert kept_a.polygon_l0.area == pytest.approx(a.difference(b).area)
    assert kept_a.score == 0.6 and merger.stats.clipped == 1
    _assert_valid_and_disjoint(out)


def test_overlap_inside_one_tile_is_clipped_too():
    plan = _plan()
    a, b = _disk(30.0, 30.0, 8.0), _disk(42.0, 30.0, 8.0)
    out, _ = _run(plan, {0: [Nucleus(a, 0.9, 0), Nucleus(b, 0.5, 0)]})
    assert len(out) == 2
    assert out[0].polygon_l0.equals(a) or out[1].polygon_l0.equals(a)
    _assert_valid_and_disjoint(out)


def test_cut_in_two_keeps_the_largest_part_and_small_remainders_are_dropped():
    plan = _plan()
    bar = box(50.0, 38.0, 90.0, 42.0)          # long thin nucleus, centre x = 70 (tile 0)
    blob = _disk(60.0, 40.0, 6.0)              # crosses the bar left of its centre
    out, _ = _run(plan, _by_tile(plan, [(bar, 0.5), (blob, 0.9)]))
    rest = next(n for n in out if n.score == 0.5).polygon_l0
    assert isinstance(rest, Polygon) and rest.is_valid
    # The bar is cut into a 4 px stub (left) and a ~24 px piece (right): the right one stays.
    assert rest.bounds[2] == 90.0 and 65.5 < rest.bounds[0] < 66.0
    assert rest.area == pytest.approx(max(p.area for p in bar.difference(blob).geoms))
    _assert_valid_and_disjoint(out)
    # With lax duplicate thresholds, a nucleus left with < 30% of its area disappears.
    a, b = _disk(60.0, 40.0, 8.0), _disk(63.0, 40.0, 8.0)
    lax = dict(iou_threshold=1.0, containment_threshold=1.0)
    out, merger = _run(plan, _by_tile(plan, [(a, 0.9), (b, 0.4)]), **lax)
    assert [n.score for n in out] == [0.9] and merger.stats.dropped_small == 1


# -- exactly once, order, memory ------------------------------------------------------------


def _random_nuclei(rng: random.Random, plan: TilePlan, n: int, separated: bool,
                   r_min: float = 2.0) -> list:
    """Random disks fully inside the ROI; `separated` keeps them 1 px apart (no conflicts)."""
    x1, y1 = plan.roi_l0[2], plan.roi_l0[3]
    placed: list[tuple[Polygon, float]] = []
    for _ in range(n * 20):
        if len(placed) == n:
            break
        r = rng.uniform(r_min, min(HALO, plan.halo_l0) - 0.5)
        poly = _disk(rng.uniform(r, x1 - r), rng.uniform(r, y1 - r), r, wobble=0.3,
                     seed=rng.randrange(1 << 30))
        if separated and any(poly.distance(p) < 1.0 for p, _ in placed):
            continue
        placed.append((poly, round(rng.uniform(0.3, 1.0), 2)))
    return placed


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), halo=st.sampled_from([10, 30]))
def test_separated_nuclei_come_out_exactly_once_unchanged(seed, halo):
    rng = random.Random(seed)
    plan = _plan(3, 4, halo_px=halo)
    nuclei = _random_nuclei(rng, plan, 25, separated=True)
    out, merger = _run(plan, _by_tile(plan, nuclei))
    assert sorted(shapely.to_wkb(n.polygon_l0) for n in out) == \
        sorted(shapely.to_wkb(p) for p, _ in nuclei)
    assert merger.n_pending == 0 and merger.stats.emitted == len(nuclei)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), halo=st.sampled_from([10, 30]))
def test_crowded_nuclei_leave_valid_disjoint_outlines_and_balanced_counts(seed, halo):
    rng = random.Random(seed)
    plan = _plan(3, 3, halo_px=halo)
    nuclei = _random_nuclei(rng, plan, 40, separated=False)
    out, merger = _run(plan, _by_tile(plan, nuclei))
    _assert_valid_and_disjoint(out)
    s = merger.stats
    assert s.added == len(nuclei) == s.emitted + s.duplicates + s.dropped_small + s.dropped_empty
    # Each output is (a part of) an input of the same tile and score.
    for n in out:
        assert any(n.tile_index == _owner(plan, p) and n.score == sc
                   and n.polygon_l0.difference(p).area < 1e-6 for p, sc in nuclei)
    # The single best-scored nucleus is never suppressed nor cut.
    best = max(sc for _, sc in nuclei)
    top = [p for p, sc in nuclei if sc == best]
    if len(top) == 1:
        assert any(n.polygon_l0.equals(top[0]) for n in out)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_output_order_ignores_listing_order_within_tiles(seed):
    rng = random.Random(seed)
    plan = _plan(3, 3)
    nuclei = _random_nuclei(rng, plan, 40, separated=False)
    # Few distinct scores: many ties, decided by the order within the tile, not the listing.
    per_tile = _by_tile(plan, [(p, 0.5 + 0.1 * (sc > 0.8)) for p, sc in nuclei])
    reference, _ = _run(plan, per_tile)
    shuffled = {k: rng.sample(v, len(v)) for k, v in per_tile.items()}
    again, _ = _run(plan, shuffled)
    assert [n.polygon_l0.wkb for n in again] == [n.polygon_l0.wkb for n in reference]
    assert [(n.tile_index, n.score) for n in again] == [(n.tile_index, n.score) for n in reference]
    keys = [(n.tile_index, n.centroid_l0[1], n.centroid_l0[0]) for n in reference]
    assert keys == sorted(keys)


def test_rows_are_emitted_once_two_rows_later_and_never_touched_again():
    plan = _plan(3, 5)
    rng = random.Random(7)
    per_tile = _by_tile(plan, _random_nuclei(rng, plan, 60, separated=False))
    merger = Merger(plan)
    emitted_rows: list[int] = []
    for tile in plan.tiles:
        new = merger.add(tile, per_tile[tile.index])
        emitted_rows += [plan.tiles[n.tile_index].row for n in new]
        if tile.col == 0 and tile.row >= 2:
            # Row r+2 has begun: rows <= r are gone from memory and were returned.
            assert min(merger.pending_rows) >= tile.row - 1
            assert set(range(tile.row - 1)) <= set(emitted_rows) | _empty_rows(per_tile, plan)
        assert max(merger.pending_rows, default=tile.row) - min(merger.pending_rows, default=0) <= 1
    assert emitted_rows == sorted(emitted_rows)
    assert merger.flush() and merger.n_pending == 0


def _empty_rows(per_tile, plan) -> set[int]:
    full = {plan.tiles[k].row for k, v in per_tile.items() if v}
    return set(range(plan.n_rows)) - full


def test_large_halo_waits_longer_but_stays_correct():
    plan = _plan(2, 6, halo_px=35, tile_px=100)     # core 30 < 2 * halo 70: lag of 4 rows
    assert plan.core_size_l0 < 2 * plan.halo_l0
    merger = Merger(plan)
    first = plan.tiles[0]
    cx, cy = (first.core_l0[0] + first.core_l0[2]) / 2, (first.core_l0[1] + first.core_l0[3]) / 2
    merger.add(first, [Nucleus(_disk(cx, cy, 5.0), 0.5, 0)])
    released_at = None
    for tile in plan.tiles[1:]:
        if merger.add(tile, []):
            released_at = tile.row
            break
    # Row 0 reads down to y = 30 + 35 = 65; rows 3+ read from y >= 3*30 - 35 = 55 < 65 and
    # row 4 from 85: only the arrival of row 4 makes row 0 final.
    assert released_at == 4


def test_sparse_plan_rows_without_tissue():
    full = _plan(2, 5)
    tissue = np.ones((5 * CORE, 2 * CORE), bool)
    tissue[CORE - HALO - 5: 4 * CORE + HALO + 5, :] = False       # only rows 0 and 4 touch it
    plan = plan_tiles(full.roi_l0, 1.0, 1.0, tile_px=100, halo_px=HALO, tissue=tissue)
    assert {t.row for t in plan.tiles} == {0, 4}
    merger = Merger(plan)
    nucleus = Nucleus(_disk(40.0, 40.0, 5.0), 0.7, 0)
    assert merger.add(plan.tiles[0], [nucleus]) == []
    assert merger.add(plan.tiles[1], []) == []
    assert merger.add(plan.tiles[2], []) == [nucleus]    # first tile of row 4: row 0 is final


# -- oracle round trip through tiling + geometry ------------------------------------------------


def test_oracle_masks_through_tiles_come_back_once_each():
    plan = _plan(3, 3)
    truth = [p for p, _ in _random_nuclei(random.Random(3), plan, 30, separated=True, r_min=4.0)]
    merger, out = Merger(plan), []
    for tile in plan.tiles:
        found = []
        for k, poly in enumerate(truth):
            # What a perfect model sees: the nucleus pixels inside this tile's read box.
            mask = polygon_to_mask(poly, (100, 100), origin_xy=tile.read_l0[:2])
            tile_poly = mask_to_polygon(mask)
            if tile_poly is None:
                continue
            poly_l0 = transform_polygon(tile_poly, lambda xy, t=tile: tile_to_l0(xy, t, plan))
            c = np.array([[poly_l0.centroid.x, poly_l0.centroid.y]])
            if owned(tile, c)[0]:
                found.append(Nucleus(poly_l0, 0.5 + k / 100, tile.index))
        out += merger.add(tile, found)
    out += merger.flush()
    expected = [round(0.5 + k / 100, 3) for k in range(len(truth))]
    assert sorted(round(n.score, 3) for n in out) == expected
    for n in out:
        gt = truth[round((n.score - 0.5) * 100)]
        x0, y0 = (math.floor(v) - 2 for v in gt.bounds[:2])
        want = polygon_to_mask(gt, (30, 30), origin_xy=(x0, y0))   # the pixels the model saw
        got = polygon_to_mask(n.polygon_l0, (30, 30), origin_xy=(x0, y0))
        assert (want & got).sum() / (want | got).sum() > 0.9


# -- misuse ------------------------------------------------------------------------------------


def test_misuse_is_reported():
    plan = _plan()
    merger = Merger(plan)
    merger.add(plan.tiles[1], [])
    with pytest.raises(ValueError, match="plan order"):
        merger.add(plan.tiles[0], [])
    with pytest.raises(ValueError, match="nucleus of tile 0"):
        merger.add(plan.tiles[2], [Nucleus(_disk(180.0, 40.0, 4.0), 0.5, 0)])
    far = Nucleus(_disk(200.0, 40.0, 4.0).union(Point(300.0, 40.0).buffer(2.0)).convex_hull, 0.5, 3)
    with pytest.raises(ValueError, match="read box"):
        merger.add(plan.tiles[3], [far])
    other = _plan(4, 4)
    with pytest.raises(ValueError, match="not a tile"):
        merger.add(other.tiles[15], [])
    merger.flush()
    with pytest.raises(ValueError, match="after flush"):
        merger.add(plan.tiles[8], [])
    with pytest.raises(ValueError, match="iou_threshold"):
        Merger(plan, iou_threshold=1.5)


def test_nucleus_properties():
    n = Nucleus(box(10.0, 20.0, 14.0, 30.0), 0.5, 0)
    assert n.centroid_l0 == (12.0, 25.0)
    assert n.bbox_l0 == (10.0, 20.0, 14.0, 30.0)
    assert math.isnan(n.hematoxylin_od)
