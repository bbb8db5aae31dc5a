"""Hostile but realistic inputs: a corrupt tile in the middle of a slide, an all-black slide, pen
ink, implausible --mpp, bounded memory on a large flat image, and non-square pixels."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from child import HALO, MPP, TILE, H, W, nuclei
from oracle import OraclePredictor
from synth import SynthNucleus, paint
from usnet_wsi.cli import main
from usnet_wsi.config import SegmentConfig
from usnet_wsi.instances import InstanceBatch, paint_masks
from usnet_wsi.pipeline import output_paths, segment_slide
from usnet_wsi.pyramid import write_pyramidal_tiff
from usnet_wsi.tissue import tissue_mask

CHILD = Path(__file__).resolve().parent / "child.py"


def err(res) -> str:
    return " ".join(res.stderr.split())


class BlankAware(OraclePredictor):
    """The oracle, except that a white tile (an unreadable one) holds no nuclei."""

    def _tile(self, rgb, read_l0):
        if (rgb == 255).all():
            return paint_masks([], [], [], self.tile_px)
        return super()._tile(rgb, read_l0)


def corrupt_slide(path: Path) -> Path:
    """A JPEG-tiled SVS (128 px tiles) whose 6th tile's JPEG data is overwritten."""
    img, _ = paint(W, H, nuclei(), [(0, 0, W, H)])
    write_pyramidal_tiff(path, img, MPP, kind="svs", tile=128, compression="jpeg")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        off, n = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    data[off + n // 4: off + n] = np.random.default_rng(0).bytes(n - n // 4)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def blank_aware(monkeypatch):
    monkeypatch.setattr("usnet_wsi.predict.load_predictor",
                        lambda weights=None, device="auto", *rest: BlankAware(nuclei(), W, H, MPP, TILE,
                                                                       HALO))


def test_corrupt_tile_is_retried_skipped_reported_and_recorded(tmp_path, blank_aware):
    slide = corrupt_slide(tmp_path / "c.svs")
    res = CliRunner().invoke(main, ["segment", str(slide), "-o", str(tmp_path / "out"),
                                    "--json"])
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)["slides"][0]
    assert s["status"] == "done" and s["unreadable_tiles"] >= 1
    assert 0 < s["nuclei"] < len(nuclei())                  # the rest of the slide is there
    assert "could not be read" in err(res) and "--strict" in err(res)
    record = json.loads((tmp_path / "out" / "c.run.json").read_text())
    bad = record["unreadable_tiles"]
    assert len(bad) == s["unreadable_tiles"]
    for b in bad:                                           # each overlaps the corrupt tile
        x0, y0, x1, y1 = b["box_l0"]
        assert x1 > 256 and y0 < 256 and y1 > 128 and b["error"]


def test_strict_fails_the_slide_on_a_corrupt_tile(tmp_path, blank_aware):
    slide = corrupt_slide(tmp_path / "c.svs")
    res = CliRunner().invoke(main, ["segment", str(slide), "-o", str(tmp_path / "out"),
                                    "--strict"])
    assert res.exit_code == 1 and "Traceback" not in res.stderr and "fix:" in err(res)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("rgb", [(0, 0, 0), (20, 18, 25), (30, 160, 60), (40, 70, 200),
                                 (20, 200, 230)])
def test_black_and_pen_ink_are_not_tissue(rgb):
    img = np.full((80, 100, 3), 243, np.uint8)
    img[10:70, 10:60] = (226, 160, 196)                     # tissue
    img[10:70, 60:95] = rgb                                 # padding / ink beside it
    mask = tissue_mask(img)
    assert mask[12:68, 12:56].all() and not mask[15:65, 66:95].any()


def test_all_black_slide_gives_a_warning_and_empty_valid_outputs(tmp_path, reporter):
    path = tmp_path / "black.svs"
    write_pyramidal_tiff(path, np.zeros((H, W, 3), np.uint8), MPP, kind="svs", tile=128)
    oracle = OraclePredictor([], W, H, MPP, TILE, HALO)
    res = segment_slide(path, SegmentConfig(out_dir=tmp_path), oracle, reporter)
    assert res.status == "done" and res.nuclei == 0 and oracle.calls == 0
    assert any("no tissue" in w for w in reporter.warnings)
    paths = output_paths(tmp_path, "black", False)
    assert json.loads(paths.geojson.read_text()) == {"type": "FeatureCollection", "features": []}


@pytest.mark.parametrize("command, mpp", [("info", "0.001"), ("segment", "10"), ("info", "-1")])
def test_implausible_mpp_is_a_usage_error_stating_the_range(tmp_path, command, mpp):
    path = tmp_path / "s.svs"
    write_pyramidal_tiff(path, np.full((64, 64, 3), 200, np.uint8), MPP, kind="svs", tile=64)
    args = [command, str(path), "--mpp", mpp] + (["-o", str(tmp_path / "o")]
                                                 if command == "segment" else [])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "0.05-5" in err(res) and "Traceback" not in res.stderr


