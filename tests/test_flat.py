"""Flat images (PNG, JPEG, flat TIFF, OME-TIFF) read with tifffile / Pillow when OpenSlide cannot:
regions and resolution, the same nuclei as the same image written as a slide, the CLI on them,
and a flat MoNuSeg image segmented as accurately as inside a slide (when ../shared is there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from oracle import OraclePredictor
from synth import grid_nuclei, make_slide, paint
from usnet_wsi.cli import main
from usnet_wsi.config import SegmentConfig
from usnet_wsi.errors import SlideError
from usnet_wsi.pipeline import output_paths, segment_slide
from usnet_wsi.slide import open_slide

W, H, MPP, TILE, HALO = 360, 300, 0.5, 100, 16


def image():
    nuclei = grid_nuclei(W, H, spacing=50, radius=8, core_l0=TILE - 2 * HALO, edges=False)
    img, _ = paint(W, H, nuclei, [(0, 0, W, H)])
    return img, nuclei


def write(path: Path, img: np.ndarray, fmt: str) -> Path:
    res = {"resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER"}
    if fmt == "strips":
        tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=16, compression="zlib", **res)
    elif fmt == "ome":
        tifffile.imwrite(path, img, photometric="rgb", ome=True,
                         metadata={"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP})
    elif fmt == "ome-planar":
        tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", ome=True,
                         planarconfig="separate",
                         metadata={"axes": "CYX", "PhysicalSizeX": MPP * 1000,
                                   "PhysicalSizeXUnit": "nm", "PhysicalSizeY": MPP})
    elif fmt == "png":
        Image.fromarray(img).save(path, dpi=(25400 / MPP, 25400 / MPP))
    elif fmt == "jpeg":
        Image.fromarray(img).save(path, quality=95)
    return path


@pytest.mark.parametrize("fmt, name, source", [
    ("strips", "a.tif", "tiff"), ("ome", "a.ome.tif", "ome"), ("ome-planar", "b.ome.tiff", "ome"),
    ("png", "a.png", "tiff")])
def test_flat_formats_read_exactly_with_their_resolution(tmp_path, fmt, name, source):
    img, _ = image()
    with open_slide(write(tmp_path / name, img, fmt)) as s:
        assert s.info.vendor.endswith("(flat)")
        assert (s.info.mpp_x, s.info.mpp_y, s.info.mpp_source) == (pytest.approx(MPP),
                                                                   pytest.approx(MPP), source)
        np.testing.assert_array_equal(s.read_region((30, 40, 230, 140), (200, 100)),
                                      img[40:140, 30:230])
        edge = s.read_region((-20, -10, 80, 90), (100, 100))   # white outside the image
        assert (edge[:10] == 255).all() and (edge[:, :20] == 255).all()
        np.testing.assert_array_equal(edge[10:, 20:], img[:90, :80])
        thumb, scale = s.thumbnail(90)
        assert thumb.shape == (75, 90, 3) and scale == pytest.approx(0.25)


def test_rgba_and_grey_pngs_become_rgb(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:10, ..., 3] = 255                              # top opaque red, bottom transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 30), 90, np.uint8)).save(tmp_path / "g.png")
    with open_slide(tmp_path / "a.png", mpp=0.5) as s:
        px = s.read_region((0, 0, 30, 20), (30, 20))
        assert tuple(px[0, 0]) == (200, 0, 0) and tuple(px[15, 0]) == (255, 255, 255)
    with open_slide(tmp_path / "g.png", mpp=0.5) as s:
        assert tuple(s.read_region((0, 0, 30, 20), (30, 20))[5, 5]) == (90, 90, 90)


@pytest.mark.parametrize("name", ["x.jpg", "x.tif"])
def test_flat_image_without_resolution_names_mpp(tmp_path, name):
    img, _ = image()
    path = tmp_path / name
    if name.endswith(".jpg"):
        write(path, img, "jpeg")
    else:
        tifffile.imwrite(path, img, photometric="rgb")
    with pytest.raises(SlideError, match="pixel size") as err:
        open_slide(path)
    assert "--mpp" in err.value.hint
    with open_slide(path, mpp=0.5) as s:
        assert s.info.mpp_source == "user" and s.info.width == W


def test_placeholder_dpi_is_not_a_resolution(tmp_path):
    """300 dpi (84.7 um/px) is a printer default, not a microscope's pixel size."""
    Image.fromarray(np.full((50, 50, 3), 200, np.uint8)).save(tmp_path / "d.png", dpi=(300, 300))
    with pytest.raises(SlideError, match="pixel size"):
        open_slide(tmp_path / "d.png")


