"""Readers: ImageScope XML, GeoJSON (.gz), instance label images, region/offset, folder pairing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from usnet_wsi import annotations as A
from usnet_wsi.errors import DataError
from usnet_wsi.metrics import evaluate_pair

MONUSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg-train"


def write_xml(path: Path, regions: list[list[tuple[float, float]]], mpp: str = "0.252700") -> Path:
    body = []
    for i, verts in enumerate(regions, start=1):
        vs = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in verts)
        body.append(f'<Region Id="{i}" Type="0"><Attributes/><Vertices>{vs}</Vertices></Region>')
    path.write_text(f'<Annotations MicronsPerPixel="{mpp}"><Annotation Id="1"><Regions>'
                    f'{"".join(body)}</Regions></Annotation></Annotations>')
    return path


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(coords, kind: str = "Polygon", **props) -> dict:
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def write_geojson(path: Path, features: list[dict], gz: bool = False) -> Path:
    text = json.dumps({"type": "FeatureCollection", "features": features})
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


# --------------------------------------------------------------------------- ImageScope XML

def test_xml_pixel_centre_convention_and_file_order(tmp_path):
    # region 1 holds pixel centres x 1..3, y 1..2; region 2 (later) x 3..5, y 2..3 and wins (3, 2)
    path = write_xml(tmp_path / "a.xml", [[(0.5, 0.5), (3.5, 0.5), (3.5, 2.5), (0.5, 2.5)],
                                          [(2.5, 1.5), (5.5, 1.5), (5.5, 3.5), (2.5, 3.5)]])
    shapes = A.load_imagescope_xml(path)
    assert shapes.mpp == pytest.approx(0.2527)
    labels = A.rasterise(shapes, (5, 7)).labels
    expected = np.array([[0, 0, 0, 0, 0, 0, 0],
                         [0, 1, 1, 1, 0, 0, 0],
                         [0, 1, 1, 2, 2, 2, 0],
                         [0, 0, 0, 2, 2, 2, 0],
                         [0, 0, 0, 0, 0, 0, 0]], np.uint32)
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.uint32


def test_xml_degenerate_region_skipped_with_note(tmp_path):
    path = write_xml(tmp_path / "a.xml", [[(1, 1), (2, 2)], [(0.5, 0.5), (2.5, 0.5), (2.5, 2.5)]])
    shapes = A.load_imagescope_xml(path)
    assert len(shapes.nuclei) == 1 and "fewer than 3 vertices" in shapes.notes[0]


@pytest.mark.parametrize("text", ["<Annotations><Region>", "<html><body/></html>"])
def test_xml_unreadable_is_data_error(tmp_path, text):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(DataError):
        A.load_imagescope_xml(path)


def test_xml_reproduces_monuseg_labels():
    if not MONUSEG.exists():
        pytest.skip(f"MoNuSeg data not found at {MONUSEG} (needs ../shared next to the repo)")
    manifest = json.loads((MONUSEG / "manifest.json").read_text())
    name = next(m["name"] for m in manifest
                if m["labels_from"] == "xml" and (MONUSEG / "annotations" / f"{m['name']}.xml").exists())
    pred, gt, _ = A.read_pair(MONUSEG / "annotations" / f"{name}.xml", MONUSEG / "labels" / f"{name}.png")
    assert evaluate_pair(pred.labels, gt.labels)["aji"] == pytest.approx(1.0)
    np.testing.assert_array_equal(pred.labels, gt.labels)


# --------------------------------------------------------------------------- GeoJSON

def test_geojson_pixel_edge_convention_and_score(tmp_path):
    path = write_geojson(tmp_path / "p.geojson", [
        feature([rect(2, 2, 5, 4)], objectType="detection",
                measurements={"Detection probability": 0.7})])
    inst = A.rasterise(A.load_geojson(path), (6, 7))
    expected = np.zeros((6, 7), np.uint32)
    expected[2:4, 2:5] = 1                       # pixels [2, 5) x [2, 4)
    np.testing.assert_array_equal(inst.labels, expected)
    assert inst.scores == {1: 0.7}


def test_geojson_exact_round_trip_of_a_pixel_outline_with_hole(tmp_path):
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union
    from skimage.draw import ellipse
    mask = np.zeros((30, 40), bool)
    mask[ellipse(15, 20, 10, 14, rotation=0.4)] = True
    mask[13:17, 18:22] = False
    outline = unary_union([box(c, r, c + 1, r + 1) for r, c in zip(*np.nonzero(mask))])
    path = write_geojson(tmp_path / "p.geojson", [{"type": "Feature", "geometry": mapping(outline),
                                                   "properties": {}}])
    labels = A.rasterise(A.load_geojson(path), mask.shape).labels
    np.testing.assert_array_equal(labels > 0, mask)


def test_geojson_gz_multipolygon_and_qupath_list_measurements(tmp_path):
    multi = [rect(0, 0, 2, 2), rect(6, 0, 8, 2)]
    path = write_geojson(tmp_path / "p.geojson.gz", [
        feature([[multi[0]], [multi[1]]], kind="MultiPolygon",
                measurements=[{"name": "Detection probability", "value": 0.25}]),
        feature([rect(3, 3, 4, 4)], measurements=[{"name": "Detection probability", "value": 0.5}]),
    ], gz=True)
    inst = A.rasterise(A.load_geojson(path), (5, 9))
    assert set(np.unique(inst.labels[0:2, 0:2])) == {1} and set(np.unique(inst.labels[0:2, 6:8])) == {1}
    assert inst.labels[3, 3] == 2 and (inst.labels > 0).sum() == 9
    assert inst.scores == {1: 0.25, 2: 0.5}


def test_geojson_later_features_overwrite_and_annotations_skipped(tmp_path):
    path = write_geojson(tmp_path / "q.geojson", [
        feature([rect(0, 0, 100, 100)], objectType="annotation"),      # e.g. a tissue outline
        feature([rect(0, 0, 4, 2)], objectType="detection"),
        feature([rect(2, 0, 6, 2)], objectType="detection"),
    ])
    inst = A.rasterise(A.load_geojson(path), (3, 8))
    np.testing.assert_array_equal(inst.labels[0], [1, 1, 2, 2, 2, 2, 0, 0])
    assert any("non-detection" in n for n in inst.notes)
    assert inst.scores is None


def test_geojson_cell_uses_nucleus_geometry(tmp_path):
    cell = feature([rect(0, 0, 8, 8)], objectType="cell")
    cell["nucleusGeometry"] = {"type": "Polygon", "coordinates": [rect(2, 2, 4, 4)]}
    inst = A.rasterise(A.load_geojson(write_geojson(tmp_path / "c.geojson", [cell])), (8, 8))
    assert (inst.labels > 0).sum() == 4


def test_geojson_partial_scores_are_dropped_with_note(tmp_path):
    path = write_geojson(tmp_path / "p.geojson", [
        feature([rect(0, 0, 2, 2)], score=0.9), feature([rect(3, 0, 5, 2)])])
    inst = A.rasterise(A.load_geojson(path), (3, 6))
    assert inst.scores is None and any("no detection score" in n for n in inst.notes)


def test_geojson_plain_list_of_features(tmp_path):
    path = tmp_path / "l.geojson"
    path.write_text(json.dumps([feature([rect(0, 0, 2, 2)])]))
    assert (A.rasterise(A.load_geojson(path), (3, 3)).labels > 0).sum() == 4


@pytest.mark.parametrize("content", [b"{not json", b'{"type": "Point"}', b"\x1f\x8b garbage"])
def test_geojson_unreadable_is_data_error(tmp_path, content):
    path = tmp_path / ("x.geojson.gz" if content.startswith(b"\x1f") else "x.geojson")
    path.write_bytes(content)
    with pytest.raises(DataError):
        A.load_geojson(path)


# --------------------------------------------------------------------------- label images

def test_label_png_and_tiff_round_trip(tmp_path):
    lab = np.zeros((6, 8), np.uint16)
    lab[1:3, 1:4] = 7
    lab[4, 5:8] = 60000
    Image.fromarray(lab).save(tmp_path / "l.png")
    tifffile.imwrite(tmp_path / "l.tif", lab.astype(np.uint32) * 1000)
    png = A.read_label_image(tmp_path / "l.png").labels
    tif = A.read_label_image(tmp_path / "l.tif").labels
    assert png.dtype == np.uint32 and tif.dtype == np.uint32
    np.testing.assert_array_equal(png, lab)
    np.testing.assert_array_equal(tif, lab.astype(np.uint32) * 1000)


def test_rgb_png_is_not_an_instance_map(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="RGB colour image, not an instance map"):
        A.read_label_image(tmp_path / "rgb.png")


def test_float_tiff_is_not_an_instance_map(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match="not an instance map"):
        A.read_label_image(tmp_path / "f.tif")


def test_binary_mask_is_not_an_instance_map(tmp_path):
    Image.fromarray(np.ones((4, 4), bool)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="binary mask"):
        A.read_label_image(tmp_path / "b.png")


def test_missing_and_garbled_label_images(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        A.read_label_image(tmp_path / "nope.png")
    (tmp_path / "g.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        A.read_label_image(tmp_path / "g.png")


def test_unknown_suffix_is_data_error():
    with pytest.raises(DataError, match="unknown annotation format"):
        A.kind_of("x.csv")


def test_stem_of_strips_annotation_suffixes():
    assert A.stem_of("a/b/S1.geojson.gz") == "S1"
    assert A.stem_of("S1.tiff") == "S1" and A.stem_of("S.1.xml") == "S.1"


# --------------------------------------------------------------------------- read_pair

def test_region_clips_predictions_partly_outside(tmp_path):
    gt = np.zeros((20, 20), np.uint16)
    gt[0:4, 0:4] = 1                                     # region-local pixels
    Image.fromarray(gt).save(tmp_path / "gt.png")
    path = write_geojson(tmp_path / "p.geojson", [
        feature([rect(6, 6, 14, 14)], score=0.8),        # slide px; half inside (10, 10, 20, 20)
        feature([rect(100, 100, 104, 104)], score=0.9),  # entirely outside
    ])
    pred, truth, notes = A.read_pair(path, tmp_path / "gt.png", region_l0=(10, 10, 20, 20))
    assert pred.labels.shape == (20, 20)
    np.testing.assert_array_equal(pred.labels > 0, gt > 0)   # cut to the 4x4 inside part
    assert pred.scores == {1: 0.8}
    assert any("outside" in n for n in notes)
    r = evaluate_pair(pred.labels, truth.labels, pred.scores)
    assert r["aji"] == 1.0 and r["counts"]["n_pred"] == 1


def test_offset_shifts_prediction_coordinates(tmp_path):
    gt = np.zeros((10, 10), np.uint16)
    gt[2:4, 3:6] = 5
    Image.fromarray(gt).save(tmp_path / "gt.png")
    path = write_geojson(tmp_path / "p.geojson", [feature([rect(103, 52, 106, 54)])])
    pred, _, _ = A.read_pair(path, tmp_path / "gt.png", offset_xy=(-100, -50))
    np.testing.assert_array_equal(pred.labels > 0, gt > 0)


def test_raster_prediction_cut_by_region(tmp_path):
    slide_pred = np.zeros((50, 60), np.uint32)
    slide_pred[12:15, 22:25] = 9
    tifffile.imwrite(tmp_path / "p.tif", slide_pred)
    gt = np.zeros((10, 10), np.uint16)
    gt[2:5, 2:5] = 1
    Image.fromarray(gt).save(tmp_path / "gt.png")
    pred, _, _ = A.read_pair(tmp_path / "p.tif", tmp_path / "gt.png", region_l0=(20, 10, 10, 10))
    np.testing.assert_array_equal(pred.labels > 0, gt > 0)


def test_raster_shape_mismatch_names_region(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((8, 8), np.uint32))
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((6, 6), np.uint32))
    with pytest.raises(DataError, match="8x8") as err:
        A.read_pair(tmp_path / "p.tif", tmp_path / "g.tif")
    assert "--region" in err.value.hint


def test_gt_size_must_equal_region(tmp_path):
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((6, 6), np.uint32))
    path = write_geojson(tmp_path / "p.geojson", [feature([rect(0, 0, 2, 2)])])
    with pytest.raises(DataError, match="evaluated area is 5x5"):
        A.read_pair(path, tmp_path / "g.tif", region_l0=(0, 0, 5, 5))


def test_two_vector_files_use_their_extent_with_note(tmp_path):
    xml = write_xml(tmp_path / "g.xml", [[(0.5, 0.5), (9.5, 0.5), (9.5, 3.5)]])
    path = write_geojson(tmp_path / "p.geojson", [feature([rect(0, 0, 12, 5)])])
    pred, gt, notes = A.read_pair(path, xml)
    assert pred.labels.shape == gt.labels.shape == (5, 12)
    assert any("--region 0,0,W,H" in n for n in notes)


# --------------------------------------------------------------------------- folders

def test_pair_folders(tmp_path):
    (pred_dir := tmp_path / "pred").mkdir()
    (gt_dir := tmp_path / "gt").mkdir()
    for name in ("a.geojson.gz", "b.geojson", "c.geojson", "b.run.json", "notes.txt"):
        (pred_dir / name).write_text("{}")
    for name in ("a.png", "b.xml", "d.tif"):
        (gt_dir / name).write_text("")
    pairs, unpaired = A.pair_folders(pred_dir, gt_dir)
    assert [(n, p.name, g.name) for n, p, g in pairs] == [("a", "a.geojson.gz", "a.png"),
                                                         ("b", "b.geojson", "b.xml")]
    assert sorted(p.name for p in unpaired) == ["c.geojson", "d.tif"]


def test_pair_folders_errors(tmp_path):
    (pred_dir := tmp_path / "pred").mkdir()
    (gt_dir := tmp_path / "gt").mkdir()
    (pred_dir / "a.geojson").write_text("{}")
    (gt_dir / "z.png").write_text("")
    with pytest.raises(DataError, match="namesake"):
        A.pair_folders(pred_dir, gt_dir)
    (gt_dir / "a.png").write_text("")
    (gt_dir / "a.xml").write_text("")
    with pytest.raises(DataError, match="two files for 'a'"):
        A.pair_folders(pred_dir, gt_dir)
