"""OME-Zarr label writer: NGFF 0.5 metadata, rasterisation, pyramid, banding, table, atomicity."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
import shapely
import zarr
from shapely import affinity
from shapely.geometry import Point, box
from skimage.measure import points_in_poly
from zarr.storage import LocalStore

from usnet_wsi.geometry import polygon_to_mask
from usnet_wsi.writers.zarr import LabelZarrWriter, pyramid_shapes

W, H, MPP_X, MPP_Y = 230, 190, 0.25, 0.26


def _nuclei(seed=0, n=40):
    """Random rotated ellipses (with a few crossing the image border), in row-major order."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cx, cy = rng.uniform(-5, W + 5), rng.uniform(-5, H + 5)
        ell = affinity.scale(Point(cx, cy).buffer(1.0), rng.uniform(3, 9), rng.uniform(3, 9))
        out.append(affinity.rotate(ell, rng.uniform(0, 180)))
    out.sort(key=lambda p: (round(p.bounds[1] / 20), p.bounds[0]))
    holed = Point(60.3, 100.7).buffer(14.2).difference(Point(61.1, 99.9).buffer(4.4))
    out.append(holed)  # late, overlaps others: it must overwrite them
    scores = rng.uniform(0.3, 1.0, len(out))
    return [(i + 1, poly, float(s)) for i, (poly, s) in enumerate(zip(out, scores))]


def _reference(nuclei):
    """One-shot rasterisation with an independent point-in-polygon test (skimage)."""
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    centres = np.column_stack([xs.ravel(), ys.ravel()])
    ref = np.zeros(H * W, np.uint32)
    for label, poly, _ in nuclei:
        inside = points_in_poly(centres, np.asarray(poly.exterior.coords))
        for hole in poly.interiors:
            inside &= ~points_in_poly(centres, np.asarray(hole.coords))
        ref[inside] = label
    return ref.reshape(H, W)


def _write(path, nuclei, chunk_px=32, band_every=None, size=(W, H), **kw):
    """Write nuclei; with band_every, declare rows complete as the row-major stream advances.

    Returns the writer and how many rows were written before close().
    """
    kw.setdefault("min_level_px", 40)
    with LabelZarrWriter(path, *size, MPP_X, MPP_Y, chunk_px=chunk_px,
                         source={"slide": "synthetic"}, **kw) as writer:
        for i, (label, poly, score) in enumerate(nuclei):
            writer.add(label, poly, score)
            if band_every and i % band_every == band_every - 1 and i + 1 < len(nuclei) - 1:
                later = [p.bounds[1] for _, p, _ in nuclei[i + 1:]]
                writer.complete_above(min(later))
        rows_before_close = writer.rows_done
    return writer, rows_before_close


def _levels(path):
    group = zarr.open_group(path, mode="r")
    ds = group["labels/nuclei"].attrs["ome"]["multiscales"][0]["datasets"]
    return group, [group[f"labels/nuclei/{d['path']}"][:] for d in ds]


def test_ngff_05_metadata(tmp_path):
    _write(tmp_path / "s.zarr", _nuclei())
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group.metadata.zarr_format == 3
    assert group.attrs["ome"]["version"] == "0.5"
    labels = group["labels"].attrs["ome"]
    assert labels["version"] == "0.5" and labels["labels"] == ["nuclei"]
    ome = group["labels/nuclei"].attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [(a["name"], a["type"], a["unit"]) for a in ms["axes"]] == [
        ("y", "space", "micrometer"), ("x", "space", "micrometer")]
    shapes = pyramid_shapes(H, W, 40)
    assert len(ms["datasets"]) == len(shapes) >= 3
    for k, ds in enumerate(ms["datasets"]):
        assert ds["path"] == str(k)
        (tr,) = ds["coordinateTransformations"]
        assert tr["type"] == "scale"
        assert tr["scale"] == pytest.approx([MPP_Y * 2**k, MPP_X * 2**k])
        arr = group[f"labels/nuclei/{k}"]
        assert arr.shape == shapes[k] and arr.dtype == np.uint32
        assert arr.metadata.dimension_names == ("y", "x")
        assert all(c <= 32 for c in arr.chunks) and len(arr.compressors) == 1
    image_label = ome["image-label"]
    assert image_label["colors"][0]["label-value"] == 0
    assert len(image_label["colors"][0]["rgba"]) == 4
    assert image_label["source"] == {"slide": "synthetic"}