def test_not_an_image_says_what_to_do(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n" * 100)
    with pytest.raises(SlideError, match="not an image format") as err:
        open_slide(p)
    assert "PNG, JPEG or TIFF" in err.value.hint and "vips" in err.value.hint


@pytest.mark.parametrize("fmt, name", [("strips", "case.tif"), ("png", "case.png")])
def test_same_image_as_slide_and_as_flat_image_gives_identical_nuclei(tmp_path, reporter, fmt,
                                                                      name):
    img, nuclei = image()
    (tmp_path / "slide").mkdir()
    svs = make_slide(tmp_path / "slide" / "case.svs", W, H, mpp=MPP, nuclei=nuclei, tile=128,
                     tissue=[(0, 0, W, H)], levels=1)
    np.testing.assert_array_equal(svs.image, img)
    flat = write(tmp_path / name, img, fmt)
    features = []
    for path, out in ((svs.path, tmp_path / "o1"), (flat, tmp_path / "o2")):
        out.mkdir()
        oracle = OraclePredictor(nuclei, W, H, MPP, TILE, HALO)
        res = segment_slide(path, SegmentConfig(out_dir=out), oracle, reporter)
        assert res.status == "done" and res.nuclei == len(nuclei)
        fc = json.loads(output_paths(out, "case", False).geojson.read_text())
        features.append([(f["geometry"], f["properties"]["measurements"]) for f in fc["features"]])
    assert features[0] == features[1]


def test_cli_segment_and_info_read_a_png(tmp_path, monkeypatch):
    img, nuclei = image()
    png = write(tmp_path / "region.png", img, "png")
    monkeypatch.setattr("usnet_wsi.predict.load_predictor",
                        lambda weights=None, device="auto", *rest: OraclePredictor(nuclei, W, H, MPP,
                                                                            TILE, HALO))
    res = CliRunner().invoke(main, ["segment", str(png), "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["slides"][0]["nuclei"] == len(nuclei)
    res = CliRunner().invoke(main, ["info", str(png), "--json", "--no-estimate"])
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert (d["width"], d["height"], d["mpp_x"]) == (W, H, pytest.approx(MPP))


_MONUSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg-train"


@pytest.mark.skipif(not (_MONUSEG / "images").is_dir(),
                    reason=f"MoNuSeg images not found at {_MONUSEG} (shared data absent)")
def test_flat_monuseg_tiff_as_accurate_as_inside_a_slide(tmp_path):
    """The shipped model on a MoNuSeg .tif read flat (with --mpp) and written as an SVS."""
    from usnet_wsi.annotations import read_pair
    from usnet_wsi.metrics import image_counts, metrics_from_counts
    from usnet_wsi.pyramid import write_pyramidal_tiff

    name, mpp = "TCGA-21-5786-01Z-00-DX1", 0.2527
    flat = _MONUSEG / "images" / f"{name}.tif"
    gt = _MONUSEG / "labels" / f"{name}.tif"
    if not gt.exists():
        gt = next((_MONUSEG / "labels").glob(f"{name}*"))
    svs = tmp_path / "slide" / f"{name}.svs"
    svs.parent.mkdir()
    write_pyramidal_tiff(svs, tifffile.imread(flat), mpp, kind="svs", compression="zlib")
    aji = {}
    for label, path in (("flat", flat), ("slide", svs)):
        out = tmp_path / label
        res = CliRunner().invoke(main, ["segment", str(path), "-o", str(out), "--mpp", str(mpp),
                                        "--device", "cpu", "-q"])
        assert res.exit_code == 0, res.stderr
        pred, truth, _ = read_pair(out / f"{name}.geojson", gt, None, (0.0, 0.0))
        aji[label] = metrics_from_counts(image_counts(pred.labels, truth.labels, pred.scores,
                                                      mpp))["aji"]
    assert aji["flat"] >= aji["slide"] - 1e-6 and aji["flat"] > 0.4, aji
