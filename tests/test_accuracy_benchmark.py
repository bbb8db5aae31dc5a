"""benchmarks/accuracy.py: which images each dataset is measured on, datasets never mixed, and a
256x256 tile (CoNSeP's size, smaller than the model's tile) going through `segment`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from usnet_wsi.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
V1, V2 = ROOT / "weights" / "usnet-monuseg-v1", ROOT / "weights" / "usnet-v2-ft1"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


acc = _load("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")


def config(bundle: Path) -> dict:
    return json.loads((bundle / "config.json").read_text(encoding="utf-8"))


def fake_dataset(root: Path, key: str, suffix: str, names: list[str]):
    """A dataset folder with empty image and label files for NAMES."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / "images" / f"{n}{suffix}").touch()
        (root / "labels" / f"{n}.png").touch()
    return acc.Dataset(key, key, root, suffix, 0.25, "test")


# ----------------------------------------------------------------------------- image choice

def test_fixed_splits_are_the_v2_ft1_validation_images():
    """The fixed splits are the images usnet-v2-ft1 held out (v1 held out the same MoNuSeg 6)."""
    v2 = config(V2)["validation_images"]
    assert sorted(acc.FIXED_VALIDATION["consep"]) == sorted(n for n in v2 if n.startswith("train_"))
    assert sorted(acc.FIXED_VALIDATION["monuseg"]) == sorted(n for n in v2 if n.startswith("TCGA"))
    assert sorted(acc.FIXED_VALIDATION["monuseg"]) == sorted(config(V1)["validation_images"])


def test_names_go_to_the_dataset_that_holds_them(tmp_path):
    a = fake_dataset(tmp_path / "a", "monuseg", ".tif", ["M1", "M2"])
    b = fake_dataset(tmp_path / "b", "consep", ".jpg", ["c_000", "c_001"])
    assert acc.assign(["c_001", "M2", "nowhere", "M1"], [a, b]) == {
        "monuseg": ["M2", "M1"], "consep": ["c_001"]}
    (tmp_path / "b" / "labels" / "c_000.png").unlink()       # an image without labels
    assert acc.assign(["c_000"], [a, b]) == {"monuseg": [], "consep": []}


def test_explicit_names_found_nowhere_are_an_error(tmp_path):
    a = fake_dataset(tmp_path / "a", "monuseg", ".tif", ["M1"])
    assert acc.explicit_images(["M1"], [a]) == {"monuseg": (["M1"], "named on the command line")}
    with pytest.raises(acc.BenchmarkError, match="M9"):
        acc.explicit_images(["M1", "M9"], [a])


def test_bundle_list_per_dataset_else_the_fixed_split(tmp_path, monkeypatch):
    monkeypatch.setitem(acc.FIXED_VALIDATION, "consep", ("c_000", "c_001"))
    a = fake_dataset(tmp_path / "a", "monuseg", ".tif", ["M1", "M2"])
    b = fake_dataset(tmp_path / "b", "consep", ".jpg", ["c_000", "c_001", "c_002"])
    only_m = acc.validation_images({"validation_images": ["M2"]}, [a, b])
    assert only_m["monuseg"][0] == ["M2"] and "bundle" in only_m["monuseg"][1]
    assert only_m["consep"][0] == ["c_000", "c_001"] and "fixed" in only_m["consep"][1]
    both = acc.validation_images({"validation_images": ["M2", "c_002"]}, [a, b])
    assert both["consep"][0] == ["c_002"]


def test_missing_dataset_is_skipped_with_a_message(tmp_path, capsys):
    args = acc.parse_args(["--data", str(tmp_path / "none"), "--consep-data", str(tmp_path / "c")])
    fake_dataset(tmp_path / "c", "consep", ".jpg", ["c_000"])
    found = acc.available(args, acc.datasets_from(args))
    assert [d.key for d in found] == ["consep"]
    assert "skipped monuseg" in capsys.readouterr().err
    args = acc.parse_args(["--data", str(tmp_path / "none"), "--dataset", "monuseg"])
    with pytest.raises(acc.BenchmarkError):
        acc.available(args, acc.datasets_from(args))


@pytest.mark.skipif(not ((SHARED / "monuseg-train" / "labels").is_dir()
                         and (SHARED / "consep-train" / "labels").is_dir()),
                    reason=f"MoNuSeg or CoNSeP not found under {SHARED} (shared data absent)")
def test_v1_and_v2_are_measured_on_the_same_images():
    args = acc.parse_args([])
    datasets = acc.available(args, acc.datasets_from(args))
    v1 = acc.validation_images(config(V1), datasets)
    v2 = acc.validation_images(config(V2), datasets)
    for key in ("monuseg", "consep"):
        assert sorted(v1[key][0]) == sorted(v2[key][0])
    assert len(v1["monuseg"][0]) == 6 and len(v1["consep"][0]) == 80
    assert not set(v1["consep"][0]) & set(config(V1).get("train_images", []))
    assert not set(v2["consep"][0]) & set(config(V2)["train_images"])


# ----------------------------------------------------------------------------- report

def test_fragment_summary_pools_counts_and_averages_rates():
    records = [{"name": "a", "results": {"fragments": {"pred_nuclei": 10, "pred_fragments": 1,
                                                       "gt_nuclei": 20, "gt_fragments": 0}}},
               {"name": "b", "results": {"fragments": {"pred_nuclei": 30, "pred_fragments": 9,
                                                       "gt_nuclei": 0, "gt_fragments": 0}}}]
    s = acc.fragment_summary(records)
    assert s["per_image"]["a"]["pred_per_100"] == pytest.approx(10.0)
    assert s["per_image"]["b"]["gt_per_100"] is None
    assert s["pooled"]["pred_per_100"] == pytest.approx(25.0)        # 10 of 40
    assert s["mean"]["pred_per_100"] == pytest.approx(20.0)          # (10 + 30) / 2
    assert s["mean"]["gt_per_100"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- a 256 px tile

def test_a_256_px_tile_written_by_the_benchmark_goes_through_segment(tmp_path):
    """Smaller than the model's tile: the reader pads it; the nuclei are still found."""
    spec = importlib.util.spec_from_file_location("make_example",
                                                  ROOT / "examples" / "make_example_slide.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rgb, centres = example.make_example(256, 256, seed=4)
    tifffile.imwrite(tmp_path / "tile.tif", rgb)
    slide = tmp_path / "slides" / "tile.svs"
    assert acc.write_slide(tmp_path / "tile.tif", slide, 0.25) == (256, 256)
    res = CliRunner().invoke(main, ["segment", str(slide), "-o", str(tmp_path / "out"), "-q",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    features = json.loads((tmp_path / "out" / "tile.geojson").read_text())["features"]
    rings = [np.asarray(f["geometry"]["coordinates"][0]) for f in features]
    assert all(r.min() >= 0 and r.max() <= 256 for r in rings)
    found = np.array([r[:-1].mean(axis=0) for r in rings])
    assert len(centres) >= 5 and len(found) > 0
    d = cdist(centres, found)
    rows, cols = linear_sum_assignment(d)
    tp = int((d[rows, cols] <= 8).sum())
    assert 2 * tp / (len(centres) + len(found)) > 0.8, (tp, len(centres), len(found))
