"""The shipped default bundle: it loads, verifies, and finds the nuclei of a synthetic H&E slide."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from usnet_wsi.cli import main
from usnet_wsi.model.bundle import DEFAULT_BUNDLE, default_bundle_path, load_bundle
from usnet_wsi.pyramid import write_pyramidal_tiff

ROOT = Path(__file__).resolve().parents[1]


def _example_module():
    spec = importlib.util.spec_from_file_location("make_example",
                                                  ROOT / "examples" / "make_example_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_bundle_is_shipped_and_verified():
    bundle = load_bundle(None)
    assert bundle.name == DEFAULT_BUNDLE and bundle.path == default_bundle_path()
    assert len(bundle.sha256) == 64 and bundle.spec.input_size == 300
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "CC BY-NC-SA 4.0" in card
    assert set(bundle.config["validation_images"]) and bundle.config["validation_metrics"]["aji"] > 0


def test_every_shipped_bundle_loads_by_name_and_v1_stays_available(tmp_path, monkeypatch):
    from usnet_wsi.errors import WeightsError
    from usnet_wsi.model.bundle import bundle_location, shipped_bundle_path

    v1 = load_bundle("usnet-monuseg-v1")
    assert v1.name == "usnet-monuseg-v1" and v1.path == shipped_bundle_path("usnet-monuseg-v1")
    assert v1.sha256 != load_bundle(None).sha256
    monkeypatch.chdir(tmp_path)                    # a folder of that name here wins
    (tmp_path / "usnet-monuseg-v1").mkdir()
    assert bundle_location("usnet-monuseg-v1") == Path("usnet-monuseg-v1")
    with pytest.raises(WeightsError, match="not a complete weights bundle"):
        load_bundle("usnet-monuseg-v1")
    with pytest.raises(WeightsError, match="weights not found"):
        load_bundle("no-such-bundle")


def test_default_weights_find_the_nuclei_of_a_synthetic_he_slide(tmp_path):
    rgb, centres = _example_module().make_example(700, 600, seed=3)
    slide = write_pyramidal_tiff(tmp_path / "he.svs", rgb, mpp=0.25)
    res = CliRunner().invoke(main, ["segment", str(slide), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    features = json.loads((tmp_path / "out" / "he.geojson").read_text())["features"]
    found = np.array([np.mean(f["geometry"]["coordinates"][0][:-1], axis=0) for f in features])
    assert len(centres) > 30 and len(found) > 0
    d = cdist(centres, found)
    rows, cols = linear_sum_assignment(d)
    tp = int((d[rows, cols] <= 8).sum())
    f1 = 2 * tp / (len(centres) + len(found))
    assert f1 > 0.8, f"detection F1 {f1:.2f} ({tp} of {len(centres)} painted, {len(found)} found)"


def test_shipped_model_output_is_byte_identical_across_batch_sizes_and_workers(tmp_path):
    """The real model and instance path: --batch-size 1 / 8 and --workers 0 / 2 write the
    same GeoJSON bytes (the network is run so that its numbers do not depend on the batch)."""
    rgb, _ = _example_module().make_example(900, 700, seed=5)
    slide = write_pyramidal_tiff(tmp_path / "he.svs", rgb, mpp=0.25)
    outputs = []
    for batch, workers in (("1", "0"), ("8", "2"), ("3", "1")):
        out = tmp_path / f"b{batch}w{workers}"
        res = CliRunner().invoke(main, ["segment", str(slide), "-o", str(out), "-q",
                                        "--device", "cpu", "--batch-size", batch,
                                        "--workers", workers])
        assert res.exit_code == 0, res.output
        outputs.append((out / "he.geojson").read_bytes())
    assert len(json.loads(outputs[0])["features"]) > 50
    assert outputs[0] == outputs[1] == outputs[2]
