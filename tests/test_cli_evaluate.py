"""`usnet-wsi evaluate`: JSON keys and values, tables, folder pairing, bad input and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from usnet_wsi.cli import main

KEYS = ("aji", "aji_plus", "pq", "dq", "sq", "dice", "det_f1", "ap50", "pixel_accuracy")


def run(*args: str):
    return CliRunner().invoke(main, ["evaluate", *args])


def err(res) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(res.stderr.split())


def save_png(path: Path, labels: np.ndarray) -> Path:
    Image.fromarray(labels.astype(np.uint16)).save(path)
    return path


def touching_pair() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((4, 10), np.uint16)
    gt[:, 0:5], gt[:, 5:10] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, 0:6], pred[:, 6:10] = 3, 8
    return pred, gt


def geojson_square(path: Path, x0: int, y0: int, side: int, score: float) -> Path:
    ring = [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]
    feat = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection", "measurements": {"Detection probability": score}}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
    return path


def test_json_single_pair_label_images(tmp_path):
    pred, gt = touching_pair()
    res = run(str(save_png(tmp_path / "p.png", pred)), str(save_png(tmp_path / "g.png", gt)), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(KEYS) <= set(out)
    assert out["aji"] == pytest.approx(36 / 44)
    assert out["pq"] == pytest.approx((20 / 24 + 16 / 20) / 2)
    assert out["counts"]["n_gt"] == 2 and out["settings"]["detection_radius_px"] == 12.0
    assert any("no detection scores" in n for n in out["notes"])
    assert set(out["definitions"]) == set(KEYS)


def test_geojson_prediction_against_xml(tmp_path):
    pred = geojson_square(tmp_path / "s.geojson", 2, 2, 4, 0.8)
    xml = tmp_path / "s.xml"
    verts = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in [(1.5, 1.5), (5.5, 1.5), (5.5, 5.5), (1.5, 5.5)])
    xml.write_text(f"<Annotations><Annotation><Regions><Region Id='1'><Vertices>{verts}"
                   "</Vertices></Region></Regions></Annotation></Annotations>")
    res = run(str(pred), str(xml), "--json", "--region", "0,0,10,10")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    # GeoJSON edges 2..6 and XML vertices 1.5..5.5 (pixel centres 2..5) fill the same 4x4 px
    assert out["aji"] == 1.0 and out["ap50"] == 1.0
    assert out["pixel_accuracy"] == 1.0 and out["counts"]["pixels"] == 100


def test_folders_pair_by_name_and_report_pooled_and_per_image(tmp_path):
    (pd := tmp_path / "pred").mkdir()
    (gd := tmp_path / "gt").mkdir()
    pred, gt = touching_pair()
    save_png(pd / "a.png", pred)
    save_png(gd / "a.png", gt)
    empty = np.zeros((4, 10), np.uint16)
    save_png(pd / "b.png", empty)
    save_png(gd / "b.png", gt)                  # nothing found: AJI 0
    save_png(pd / "c.png", pred)                # unpaired: warned, not evaluated
    res = run(str(pd), str(gd), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(KEYS) <= set(out) and set(KEYS) <= set(out["pooled"])
    assert out["n_images"] == 2 and set(out["per_image"]) == {"a", "b"}
    assert out["aji"] == pytest.approx((36 / 44 + 0.0) / 2)
    assert out["pooled"]["aji"] == pytest.approx(36 / (44 + 40))
    assert "c.png" in err(res)


def test_table_output_with_per_image(tmp_path):
    (pd := tmp_path / "pred").mkdir()
    (gd := tmp_path / "gt").mkdir()
    pred, gt = touching_pair()
    for name in ("img1", "img2"):
        save_png(pd / f"{name}.png", pred)
        save_png(gd / f"{name}.png", gt)
    res = run(str(pd), str(gd), "--per-image")
    assert res.exit_code == 0, res.output
    assert "AJI+" in res.stdout and "pooled" in res.stdout
    assert "img1" in res.stdout and "img2" in res.stdout
    assert f"{36 / 44:.4f}" in res.stdout


def test_table_single_pair(tmp_path):
    pred, gt = touching_pair()
    res = run(str(save_png(tmp_path / "p.png", pred)), str(save_png(tmp_path / "g.png", gt)))
    assert res.exit_code == 0
    assert "Kumar 2017" in res.stdout and f"{36 / 44:.4f}" in res.stdout


def test_missing_file_exit_1_without_traceback(tmp_path):
    _, gt = touching_pair()
    res = run(str(tmp_path / "nope.geojson"), str(save_png(tmp_path / "g.png", gt)))
    assert res.exit_code == 1
    assert "does not exist" in err(res) and "Traceback" not in res.output


def test_rgb_ground_truth_exit_1(tmp_path):
    pred, _ = touching_pair()
    Image.fromarray(np.zeros((4, 10, 3), np.uint8)).save(tmp_path / "g.png")
    res = run(str(save_png(tmp_path / "p.png", pred)), str(tmp_path / "g.png"))
    assert res.exit_code == 1 and "not an instance map" in err(res)


def test_shape_mismatch_exit_1_with_fix(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((8, 8), np.uint32))
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((6, 6), np.uint32))
    res = run(str(tmp_path / "p.tif"), str(tmp_path / "g.tif"))
    assert res.exit_code == 1 and "--region" in err(res)


@pytest.mark.parametrize("args", [("--region", "1,2,3"), ("--region", "0,0,0,5"),
                                  ("--offset", "x,1"), ("--mpp", "0")])
def test_bad_options_exit_2(tmp_path, args):
    pred, gt = touching_pair()
    res = run(str(save_png(tmp_path / "p.png", pred)), str(save_png(tmp_path / "g.png", gt)), *args)
    assert res.exit_code == 2, res.output
    assert "fix:" in err(res)


def test_file_and_folder_mix_exit_2(tmp_path):
    _, gt = touching_pair()
    res = run(str(tmp_path), str(save_png(tmp_path / "g.png", gt)))
    assert res.exit_code == 2 and "folder" in err(res)


def test_folders_without_pairs_exit_1(tmp_path):
    (pd := tmp_path / "pred").mkdir()
    (gd := tmp_path / "gt").mkdir()
    save_png(pd / "a.png", np.zeros((2, 2)))
    save_png(gd / "b.png", np.zeros((2, 2)))
    res = run(str(pd), str(gd))
    assert res.exit_code == 1 and "namesake" in err(res)
