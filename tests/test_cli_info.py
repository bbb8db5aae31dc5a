"""`usnet-wsi info`: slide description, tissue area, tiles to process, time estimate, bad input."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from oracle import OraclePredictor
from synth import make_slide
from usnet_wsi.cli import main
from usnet_wsi.errors import WeightsError

MPP = 0.5


def run(*args):
    return CliRunner().invoke(main, ["info", *map(str, args)])


def err(res) -> str:
    return " ".join(res.stderr.split())


@pytest.fixture
def svs(tmp_path):
    # 800 x 600 at 0.5 um/px, tissue 400 x 300 px = 0.03 mm^2, no nuclei
    return make_slide(tmp_path / "t.svs", 800, 600, mpp=MPP, kind="svs", nuclei=[],
                      tissue=[(200, 150, 600, 450)], tile=128, levels=(1, 4))


@pytest.fixture
def oracle(monkeypatch):
    def load(weights=None, device="auto", tile_px=None, precision="auto", tta="none"):
        return OraclePredictor([], 800, 600, mpp=MPP, tile_px=100, halo_px=20)

    monkeypatch.setattr("usnet_wsi.predict.load_predictor", load)


def test_text_report(svs, oracle):
    res = run(svs.path)
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert "aperio" in out and "800 x 600" in out and "800x600 (/1), 200x150 (/4)" in out
    assert "0.5 x 0.5 um/px (from openslide)" in out and "20x" in out
    assert "mm^2" in out and "tiles" in out and "estimate" in out and "on cpu" in out


def test_json_numbers(svs, oracle):
    d = json.loads(run(svs.path, "--json").stdout)
    assert (d["width"], d["height"], d["vendor"]) == (800, 600, "aperio")
    assert d["mpp_x"] == MPP and d["mpp_source"] == "openslide" and d["objective_power"] == 20
    assert d["tissue_area_mm2"] == pytest.approx(400 * 300 * MPP**2 * 1e-6, rel=0.15)
    core = 100 - 2 * 20                                        # model px = l0 px here
    assert d["tiles_in_grid"] == math.ceil(800 / core) * math.ceil(600 / core)
    assert 0 < d["tiles"] < d["tiles_in_grid"]                 # glass tiles are left out
    est = d["estimate"]
    assert est["device"] == "cpu" and est["seconds_per_tile"] > 0
    assert est["seconds"] == pytest.approx(est["seconds_per_tile"] * d["tiles"])


def test_no_tissue_mask_and_roi(svs, oracle):
    d = json.loads(run(svs.path, "--json", "--no-tissue-mask").stdout)
    assert d["tiles"] == d["tiles_in_grid"]
    d = json.loads(run(svs.path, "--json", "--roi", "0,0,120,120", "--no-tissue-mask").stdout)
    assert d["roi_l0"] == [0, 0, 120, 120] and d["tiles"] == 4


def test_missing_default_weights_fall_back_without_estimate(svs, monkeypatch):
    def missing(weights=None, device="auto"):
        raise WeightsError("weights not found: default", "reinstall")

    monkeypatch.setattr("usnet_wsi.predict.load_predictor", missing)
    res = run(svs.path, "--json")
    assert res.exit_code == 0
    d = json.loads(res.stdout)
    assert "estimate" not in d and d["model"]["name"] is None and d["tiles"] > 0
    assert "default weights unavailable" in err(res)


def test_given_weights_must_load(svs, tmp_path):
    res = run(svs.path, "--weights", tmp_path / "none")
    assert res.exit_code == 1 and "not found" in err(res) and "Traceback" not in res.stderr


@pytest.mark.parametrize("args, code, word", [
    (["--mpp", "-1"], 2, "--mpp"),
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--device", "gpu0"], 2, "--device"),
    (["--roi", "a,b,c,d"], 2, "--roi"),
])
def test_usage_errors(svs, args, code, word):
    res = run(svs.path, *args)
    assert res.exit_code == code and word in err(res) and "Traceback" not in res.stderr


def test_bad_slides(tmp_path):
    res = run(tmp_path / "missing.svs")
    assert res.exit_code == 1 and "not found" in err(res)
    s = make_slide(tmp_path / "n.tif", 300, 300, kind="no-mpp", nuclei=[], tile=128)
    res = run(s.path)
    assert res.exit_code == 1 and "--mpp" in err(res) and "Traceback" not in res.stderr


def test_no_estimate_does_not_run_the_model(svs, monkeypatch):
    def never(*a, **k):
        raise AssertionError("--no-estimate must not build a predictor")

    monkeypatch.setattr("usnet_wsi.predict.load_predictor", never)
    res = run(svs.path, "--json", "--no-estimate")
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert "estimate" not in d and d["tiles"] > 0