def big_flat_tiff(path: Path, side: int = 16000) -> Path:
    """An uncompressed flat RGB TIFF (768 MB for 16000 px) written without holding it."""
    mm = tifffile.memmap(path, shape=(side, side, 3), dtype=np.uint8, photometric="rgb",
                         resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    for y in range(0, side, 1024):
        mm[y:y + 1024] = 240
    mm[side // 3:side // 3 + 600, side // 3:side // 3 + 600] = (226, 160, 196)
    mm.flush()
    del mm
    return path


@pytest.mark.parametrize("command", ["info", "segment"])
def test_large_flat_image_runs_in_bounded_memory(tmp_path_factory, command):
    """Under a 3 GiB address-space limit (the imports alone take 1-2 GiB, torch included);
    reading the 768 MB image whole would need twice its size on top."""
    folder = tmp_path_factory.getbasetemp() / "bigflat"
    folder.mkdir(exist_ok=True)
    path = folder / "big.tif"
    if not path.exists():
        big_flat_tiff(path)
    args = [command, str(path), "-q"] + (["-o", str(folder / "out"), "--overwrite"]
                                         if command == "segment" else ["--no-estimate"])
    env = {**os.environ, "USNET_TEST_LIMIT_GB": "3"}
    child = subprocess.run([sys.executable, str(CHILD), "empty", *args], capture_output=True,
                           text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]


class BlobPredictor:
    """A stand-in model that finds dark blobs in a tile and records their extents (tile px)."""

    name, sha256, device, tile_px, halo_px, mpp = "blobs", "0" * 64, "cpu", 100, 16, 0.5

    def __init__(self) -> None:
        self.extents: list[tuple[int, int]] = []

    def predict(self, tiles, meta=None, regions=None):
        from scipy import ndimage

        out = []
        for rgb in tiles:
            lab, n = ndimage.label(rgb[..., 1] < 100)
            masks, origins = [], []
            for sl in ndimage.find_objects(lab):
                masks.append(lab[sl] > 0)
                origins.append((sl[1].start, sl[0].start))
                inside = sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < 100 \
                    and sl[1].stop < 100
                if inside:
                    self.extents.append((sl[1].stop - sl[1].start, sl[0].stop - sl[0].start))
            out.append(paint_masks(masks, origins, [0.9] * len(masks), self.tile_px))
        return InstanceBatch.from_tiles(out)


def test_non_square_pixels_model_sees_its_own_mpp_and_areas_are_right(tmp_path, reporter):
    """0.25 um/px across, 0.5 um/px down: round nuclei of radius 4 um are 32 x 16 px ellipses
    in the file; the model (0.5 um/px) must see them round (16 x 16 px)."""
    mpp_x, mpp_y, r_um = 0.25, 0.5, 4.0
    cells = [SynthNucleus(cx, cy, r_um / mpp_x, r_um / mpp_y)
             for cy in range(40, 400, 60) for cx in range(60, 800, 90)]
    img, _ = paint(800, 400, cells, [(0, 0, 800, 400)])
    path = tmp_path / "aniso.tif"
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp_x, 1e4 / mpp_y), resolutionunit="CENTIMETER")
    model = BlobPredictor()
    res = segment_slide(path, SegmentConfig(out_dir=tmp_path), model, reporter)
    assert res.nuclei == len(cells)
    w, h = np.median(np.array(model.extents), axis=0)
    assert abs(w - h) <= 1 and abs(w - 2 * r_um / 0.5) <= 2
    fc = json.loads(output_paths(tmp_path, "aniso", False).geojson.read_text())
    areas = [f["properties"]["measurements"]["Nucleus: Area µm^2"] for f in fc["features"]]
    assert np.allclose(areas, math.pi * r_um ** 2, rtol=0.15)
    xs = [c[0] for f in fc["features"] for c in f["geometry"]["coordinates"][0]]
    assert max(xs) > 700                                  # polygons in level-0 pixels


def test_unreadable_tiles_of_a_resumed_run_are_still_recorded(tmp_path, reporter):
    """The journal keeps which of its tiles could not be read: run.json of a resumed run lists
    the same unreadable tiles as an uninterrupted one, and the GeoJSON is the same."""
    slide = corrupt_slide(tmp_path / "c.svs")

    class LostLate(BlankAware):
        def predict(self, tiles, meta=None, regions=None):
            if meta[-1].index >= 24:
                raise RuntimeError("device lost")
            return super().predict(tiles, meta, regions)

    def blank_aware_oracle(cls=BlankAware):
        return cls(nuclei(), W, H, MPP, TILE, HALO)

    runs = {}
    for name in ("whole", "resumed"):
        cfg = SegmentConfig(out_dir=tmp_path / name, batch_size=2)
        cfg.out_dir.mkdir()
        if name == "resumed":
            with pytest.raises(RuntimeError):
                segment_slide(slide, cfg, blank_aware_oracle(LostLate), reporter)
        segment_slide(slide, cfg, blank_aware_oracle(), reporter)
        paths = output_paths(cfg.out_dir, "c", False)
        runs[name] = (json.loads(paths.run_json.read_text()), paths.geojson.read_bytes())
    (whole, whole_geo), (resumed, resumed_geo) = runs["whole"], runs["resumed"]
    assert resumed["counts"]["resumed_tiles"] == 24 and whole["unreadable_tiles"]
    assert resumed["unreadable_tiles"] == whole["unreadable_tiles"]
    assert resumed_geo == whole_geo