def test_pyramid_shapes_stop_below_min_side():
    shapes = pyramid_shapes(40000, 30001, 1024)
    assert shapes[0] == (40000, 30001) and shapes[1] == (20000, 15001)
    assert max(shapes[-1]) < 1024 <= max(shapes[-2])
    assert pyramid_shapes(500, 700, 1024) == [(500, 700)]


def test_labels_drawn_where_the_polygons_are(tmp_path):
    nuclei = _nuclei()
    _write(tmp_path / "s.zarr", nuclei)
    _, levels = _levels(tmp_path / "s.zarr")
    np.testing.assert_array_equal(levels[0], _reference(nuclei))
    holed_label = nuclei[-1][0]  # centre (60.3, 100.7), radius 14.2, hole (61.1, 99.9) r 4.4
    assert levels[0][99, 61] != holed_label  # pixel centre (61.5, 99.5) is in the hole
    assert levels[0][100, 69] == holed_label  # (69.5, 100.5) is in the ring


def test_pixel_counts_match_polygon_areas(tmp_path):
    """Lone nuclei fully inside the image: pixel count ~ polygon area (boundary error only)."""
    nuclei = [(i + 1, Point(30.3 + 45 * i, 40.7 + 25 * i).buffer(10.2 + i), 0.9) for i in range(4)]
    _write(tmp_path / "s.zarr", nuclei)
    _, levels = _levels(tmp_path / "s.zarr")
    for label, poly, _ in nuclei:
        count = int((levels[0] == label).sum())
        assert abs(count - poly.area) < 0.5 * poly.length


