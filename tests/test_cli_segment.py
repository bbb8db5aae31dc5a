"""`usnet-wsi segment`: outputs, several slides, summary / --json, skip, and every bad input of
the issue (short message with the fix, exit 2 usage / 1 runtime, no traceback unless -v, nothing
left in OUTDIR). The model is the oracle (tests/oracle.py) put in place of `load_predictor`,
except for the --weights tests, which go through the real loader."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from oracle import OraclePredictor
from synth import grid_nuclei, make_slide
from usnet_wsi.cli import main

MPP, TILE, HALO = 0.5, 100, 16


def run(*args: str):
    return CliRunner().invoke(main, ["segment", *map(str, args)])


def err(res) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(res.stderr.split())


def nuclei():
    return grid_nuclei(360, 300, spacing=50, radius=8, core_l0=TILE - 2 * HALO, edges=False)


def slide(tmp_path: Path, name: str = "s1.svs", kind: str = "svs", **kw):
    return make_slide(tmp_path / name, 360, 300, mpp=MPP, kind=kind, nuclei=nuclei(),
                      tile=128, tissue=[(0, 0, 360, 300)], **kw)


@pytest.fixture
def oracle(monkeypatch):
    """The oracle in place of the real model; records how it was asked for."""
    calls = []

    def load(weights=None, device="auto", tile_px=None, precision="auto", tta="none"):
        calls.append((weights, device))
        return OraclePredictor(nuclei(), 360, 300, MPP, TILE, HALO)

    monkeypatch.setattr("usnet_wsi.predict.load_predictor", load)
    return calls


def assert_clean_failure(res, code: int, *words: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    text = err(res)
    assert "Traceback" not in res.stderr and "fix:" in text
    for w in words:
        assert w in text, (w, text)


def assert_nothing_in(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def test_two_slides_summary_and_json(tmp_path, oracle):
    a, b = slide(tmp_path, "a.svs"), slide(tmp_path, "b.tif", kind="tiff")
    out = tmp_path / "out"
    res = run(a.path, b.path, "-o", out, "--json", "--batch-size", "3", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert [s["status"] for s in summary["slides"]] == ["done", "done"]
    assert summary["done"] == 2 and summary["failed"] == 0
    assert summary["slides"][0]["nuclei"] == len(nuclei())
    for name in ("a", "b"):
        for suffix in (".geojson", ".zarr", ".run.json", ".overview.png"):
            assert (out / f"{name}{suffix}").exists()
    assert oracle == [(None, "cpu")]                            # the model is loaded once
    text = err(res)
    assert "usnet-wsi segment" in text and "done" in text       # the summary table
    assert "a: " in text and "nuclei" in text                   # progress / per-slide line


def test_second_run_skips_and_overwrite_redoes(tmp_path, oracle):
    s = slide(tmp_path)
    out = tmp_path / "out"
    assert run(s.path, "-o", out).exit_code == 0
    res = run(s.path, "-o", out, "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["slides"][0]["status"] == "skipped"
    assert "skipped" in err(res) and "--overwrite" in err(res)
    res = run(s.path, "-o", out, "--json", "--overwrite")
    assert json.loads(res.stdout)["slides"][0]["status"] == "done"


def test_one_failing_slide_does_not_stop_the_rest(tmp_path, oracle):
    good, good2 = slide(tmp_path, "g1.svs"), slide(tmp_path, "g2.svs")
    out = tmp_path / "out"
    res = run(good.path, tmp_path / "missing.svs", good2.path, "-o", out, "--json")
    assert res.exit_code == 1
    statuses = [s["status"] for s in json.loads(res.stdout)["slides"]]
    assert statuses == ["done", "failed", "done"]
    assert "not found" in err(res) and "Traceback" not in res.stderr
    assert not list(out.glob("missing*"))
    assert (out / "g2.geojson").exists()


def test_geojson_gz_and_quiet(tmp_path, oracle):
    s = slide(tmp_path)
    out = tmp_path / "out"
    res = run(s.path, "-o", out, "--geojson-gz", "-q")
    assert res.exit_code == 0
    assert res.stderr.strip() == ""                            # -q: nothing but warnings
    fc = json.loads(gzip.decompress((out / "s1.geojson.gz").read_bytes()))
    assert len(fc["features"]) == len(nuclei())
    assert not (out / "s1.geojson").exists()


def test_roi_and_no_tissue_mask(tmp_path, oracle):
    s = slide(tmp_path)
    out = tmp_path / "out"
    res = run(s.path, "-o", out, "--roi", "0,0,180,150", "--no-tissue-mask", "--json")
    assert res.exit_code == 0, res.stderr
    n = json.loads(res.stdout)["slides"][0]["nuclei"]
    assert 0 < n < len(nuclei()) / 2
    run_json = json.loads((out / "s1.run.json").read_text())
    assert run_json["settings"]["slide"] == {"mpp": None, "roi_xywh": [0, 0, 180, 150],
                                             "tissue_mask": False}


# ------------------------------------------------------------------------------- bad input

def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "nope.svs", ["not found"]),
    (lambda d: _folder(d / "dir.svs"), ["folder"]),
    (lambda d: _file(d / "empty.svs", b""), ["empty"]),
    (lambda d: _file(d / "notes.svs", b"hello " * 100), ["notes.svs"]),
])
def test_bad_slide_paths(tmp_path, oracle, make, words):
    out = tmp_path / "out"
    res = run(make(tmp_path), "-o", out)
    assert_clean_failure(res, 1, *words)
    assert_nothing_in(out)
    assert oracle == []                                         # never got to the model


def test_truncated_slide(tmp_path, oracle):
    s = slide(tmp_path, "whole.svs")
    cut = tmp_path / "cut.svs"
    data = s.path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_clean_failure(run(cut, "-o", out), 1, "cut.svs")
    assert_nothing_in(out)


def test_slide_without_mpp_needs_mpp(tmp_path, oracle):
    s = slide(tmp_path, "nompp.tif", kind="no-mpp")
    out = tmp_path / "out"
    assert_clean_failure(run(s.path, "-o", out), 1, "--mpp")
    assert_nothing_in(out)
    res = run(s.path, "-o", out, "--mpp", MPP)
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "nompp.run.json").read_text())["slide"]["mpp_source"] == "user"


@pytest.mark.parametrize("args, words", [
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--workers", "-1"], ["--workers"]),
    (["--mpp", "-1"], ["--mpp", "-1"]),
    (["--mpp", "nan"], ["--mpp"]),
    (["--roi", "1,2,3"], ["--roi"]),
    (["--roi", "0,0,0,10"], ["--roi"]),
    (["--device", "tpu"], ["--device", "tpu"]),
])
def test_usage_errors_exit_2(tmp_path, oracle, args, words):
    s = slide(tmp_path)
    out = tmp_path / "out"
    assert_clean_failure(run(s.path, "-o", out, *args), 2, *words)
    assert not out.exists()


def test_no_slide_or_no_outdir_is_a_usage_error(tmp_path):
    assert run("-o", tmp_path / "out").exit_code == 2
    assert run(tmp_path / "x.svs").exit_code == 2


def test_outdir_that_is_a_file(tmp_path, oracle):
    s = slide(tmp_path)
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    assert_clean_failure(run(s.path, "-o", target), 1, "out.txt", "file")
    assert target.read_text() == "keep me"
    assert_clean_failure(run(s.path, "-o", target / "sub"), 1, "out.txt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_outdir(tmp_path, oracle):
    s = slide(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_clean_failure(run(s.path, "-o", ro), 1, "ro")
    finally:
        ro.chmod(0o755)


def test_verbose_shows_the_traceback(tmp_path, oracle):
    res = run(tmp_path / "nope.svs", "-o", tmp_path / "out", "-v")
    assert res.exit_code == 1 and "Traceback" in res.stderr


# ------------------------------------------------------------------- --weights (real loader)

def bundle(tmp_path: Path, config: dict | None = None, weights: bytes = b"not safetensors"):
    """A bundle folder with the given config.json and model.safetensors bytes."""
    import hashlib

    from usnet_wsi.model.spec import ModelSpec

    d = tmp_path / "bundle"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(weights)
    cfg = {"format": "usnet-wsi-bundle", "format_version": 1, "name": "t",
           "spec": ModelSpec().to_dict(), "weights_sha256": hashlib.sha256(weights).hexdigest()}
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "thresholds.json").write_text("{}")
    return d


class _Touch:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind, words", [
    ("corrupt", ["safetensors"]),
    ("checksum", ["corrupt"]),
    ("format", ["not a usnet-wsi bundle"]),
    ("version", ["version"]),
    ("pickle", ["pickle"]),
    ("missing", ["not found"]),
])
def test_bad_weights(tmp_path, kind, words):
    s = slide(tmp_path)
    marker = tmp_path / "unpickled"
    if kind == "corrupt":
        w = bundle(tmp_path)
    elif kind == "checksum":
        w = bundle(tmp_path, {"weights_sha256": "0" * 64})
    elif kind == "format":
        w = bundle(tmp_path, {"format": "something-else"})
    elif kind == "version":
        w = bundle(tmp_path, {"format_version": 99})
    elif kind == "pickle":
        w = tmp_path / "model.pt"
        w.write_bytes(pickle.dumps(_Touch(marker), protocol=2))
    else:
        w = tmp_path / "no-such-bundle"
    out = tmp_path / "out"
    res = run(s.path, "-o", out, "--weights", w, "--device", "cpu")
    assert_clean_failure(res, 1, *words)
    assert_nothing_in(out)
    assert not marker.exists()


def test_pickled_weights_inside_a_bundle_are_refused(tmp_path):
    s = slide(tmp_path)
    marker = tmp_path / "unpickled"
    w = bundle(tmp_path, weights=pickle.dumps(_Touch(marker), protocol=2))
    res = run(s.path, "-o", tmp_path / "out", "--weights", w, "--device", "cpu")
    assert_clean_failure(res, 1, "pickle")
    assert not marker.exists()
    shutil.rmtree(w)


def test_real_predictor_from_a_bundle(tmp_path):
    """The real loader and predictor (an untrained model): the run completes, run.json names
    the bundle and its SHA-256, and the outputs are valid even if nothing is found."""
    import torch

    from usnet_wsi.model.bundle import Thresholds, save_bundle, sha256_file
    from usnet_wsi.model.spec import ModelSpec
    from usnet_wsi.model.usnet import USNet

    torch.manual_seed(0)
    spec = ModelSpec()
    folder = save_bundle(tmp_path / "tiny-bundle", "tiny", USNet(spec), spec, Thresholds(),
                         "untrained, for tests")
    s = make_slide(tmp_path / "r.svs", 400, 400, mpp=0.25, nuclei=[], tile=128,
                   tissue=[(0, 0, 400, 400)])
    out = tmp_path / "out"
    res = run(s.path, "-o", out, "--weights", folder, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    record = json.loads((out / "r.run.json").read_text())
    assert record["weights"] == {"name": "tiny",
                                 "sha256": sha256_file(folder / "model.safetensors")}
    assert record["device"] == "cpu" and record["model"]["tile_px"] == spec.input_size
    assert record["counts"]["tiles"] == 4                      # 400 px / (300 - 2 * 40) px
    fc = json.loads((out / "r.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == record["counts"]["nuclei"]


def test_cuda_asked_for_but_absent_is_a_usage_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    s = slide(tmp_path)
    out = tmp_path / "out"
    assert_clean_failure(run(s.path, "-o", out, "--device", "cuda:0"), 2, "cuda")
    assert_nothing_in(out)
