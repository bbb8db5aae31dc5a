"""GeoJSON writer: QuPath detection rules, determinism, gzip, atomicity."""

from __future__ import annotations

import gzip
import json
import math
import uuid

import pytest
from shapely.geometry import LinearRing, Point, Polygon, shape

from usnet_wsi.writers.geojson import GeoJSONWriter, nucleus_uuid

FP = "ab12" * 16


def _records():
    """Circles, a CW ring, a polygon with a hole, a self-intersecting bowtie, a degenerate one."""
    recs = []
    for i in range(6):
        poly = Point(40.123 + 31.7 * i, 25.456 + 7.3 * i).buffer(9.87 + i)
        recs.append({"id": i + 1, "polygon_l0": poly, "score": 0.5 + 0.07 * i,
                     "measurements": {"Nucleus: Area µm^2": poly.area * 0.0625,
                                      "Nucleus: Circularity": 0.9 + i / 100,
                                      "Hematoxylin OD mean": float("nan")}})
    cw = Polygon([(300, 10), (300, 30.333), (320.777, 30.333), (320.777, 10)])
    assert not LinearRing(cw.exterior.coords).is_ccw
    holed = Point(400, 60).buffer(15).difference(Point(401.3, 61.1).buffer(5))
    bowtie = Polygon([(500, 0), (520, 20), (520, 0), (500, 20)])
    sliver = Polygon([(600, 0), (600.001, 0.001), (600.002, 0.002)])
    for j, poly in enumerate((cw, holed, bowtie, sliver)):
        recs.append({"id": 100 + j, "polygon_l0": poly, "score": 0.8,
                     "measurements": {"Nucleus: Solidity": 0.95}})
    return recs


def _write(path, records, gz=False, fp=FP):
    with GeoJSONWriter(path, gz, fp) as writer:
        writer.write(iter(records[:3]))  # several calls stream into one collection
        writer.write(r for r in records[3:])
    return writer


def test_features_follow_qupath_detection_rules(tmp_path):
    records = _records()
    writer = _write(tmp_path / "s.geojson", records)
    doc = json.loads((tmp_path / "s.geojson").read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    assert writer.n_written == len(feats) == len(records) - 1  # the sliver is skipped
    assert writer.n_skipped == 1
    ids = [f["id"] for f in feats]
    assert len(set(ids)) == len(ids)
    for feat, rec in zip(feats, records):
        assert list(feat) == ["type", "id", "geometry", "properties"]
        assert feat["type"] == "Feature"
        assert uuid.UUID(feat["id"]).version == 5
        assert feat["id"] == nucleus_uuid(FP, rec["id"])
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        color = props["classification"]["color"]
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        meas = props["measurements"]
        assert meas["Detection probability"] == pytest.approx(rec["score"])
        for key, value in rec["measurements"].items():
            if math.isfinite(value):
                assert meas[key] == pytest.approx(value)
            else:
                assert key not in meas  # NaN is not valid JSON: left out
        assert feat["geometry"]["type"] == "Polygon"


def test_polygons_are_valid_closed_ccw_and_rounded(tmp_path):
    records = _records()
    _write(tmp_path / "s.geojson", records)
    feats = json.loads((tmp_path / "s.geojson").read_text(encoding="utf-8"))["features"]
    for feat, rec in zip(feats, records):
        rings = feat["geometry"]["coordinates"]
        for k, ring in enumerate(rings):
            assert ring[0] == ring[-1] and len(ring) >= 4
            assert LinearRing(ring).is_ccw == (k == 0)  # exterior CCW, holes CW
            for x, y in ring:
                assert abs(x * 100 - round(x * 100)) < 1e-6 and abs(y * 100 - round(y * 100)) < 1e-6
        poly = shape(feat["geometry"])
        assert poly.is_valid and poly.area > 0
        source = rec["polygon_l0"]
        if source.is_valid:  # same shape up to the 0.01 px grid
            assert poly.symmetric_difference(source).area < 0.02 * source.length
    holed = shape(feats[7]["geometry"])
    assert len(holed.interiors) == 1
    bowtie = shape(feats[8]["geometry"])
    assert bowtie.area == pytest.approx(100.0, rel=1e-3)  # the larger half of the repaired bowtie


def test_output_is_byte_identical_on_repeat(tmp_path):
    for name, gz in (("a.geojson", False), ("a.geojson.gz", True)):
        (tmp_path / "one").mkdir(exist_ok=True)
        (tmp_path / "two").mkdir(exist_ok=True)
        _write(tmp_path / "one" / name, _records(), gz=gz)
        _write(tmp_path / "two" / name, _records(), gz=gz)
        first = (tmp_path / "one" / name).read_bytes()
        assert first == (tmp_path / "two" / name).read_bytes()


def test_gzip_variant_round_trips(tmp_path):
    _write(tmp_path / "a.geojson", _records())
    _write(tmp_path / "a.geojson.gz", _records(), gz=True)
    raw = (tmp_path / "a.geojson.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw) == (tmp_path / "a.geojson").read_bytes()


def test_ids_depend_on_fingerprint_and_nucleus_id():
    assert nucleus_uuid(FP, 7) == nucleus_uuid(FP, 7)
    assert nucleus_uuid(FP, 7) != nucleus_uuid(FP, 8)
    assert nucleus_uuid(FP, 7) != nucleus_uuid("cd34" * 16, 7)


def test_empty_collection_is_valid_json(tmp_path):
    with GeoJSONWriter(tmp_path / "e.geojson", False, FP):
        pass
    assert json.loads((tmp_path / "e.geojson").read_text()) == {
        "type": "FeatureCollection", "features": []}


def test_error_inside_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with GeoJSONWriter(tmp_path / "s.geojson.gz", True, FP) as writer:
            writer.write(_records()[:2])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bad_record_mid_stream_leaves_no_file(tmp_path):
    records = _records()[:2] + [{"id": 9, "score": 0.5}]  # no polygon
    writer = GeoJSONWriter(tmp_path / "s.geojson", False, FP)
    with pytest.raises(KeyError):
        writer.write(records)
    assert list(tmp_path.iterdir()) == []


def test_gz_flag_must_match_file_name(tmp_path):
    with pytest.raises(ValueError):
        GeoJSONWriter(tmp_path / "s.geojson", True, FP)
    assert list(tmp_path.iterdir()) == []