def test_pyramid_levels_are_stride_samples_of_level_0(tmp_path):
    # 12-row bands: coarse levels (stride 8) start sampling part-way into a band
    _write(tmp_path / "s.zarr", _nuclei(seed=3), chunk_px=12, band_every=5)
    _, levels = _levels(tmp_path / "s.zarr")
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level, levels[0][:: 2**k, :: 2**k])
        assert level.shape == (-(-H // 2**k), -(-W // 2**k))


def test_band_by_band_equals_one_shot(tmp_path):
    nuclei = _nuclei(seed=1, n=60)
    banded, rows_streamed = _write(tmp_path / "banded.zarr", nuclei, chunk_px=16, band_every=4)
    _, rows_oneshot = _write(tmp_path / "oneshot.zarr", nuclei, chunk_px=512)
    assert rows_streamed >= 4 * 16 and rows_streamed % 16 == 0  # bands went out early
    assert rows_oneshot == 0 and banded.rows_done == H
    _, a = _levels(tmp_path / "banded.zarr")
    _, b = _levels(tmp_path / "oneshot.zarr")
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a[0], _reference(nuclei))


def test_complete_above_writes_bands_and_drops_finished_nuclei(tmp_path):
    writer = LabelZarrWriter(tmp_path / "s.zarr", W, H, MPP_X, MPP_Y, chunk_px=16)
    writer.add(1, Point(20, 10).buffer(5), 0.9)  # rows 5..14
    writer.add(2, Point(50, 30).buffer(5), 0.9)  # rows 25..34
    writer.complete_above(40.0)
    assert writer.rows_done == 32  # bands 0-16 and 16-32; 32-48 is not complete yet
    assert writer.n_pending == 1  # nucleus 1 is written and forgotten, 2 reaches row 34
    with pytest.raises(ValueError):
        writer.add(3, Point(80, 28).buffer(5), 0.5)  # reaches rows already written
    writer.add(4, Point(80, 50).buffer(5), 0.5)
    writer.close()
    _, levels = _levels(tmp_path / "s.zarr")
    assert set(np.unique(levels[0])) == {0, 1, 2, 4}


def test_table_read_back(tmp_path):
    nuclei = _nuclei(seed=2, n=23)
    _write(tmp_path / "s.zarr", nuclei, table_chunk=5)
    table = zarr.open_group(tmp_path / "s.zarr", mode="r")["tables/nuclei"]
    np.testing.assert_array_equal(table["id"][:], [n[0] for n in nuclei])
    np.testing.assert_allclose(table["centroid_x"][:], [n[1].centroid.x for n in nuclei])
    np.testing.assert_allclose(table["centroid_y"][:], [n[1].centroid.y for n in nuclei])
    np.testing.assert_allclose(table["bbox"][:], [n[1].bounds for n in nuclei])
    np.testing.assert_allclose(table["area_px"][:], [n[1].area for n in nuclei])
    np.testing.assert_allclose(table["score"][:], [n[2] for n in nuclei], rtol=1e-6)
    assert table["id"].dtype == np.uint32 and table["bbox"].shape == (len(nuclei), 4)


def test_no_nuclei_gives_empty_labels_and_table(tmp_path):
    _write(tmp_path / "s.zarr", [])
    group, levels = _levels(tmp_path / "s.zarr")
    assert all(not level.any() for level in levels)
    assert group["tables/nuclei/id"].shape == (0,)


def test_error_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with LabelZarrWriter(tmp_path / "s.zarr", W, H, MPP_X, MPP_Y, chunk_px=16) as writer:
            writer.add(1, Point(20, 10).buffer(5), 0.9)
            writer.complete_above(100)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_chunk_write_is_reported_and_leaves_nothing(tmp_path, monkeypatch):
    """Chunks are stored by the writer's own thread: a disk error there reaches the caller as
    an OutputError naming the store (at a later band or at close), and the store is removed."""
    import errno

    import usnet_wsi.writers.zarr as zarr_writer
    from usnet_wsi.errors import OutputError
    real, stored = zarr_writer._store_region, []

    def failing(item):
        if stored:
            raise OSError(errno.ENOSPC, "No space left on device")
        stored.append(item[1:3])
        real(item)

    monkeypatch.setattr(zarr_writer, "_store_region", failing)
    nuclei = _nuclei(seed=8, n=40)
    with pytest.raises(OutputError, match="s.zarr"):
        _write(tmp_path / "s.zarr", nuclei, chunk_px=16, band_every=5)
    assert len(stored) == 1 and list(tmp_path.iterdir()) == []


def test_rewrite_replaces_an_existing_store(tmp_path):
    _write(tmp_path / "s.zarr", _nuclei(seed=4))
    nuclei = _nuclei(seed=5, n=10)
    _write(tmp_path / "s.zarr", nuclei)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]
    _, levels = _levels(tmp_path / "s.zarr")
    np.testing.assert_array_equal(levels[0], _reference(nuclei))


def test_bad_label_is_refused(tmp_path):
    with LabelZarrWriter(tmp_path / "s.zarr", W, H, MPP_X, MPP_Y) as writer:
        for bad in (0, 2**32):
            with pytest.raises(ValueError):
                writer.add(bad, Point(20, 10).buffer(5), 0.9)
    assert writer.n_added == 0


def test_adding_many_at_once_equals_adding_one_by_one(tmp_path):
    """`add_many` in groups (as the writer of `segment` adds each tile's final nuclei) gives
    the store that `add` of each gives: every level and every table column, bitwise."""
    nuclei = _nuclei(seed=7, n=60)
    _write(tmp_path / "one.zarr", nuclei, band_every=9, table_chunk=7)
    with LabelZarrWriter(tmp_path / "many.zarr", W, H, MPP_X, MPP_Y, chunk_px=32,
                         min_level_px=40, table_chunk=7, source={"slide": "synthetic"}) as w:
        for i in range(0, len(nuclei), 9):
            group = nuclei[i:i + 9]
            w.add_many([n[0] for n in group], [n[1] for n in group], [n[2] for n in group])
            if i + 9 < len(nuclei) - 1:
                w.complete_above(min(p.bounds[1] for _, p, _ in nuclei[i + 9:]))
    assert w.n_added == len(nuclei)
    one, many = zarr.open_group(tmp_path / "one.zarr"), zarr.open_group(tmp_path / "many.zarr")
    for name in ("labels/nuclei/0", "labels/nuclei/1", "tables/nuclei/id",
                 "tables/nuclei/centroid_x", "tables/nuclei/centroid_y", "tables/nuclei/bbox",
                 "tables/nuclei/area_px", "tables/nuclei/score"):
        np.testing.assert_array_equal(many[name][:], one[name][:], err_msg=name)
    assert many["labels/nuclei/0"][:].any()


