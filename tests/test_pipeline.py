"""segment_slide end to end on synthetic pyramidal slides (real TIFF reading through OpenSlide),
with the oracle as the model: outputs against the QuPath / NGFF rules, round-trip of the true
nuclei, determinism, skip / overwrite, empty slides, failures that leave nothing behind."""

from __future__ import annotations

import gzip
import json
import math
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from PIL import Image
from shapely.geometry import shape

from oracle import OraclePredictor
from synth import default_tissue, grid_nuclei, make_slide
from usnet_wsi.config import SegmentConfig, SlideOptions
from usnet_wsi.errors import OutputError, SlideError, UsageError
from usnet_wsi.measure import MEASUREMENT_NAMES
from usnet_wsi.pipeline import output_paths, prepare_out_dir, segment_slide

W, H, MPP = 600, 500, 0.5
TILE, HALO = 100, 16                   # model tile / halo px at the slide's mpp: core 68 l0 px


def tissue_nuclei(width, height, seed=0):
    """Grid nuclei (with some on core borders) kept inside the default tissue rectangle."""
    x0, y0, x1, y1 = default_tissue(width, height)[0]
    every = grid_nuclei(width, height, spacing=44, radius=8, core_l0=TILE - 2 * HALO, seed=seed)
    return [n for n in every if x0 + 10 <= n.cx < x1 - 10 and y0 + 10 <= n.cy < y1 - 10]


@pytest.fixture
def slide(tmp_path):
    return make_slide(tmp_path / "case-01.svs", W, H, mpp=MPP, kind="svs",
                      nuclei=tissue_nuclei(W, H), tile=128, levels=(1, 4))


def oracle_for(s, **kw):
    return OraclePredictor.for_slide(s, MPP, TILE, HALO, **kw)


def config(tmp_path, **kw):
    out = kw.pop("out_dir", tmp_path / "out")
    out.mkdir(exist_ok=True)
    return SegmentConfig(out_dir=out, **kw)


def read_geojson(path: Path) -> dict:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return json.loads(raw)


def check_qupath_features(fc: dict) -> list:
    """The QuPath detection rules of the issue; returns the shapely polygons."""
    assert fc["type"] == "FeatureCollection"
    polys, ids = [], set()
    for f in fc["features"]:
        assert f["type"] == "Feature"
        assert uuid.UUID(f["id"]).version == 5
        ids.add(f["id"])
        assert f["geometry"]["type"] == "Polygon"
        poly = shape(f["geometry"])
        assert poly.is_valid and poly.area > 0
        props = f["properties"]
        assert props["objectType"] == "detection"
        cls = props["classification"]
        assert cls["name"] == "Nucleus"
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                               for c in cls["color"])
        m = props["measurements"]
        assert set(m) == set(MEASUREMENT_NAMES)
        assert all(math.isfinite(v) for v in m.values())
        assert 0 < m["Detection probability"] <= 1
        assert m["Nucleus: Area µm^2"] == pytest.approx(poly.area * MPP * MPP, rel=1e-3)
        polys.append(poly)
    assert len(ids) == len(fc["features"])
    return polys


def test_outputs_follow_the_rules_and_every_nucleus_comes_back_once(tmp_path, slide, reporter):
    cfg = config(tmp_path, batch_size=3, workers=2)
    res = segment_slide(slide.path, cfg, oracle_for(slide), reporter)
    paths = output_paths(cfg.out_dir, "case-01", False)
    assert res.status == "done" and res.name == "case-01"
    assert sorted(p.name for p in cfg.out_dir.iterdir()) == sorted(p.name for p in paths.all())

    polys = check_qupath_features(read_geojson(paths.geojson))
    hits = Counter()
    for poly in polys:                      # each output lies on exactly one true nucleus
        c = poly.centroid
        hits[int(slide.labels[int(c.y), int(c.x)])] += 1
    assert hits[0] == 0
    assert sorted(hits) == list(range(1, len(slide.nuclei) + 1))
    assert set(hits.values()) == {1} and res.nuclei == len(slide.nuclei)
    arr = np.array(polys, dtype=object)
    a, b = shapely.STRtree(arr).query(arr, predicate="intersects")
    pair = a < b
    assert np.all(shapely.area(shapely.intersection(arr[a[pair]], arr[b[pair]])) < 1e-6)


