"""OME-Zarr label writer: NGFF 0.5 metadata, rasterisation, pyramid, banding, table, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from shapely import affinity
from shapely.geometry import Point
from skimage.measure import points_in_poly

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


def _write(path, nuclei, chunk_px=32, band_every=None, **kw):
    """Write nuclei; with band_every, declare rows complete as the row-major stream advances.

    Returns the writer and how many rows were written before close().
    """
    with LabelZarrWriter(path, W, H, MPP_X, MPP_Y, chunk_px=chunk_px, min_level_px=40,
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