def test_add_many_refuses_what_add_refuses(tmp_path):
    ok = Point(20, 60).buffer(5)
    with LabelZarrWriter(tmp_path / "s.zarr", W, H, MPP_X, MPP_Y, chunk_px=16) as writer:
        with pytest.raises(ValueError, match="empty polygon"):
            writer.add_many([1, 2], [ok, Point(5, 5).buffer(0)], [0.9, 0.8])
        with pytest.raises(ValueError, match="label must be"):
            writer.add_many([1, 0], [ok, ok], [0.9, 0.8])
        writer.complete_above(40)
        with pytest.raises(ValueError, match="already declared complete"):
            writer.add_many([1, 2], [ok, Point(20, 10).buffer(5)], [0.9, 0.8])
        assert writer.n_added == 0
        writer.add_many([1], [ok], [0.9])
    assert writer.n_added == 1


# ----------------------------------------------------------------- chunk-wise = one-shot


def _one_shot(nuclei, width, height):
    """Level 0 the plain way: every pixel centre of the canvas tested against every polygon
    (strictly inside, shapely.contains_xy), in `add` order, later nuclei overwriting."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    ref = np.zeros((height, width), np.uint32)
    for label, poly, _ in nuclei:
        ref[shapely.contains_xy(poly, xs, ys)] = label
    return ref


def _ellipse(cx, cy, ax, ay, angle):
    return affinity.rotate(affinity.scale(Point(cx, cy).buffer(1.0), ax, ay), angle)


def _wide_sparse_nuclei():
    """A 12,000 x 150 canvas, chunks of 32: nuclei on chunk corners, across the canvas edges,
    one over 3 x 4 chunks, a holed one, and overlapping pairs (the later must win)."""
    shapes = [
        _ellipse(5_000.4, -2.1, 9.3, 6.2, 10),         # across the top edge
        _ellipse(-3.2, 20.6, 8.1, 5.5, 75),            # across the left edge
        _ellipse(64.2, 31.7, 7.4, 5.1, 20),            # on a chunk corner (64, 32)
        _ellipse(66.0, 34.2, 6.2, 6.9, 140),           # overlaps the previous one
        _ellipse(9_600.3, 32.4, 11.7, 4.2, 0),         # on a chunk border
        _ellipse(3_004.6, 70.2, 61.5, 44.3, 30).difference(Point(3_010.1, 66.3).buffer(12.6)),
        _ellipse(11_995.5, 60.1, 9.1, 7.7, 60),        # across the right edge
        _ellipse(7_000.2, 96.1, 8.8, 8.1, 0),
        _ellipse(7_004.9, 99.8, 5.5, 9.9, 45),         # overlaps the previous one
        _ellipse(1_023.9, 147.3, 7.0, 6.0, 0),         # across the bottom edge
    ]
    shapes.sort(key=lambda p: p.bounds[1])  # row-major enough for the horizon promises
    return [(i + 1, poly, 0.5) for i, poly in enumerate(shapes)]


@pytest.mark.parametrize("case", ["dense", "chunk-12-band-2", "band-3", "wide-sparse"])
def test_chunk_wise_levels_equal_a_one_shot_reference(tmp_path, case):
    """Every pyramid level equals level 0 of the plain reference sampled every 2**k px."""
    size, chunk_px, kw, nuclei = (W, H), 16, {}, _nuclei(seed=6, n=70)
    if case == "chunk-12-band-2":
        chunk_px, kw = 12, {"band_chunks": 2}  # coarse strides do not divide the chunk
    elif case == "band-3":
        kw = {"band_chunks": 3}  # bands straddle level-1 chunk rows
    elif case == "wide-sparse":
        size, chunk_px, nuclei = (12_000, 150), 32, _wide_sparse_nuclei()
    _, rows_streamed = _write(tmp_path / "s.zarr", nuclei, chunk_px=chunk_px, band_every=2,
                              size=size, **kw)
    assert rows_streamed > 0  # some bands were written before close()
    _, levels = _levels(tmp_path / "s.zarr")
    ref = _one_shot(nuclei, *size)
    assert len(levels) == len(pyramid_shapes(size[1], size[0], 40)) >= 3
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level, ref[:: 2**k, :: 2**k], err_msg=f"level {k}")
    assert set(np.unique(levels[0])) == {0} | {label for label, _, _ in nuclei}


# ----------------------------------------------------------------- width-independence


def _count_chunk_writes(monkeypatch):
    """Record every chunk key the stores write: {level: [(row, column), ...]}."""
    written: dict[int, list[tuple[int, int]]] = {}
    original = LocalStore.set

    async def counting_set(self, key, value, *args, **kwargs):
        m = re.fullmatch(r"labels/nuclei/(\d+)/c/(\d+)/(\d+)", key)
        if m:
            written.setdefault(int(m[1]), []).append((int(m[2]), int(m[3])))
        return await original(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", counting_set)
    return written


def _chunks_with_labels(nuclei, k, chunks, height, width):
    """Level-k chunks holding at least one level-0 pixel [r * 2**k, c * 2**k] of a nucleus."""
    s, found = 2**k, set()
    for _, poly, _ in nuclei:
        x0, y0 = (int(v) - 1 for v in poly.bounds[:2])
        mask = polygon_to_mask(poly, (int(poly.bounds[3]) + 2 - y0, int(poly.bounds[2]) + 2 - x0),
                               origin_xy=(x0, y0))
        rows, cols = np.nonzero(mask)
        rows, cols = rows + y0, cols + x0
        keep = (rows % s == 0) & (cols % s == 0) & (rows >= 0) & (cols >= 0)
        keep &= (rows < height) & (cols < width)
        found |= set(zip(rows[keep] // s // chunks[0], cols[keep] // s // chunks[1]))
    return found


def test_wide_sparse_slide_writes_only_touched_chunks_in_bounded_memory(tmp_path, monkeypatch):
    """200,000 x 3,000 px with five nuclei: one level-0 band would be 1024 x 200,000 uint32
    (819 MB); the writer must stay far below that and write only the chunks with labels."""
    width, height, chunk = 200_000, 3_000, 1024
    nuclei = [(1, _ellipse(97 * 1024 + 0.3, 1024.6, 21.5, 13.2, 30), 0.9),   # 4 chunks
              (2, _ellipse(150_321.7, 1_500.2, 18.1, 25.3, 10), 0.8),
              (3, box(40_000.2, 1_800.7, 40_090.6, 1_830.1), 0.7),
              (4, _ellipse(199_990.1, 2_100.4, 19.0, 9.0, 0), 0.6),            # right edge
              (5, _ellipse(3.1, 2_993.3, 12.0, 14.0, 70), 0.5)]                 # corner
    written = _count_chunk_writes(monkeypatch)
    tracemalloc.start()
    try:
        with LabelZarrWriter(tmp_path / "w.zarr", width, height, 0.25, 0.25,
                             chunk_px=chunk) as writer:
            for label, poly, score in nuclei:
                writer.add(label, poly, score)
                writer.complete_above(poly.bounds[1] - 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # measured 27 MiB, the same at 20,000 and 2,000,000 px wide: a few 4 MiB chunks in flight
    assert peak < 1024 * width * 4 / 20  # 41 MB
    root = zarr.open_group(tmp_path / "w.zarr", mode="r")
    n_levels = len(pyramid_shapes(height, width))
    assert sorted(written) == list(range(n_levels)) and n_levels == 9
    for k in range(n_levels):
        expected = _chunks_with_labels(nuclei, k, root[f"labels/nuclei/{k}"].chunks, height, width)
        assert set(written[k]) == expected, f"level {k}"
    assert len(written[0]) == len(set(written[0])) == 8  # 4 + 1 + 1 + 1 + 1, each once
    level0 = root["labels/nuclei/0"]
    for label, poly, _ in nuclei:
        x0, y0, x1, y1 = (int(v) for v in poly.bounds)
        x0, y0 = max(x0 - 2, 0), max(y0 - 2, 0)
        x1, y1 = min(x1 + 3, width), min(y1 + 3, height)
        want = np.where(polygon_to_mask(poly, (y1 - y0, x1 - x0), origin_xy=(x0, y0)), label, 0)
        np.testing.assert_array_equal(level0[y0:y1, x0:x1], want)