def test_zarr_is_ngff_labels_with_table_and_matches_geojson(tmp_path, slide, reporter):
    cfg = config(tmp_path)
    segment_slide(slide.path, cfg, oracle_for(slide), reporter)
    paths = output_paths(cfg.out_dir, "case-01", False)
    root = zarr.open_group(paths.zarr, mode="r")
    assert root.metadata.zarr_format == 3
    assert root.attrs["ome"]["version"] == "0.5"
    assert root["labels"].attrs["ome"]["labels"] == ["nuclei"]
    ome = root["labels/nuclei"].attrs["ome"]
    assert "image-label" in ome
    datasets = ome["multiscales"][0]["datasets"]
    assert datasets[0]["coordinateTransformations"][0]["scale"] == [MPP, MPP]
    level0 = root[f"labels/nuclei/{datasets[0]['path']}"][:]
    assert level0.shape == (H, W) and level0.dtype == np.uint32
    n = len(read_geojson(paths.geojson)["features"])
    assert set(np.unique(level0)) == set(range(n + 1))
    ids = root["tables/nuclei/id"][:]
    assert sorted(ids.tolist()) == list(range(1, n + 1))
    cx, cy = root["tables/nuclei/centroid_x"][:], root["tables/nuclei/centroid_y"][:]
    # every label sits on the true nucleus whose centre the table gives
    for label, x, y in zip(ids, cx, cy):
        true = slide.labels[int(y), int(x)]
        assert true > 0
        overlap = (slide.labels[level0 == label] == true).mean()
        assert overlap > 0.9


def test_run_json_and_overview(tmp_path, slide, reporter):
    cfg = config(tmp_path, argv=("usnet-wsi", "segment", "x.svs", "-o", "out"))
    oracle = oracle_for(slide)
    segment_slide(slide.path, cfg, oracle, reporter)
    paths = output_paths(cfg.out_dir, "case-01", False)
    run = json.loads(paths.run_json.read_text())
    for key in ("usnet_wsi_version", "command", "weights", "settings", "slide", "device",
                "timings_s", "counts", "outputs", "plan", "tissue"):
        assert key in run, key
    assert run["command"] == "usnet-wsi segment x.svs -o out"
    assert run["weights"] == {"name": "oracle", "sha256": oracle.sha256}
    assert run["slide"]["fingerprint"] and run["slide"]["properties"]["openslide.vendor"] == "aperio"
    assert run["settings"]["batch_size"] == cfg.batch_size
    assert run["counts"]["nuclei"] == len(slide.nuclei) == run["counts"]["geojson_features"]
    assert run["counts"]["tiles"] == run["plan"]["tiles_planned"] > 0
    assert {"read", "predict", "post", "merge", "write", "total"} <= set(run["timings_s"])
    assert run["outputs"]["geojson"] == "case-01.geojson"
    img = Image.open(paths.overview)
    assert img.format == "PNG" and img.size[0] == W          # thumbnail of a small slide: 1:1


@pytest.mark.parametrize("gz", [False, True])
def test_batch_and_workers_do_not_change_the_bytes(tmp_path, slide, reporter, gz):
    outs = []
    # workers 0 writes in a thread, 1 or more in a writer process of its own
    for i, (batch, workers) in enumerate(((1, 0), (1, 1), (7, 3), (7, 3))):
        cfg = config(tmp_path, out_dir=tmp_path / f"o{i}", batch_size=batch, workers=workers,
                     geojson_gz=gz)
        segment_slide(slide.path, cfg, oracle_for(slide), reporter)
        paths = output_paths(cfg.out_dir, "case-01", gz)
        run = json.loads(paths.run_json.read_text())
        outs.append((paths.geojson.read_bytes(), run["manifest"][paths.zarr.name],
                     run["counts"]["geojson_features"]))
    assert outs[0] == outs[1] == outs[2] == outs[3] and len(outs[0][0]) > 1000


def test_generic_tiff_roi_and_tissue(tmp_path, reporter):
    s = make_slide(tmp_path / "g.tif", W, H, mpp=MPP, kind="tiff", nuclei=tissue_nuclei(W, H),
                   tile=128, levels=(1, 4))
    roi = (150, 120, 260, 200)                                # x, y, w, h
    cfg = config(tmp_path, slide=SlideOptions(roi_xywh=roi))
    res = segment_slide(s.path, cfg, oracle_for(s), reporter)
    polys = check_qupath_features(read_geojson(output_paths(cfg.out_dir, "g", False).geojson))
    inside = [n for n in s.nuclei if roi[0] + 1 <= n.cx + 0.5 < roi[0] + roi[2] - 1
              and roi[1] + 1 <= n.cy + 0.5 < roi[1] + roi[3] - 1]
    assert len(inside) >= 10
    found = {int(s.labels[int(p.centroid.y), int(p.centroid.x)]) for p in polys}
    assert {s.nuclei.index(n) + 1 for n in inside} <= found
    assert res.nuclei == len(polys) <= len(inside) + 8       # only ROI-edge ambiguities extra
    assert all(roi[0] - 1 <= p.centroid.x <= roi[0] + roi[2] + 1 for p in polys)


def test_blank_slide_gives_empty_valid_outputs_and_a_warning(tmp_path, reporter):
    s = make_slide(tmp_path / "blank.svs", 400, 300, mpp=MPP, nuclei=[], tissue=[], tile=128)
    cfg = config(tmp_path)
    oracle = oracle_for(s)
    res = segment_slide(s.path, cfg, oracle, reporter)
    assert res.status == "done" and res.nuclei == 0 and res.tiles == 0
    assert any("no tissue" in w for w in reporter.warnings)
    paths = output_paths(cfg.out_dir, "blank", False)
    assert read_geojson(paths.geojson) == {"type": "FeatureCollection", "features": []}
    labels = zarr.open_group(paths.zarr, mode="r")["labels/nuclei/0"][:]
    assert labels.shape == (300, 400) and not labels.any()
    assert json.loads(paths.run_json.read_text())["counts"]["nuclei"] == 0
    assert oracle.calls == 0


def test_skip_complete_outputs_and_overwrite(tmp_path, slide, reporter):
    cfg = config(tmp_path)
    segment_slide(slide.path, cfg, oracle_for(slide), reporter)
    paths = output_paths(cfg.out_dir, "case-01", False)
    stamp = paths.run_json.stat().st_mtime_ns

    def fail():
        raise AssertionError("the model must not be loaded for a skipped slide")

    res = segment_slide(slide.path, cfg, fail, reporter)
    assert res.status == "skipped" and any("skipped" in m for m in reporter.infos)
    assert paths.run_json.stat().st_mtime_ns == stamp

    redo = SegmentConfig(out_dir=cfg.out_dir, overwrite=True)
    assert segment_slide(slide.path, redo, oracle_for(slide), reporter).status == "done"
    assert paths.run_json.stat().st_mtime_ns != stamp

    paths.run_json.unlink()                                   # incomplete: redone, not skipped
    assert segment_slide(slide.path, cfg, oracle_for(slide), reporter).status == "done"


def test_same_name_from_another_slide_is_refused(tmp_path, slide, reporter):
    cfg = config(tmp_path)
    segment_slide(slide.path, cfg, oracle_for(slide), reporter)
    (tmp_path / "b").mkdir()
    other = make_slide(tmp_path / "b" / "case-01.svs", 300, 300, mpp=MPP, nuclei=[], tile=128)
    with pytest.raises(OutputError, match="another slide"):
        segment_slide(other.path, cfg, oracle_for(other), reporter)


class _Failing(OraclePredictor):
    def predict(self, tiles, meta=None, regions=None):
        if meta[0].index > 10:
            raise RuntimeError("device lost")
        return super().predict(tiles, meta, regions)


def test_a_failing_run_leaves_no_outputs_only_its_journal(tmp_path, slide, reporter):
    cfg = config(tmp_path, batch_size=2)
    with pytest.raises(RuntimeError, match="device lost"):
        segment_slide(slide.path, cfg, _Failing.for_slide(slide, MPP, TILE, HALO), reporter)
    assert [p.name for p in cfg.out_dir.iterdir()] == [".case-01.partial"]


def test_a_failed_run_is_resumed_and_gives_the_same_outputs(tmp_path, slide, reporter):
    ref = config(tmp_path, out_dir=tmp_path / "ref")
    segment_slide(slide.path, ref, oracle_for(slide), reporter)
    cfg = config(tmp_path, batch_size=2)
    with pytest.raises(RuntimeError, match="device lost"):
        segment_slide(slide.path, cfg, _Failing.for_slide(slide, MPP, TILE, HALO), reporter)
    oracle = oracle_for(slide)
    assert segment_slide(slide.path, cfg, oracle, reporter).status == "done"
    record = json.loads(output_paths(cfg.out_dir, "case-01", False).run_json.read_text())
    tiles = record["counts"]["tiles"]
    assert 0 < record["counts"]["resumed_tiles"] <= 12 < tiles   # tiles before the failed batch
    assert oracle.calls < math.ceil(tiles / 2)          # only the remaining tiles were predicted
    a, b = (output_paths(d, "case-01", False) for d in (ref.out_dir, cfg.out_dir))
    assert a.geojson.read_bytes() == b.geojson.read_bytes()
    assert [p.name for p in cfg.out_dir.iterdir() if p.name.startswith(".")] == []


def test_slide_errors_come_before_any_output(tmp_path, reporter):
    s = make_slide(tmp_path / "nompp.tif", 300, 300, kind="no-mpp", nuclei=[], tile=128)
    cfg = config(tmp_path)
    with pytest.raises(SlideError, match="--mpp"):
        segment_slide(s.path, cfg, oracle_for(s), reporter)
    with pytest.raises(UsageError, match="--roi"):
        segment_slide(s.path, SegmentConfig(out_dir=cfg.out_dir, slide=SlideOptions(
            mpp=0.5, roi_xywh=(5000, 0, 10, 10))), oracle_for(s), reporter)
    assert list(cfg.out_dir.iterdir()) == []


def test_prepare_out_dir(tmp_path):
    assert prepare_out_dir(tmp_path / "new" / "deep") is True
    assert prepare_out_dir(tmp_path / "new" / "deep") is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_out_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot write"):
        prepare_out_dir(tmp_path / "file" / "sub")
