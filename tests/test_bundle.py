"""Weights bundles: save/load round trip, and every bad `--weights` refused with a fix.

Pickles and PyTorch checkpoints are written here with `pickle` / `torch.save` but never loaded:
the tests assert that usnet-wsi refuses them without unpickling (a marker file that unpickling
would create stays absent).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import pickletools
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tiny import tiny_model
from usnet_wsi.cli import main
from usnet_wsi.errors import WeightsError
from usnet_wsi.model.bundle import (FORMAT_VERSION, Thresholds, load_bundle, save_bundle,
                                    sha256_file)
from usnet_wsi.predict import ModelPredictor, load_predictor

@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = tiny_model()
    return save_bundle(tmp_path / "tiny", "tiny", model, model.spec, Thresholds(), "# card\n")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def replace_weights(folder: Path, data: bytes, fix_sha: bool = True) -> None:
    """Put `data` in model.safetensors; with fix_sha, config.json agrees with its SHA-256."""
    (folder / "model.safetensors").write_bytes(data)
    if fix_sha:
        edit_config(folder, weights_sha256=hashlib.sha256(data).hexdigest())


class Unpickled:
    """Unpickling this object creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker: Path, protocol: int) -> bytes:
    data = pickle.dumps(Unpickled(marker), protocol=protocol)
    ops = [op.name for op, _, _ in pickletools.genops(data)]   # inspects, does not execute
    assert "REDUCE" in ops and str(marker).encode() in data
    return data


# ---------------------------------------------------------------- round trip

def test_round_trip_gives_the_same_model_outputs(saved: Path) -> None:
    model = tiny_model()
    bundle = load_bundle(saved)
    assert bundle.name == "tiny" and bundle.spec == model.spec
    assert bundle.thresholds == Thresholds()
    assert bundle.sha256 == sha256_file(saved / "model.safetensors")
    assert (saved / "MODEL_CARD.md").read_text() == "# card\n"
    x = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), bundle.build_model()(x)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_round_trip_predictions_and_paths_to_bundle_files(saved: Path) -> None:
    rng = np.random.default_rng(2)
    tiles = rng.integers(0, 256, (2, 300, 300, 3), dtype=np.uint8)
    thr = Thresholds(score=0.0, top_k=20, rescue_min_area_px=10_000, max_edge_fraction=1.0)
    want = ModelPredictor(tiny_model(), thr, torch.device("cpu")).predict(tiles)
    for given in (saved, saved / "model.safetensors", saved / "config.json"):
        pred = load_predictor(given, "cpu")
        pred.thresholds = thr
        assert pred.sha256 == sha256_file(saved / "model.safetensors")
        got = pred.predict(tiles)
        assert got.counts.tolist() == want.counts.tolist() and got.counts[0] > 0
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.scores, want.scores)


def test_save_replaces_an_existing_bundle_and_keeps_extra_config(saved: Path) -> None:
    other = tiny_model(seed=5)
    save_bundle(saved, "second", other, other.spec, Thresholds(score=0.6), "card 2",
                extra={"validation_metrics": {"aji": 0.5}})
    bundle = load_bundle(saved)
    assert bundle.name == "second" and bundle.thresholds.score == 0.6
    assert bundle.config["validation_metrics"] == {"aji": 0.5}
    assert torch.equal(bundle.state["head.cls.0.weight"], other.state_dict()["head.cls.0.weight"])
    assert sorted(p.name for p in saved.parent.iterdir()) == ["tiny"]   # no temporaries left


# ---------------------------------------------------------------- bad bundles

def _missing(saved: Path) -> Path:
    return saved.parent / "nowhere"


def _empty_dir(saved: Path) -> Path:
    (saved.parent / "empty").mkdir()
    return saved.parent / "empty"


def _no_thresholds(saved: Path) -> Path:
    (saved / "thresholds.json").unlink()
    return saved


def _flipped_bytes(saved: Path) -> Path:
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
    replace_weights(saved, bytes(data), fix_sha=False)
    return saved


def _truncated(saved: Path) -> Path:
    data = (saved / "model.safetensors").read_bytes()
    replace_weights(saved, data[: len(data) // 2])
    return saved


def _empty_weights(saved: Path) -> Path:
    replace_weights(saved, b"")
    return saved


def _wrong_format(saved: Path) -> Path:
    edit_config(saved, format="some-other-tool")
    return saved


def _future_version(saved: Path) -> Path:
    edit_config(saved, format_version=FORMAT_VERSION + 1)
    return saved


def _invalid_json(saved: Path) -> Path:
    (saved / "config.json").write_text('{"format": "usnet-wsi-bundle", ')
    return saved


def _config_not_object(saved: Path) -> Path:
    (saved / "config.json").write_text("[1, 2, 3]")
    return saved


def _no_sha(saved: Path) -> Path:
    config = json.loads((saved / "config.json").read_text())
    del config["weights_sha256"]
    (saved / "config.json").write_text(json.dumps(config))
    return saved


def _unknown_spec_key(saved: Path) -> Path:
    config = json.loads((saved / "config.json").read_text())
    edit_config(saved, spec={**config["spec"], "attention": True})
    return saved


def _spec_does_not_fit_weights(saved: Path) -> Path:
    config = json.loads((saved / "config.json").read_text())
    edit_config(saved, spec={**config["spec"], "base_width": 4})
    return saved


def _unknown_threshold(saved: Path) -> Path:
    (saved / "thresholds.json").write_text(json.dumps({"score": 0.3, "magic": 1}))
    return saved


def _not_a_bundle_file(saved: Path) -> Path:
    path = saved.parent / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    return path


BAD = {
    "missing path": _missing, "directory without files": _empty_dir,
    "no thresholds.json": _no_thresholds, "flipped bytes (SHA mismatch)": _flipped_bytes,
    "truncated safetensors": _truncated, "empty safetensors": _empty_weights,
    "wrong format": _wrong_format, "future format version": _future_version,
    "invalid JSON": _invalid_json, "config not an object": _config_not_object,
    "no weights_sha256": _no_sha, "unknown spec key": _unknown_spec_key,
    "spec does not fit the weights": _spec_does_not_fit_weights,
    "unknown threshold": _unknown_threshold, "some other file": _not_a_bundle_file,
}
EXPECT = {  # a word of the message that names the problem
    "missing path": "not found", "directory without files": "missing",
    "no thresholds.json": "thresholds.json", "flipped bytes (SHA mismatch)": "SHA-256",
    "truncated safetensors": "safetensors", "empty safetensors": "safetensors",
    "wrong format": "format", "future format version": "version",
    "invalid JSON": "JSON", "config not an object": "object", "no weights_sha256": "weights_sha256",
    "unknown spec key": "attention", "spec does not fit the weights": "do not fit",
    "unknown threshold": "magic", "some other file": "not a usnet-wsi",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_weights_raise_weights_error_with_a_fix(saved: Path, case: str) -> None:
    path = BAD[case](saved)
    with pytest.raises(WeightsError) as info:
        load_predictor(path, "cpu")
    assert EXPECT[case] in info.value.message
    assert info.value.hint.strip()
    assert info.value.exit_code == 1


@pytest.mark.parametrize("case", ["missing path", "flipped bytes (SHA mismatch)",
                                  "future format version", "spec does not fit the weights"])
def test_cli_reports_bad_weights_with_exit_1(saved: Path, tmp_path: Path, case: str) -> None:
    path = BAD[case](saved)
    res = CliRunner().invoke(main, ["export", "--format", "torchscript", "--weights", str(path),
                                    "-o", str(tmp_path / "m.pt")])
    assert res.exit_code == 1, res.output
    assert "error:" in res.stderr and "fix:" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "m.pt").exists()


def _spec(saved: Path, **changes) -> Path:
    config = json.loads((saved / "config.json").read_text())
    edit_config(saved, spec={**config["spec"], **changes} if changes else None)
    return saved


@pytest.mark.parametrize("changes", [{}, {"depth": "six"}])
def test_spec_of_the_wrong_type_is_a_weights_error(saved: Path, changes: dict) -> None:
    with pytest.raises(WeightsError):
        load_predictor(_spec(saved, **changes), "cpu")


@pytest.mark.parametrize("thr", [{"score": "high"}, {"score": 2.0}, {"nms": -1}, {"top_k": 0}])
def test_thresholds_out_of_range_are_a_weights_error(saved: Path, thr: dict) -> None:
    (saved / "thresholds.json").write_text(json.dumps(thr))
    with pytest.raises(WeightsError):
        load_bundle(saved)


# ---------------------------------------------------------------- never unpickle

@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_files_are_refused_without_unpickling(tmp_path: Path, saved: Path,
                                                     protocol: int) -> None:
    marker = tmp_path / "unpickled.txt"
    data = evil_pickle(marker, protocol)
    as_file = tmp_path / "weights.pkl"
    as_file.write_bytes(data)
    replace_weights(saved, data)           # also inside a bundle whose SHA-256 agrees
    for path in (as_file, saved):
        with pytest.raises(WeightsError) as info:
            load_predictor(path, "cpu")
        assert info.value.hint
        if protocol >= 2:                  # binary pickles are named as such
            assert "pickle" in info.value.message
    assert not marker.exists()


@pytest.mark.parametrize("zipfile", [True, False])
def test_torch_checkpoints_are_refused_without_unpickling(tmp_path: Path, saved: Path,
                                                          zipfile: bool) -> None:
    marker = tmp_path / "unpickled.txt"
    checkpoint = {"state_dict": tiny_model().state_dict(), "trap": Unpickled(marker)}
    path = tmp_path / "model.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zipfile)
    replace_weights(saved, path.read_bytes())
    for given in (path, saved, saved / "model.safetensors"):
        with pytest.raises(WeightsError) as info:
            load_bundle(given)
        assert "pickle" in info.value.message and "never unpickles" in info.value.message
        assert info.value.hint
    assert not marker.exists()


def test_sha_check_comes_before_parsing(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tampered file is rejected by its digest; the safetensors parser never sees it."""
    import safetensors.torch as st
    calls: list[str] = []
    real: Callable = st.load_file
    monkeypatch.setattr(st, "load_file", lambda *a, **k: calls.append("parse") or real(*a, **k))
    _flipped_bytes(saved)
    with pytest.raises(WeightsError, match="SHA-256"):
        load_bundle(saved)
    assert calls == []


def test_half_precision_storage_halves_the_file_and_keeps_outputs(tmp_path: Path) -> None:
    model = tiny_model()
    full = save_bundle(tmp_path / "f32", "f32", model, model.spec, Thresholds(), "card")
    half = save_bundle(tmp_path / "f16", "f16", model, model.spec, Thresholds(), "card",
                       dtype=torch.float16)
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    b = load_bundle(half)
    assert b.config["storage_dtype"] == "float16"
    assert all(v.dtype != torch.float16 for v in b.state.values())
    x = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model.eval()(x), b.build_model()(x)
    torch.testing.assert_close(got.seg_logits, want.seg_logits, atol=0.05, rtol=0.05)


def test_inference_tile_size_comes_from_the_bundle_and_anchors_follow_it(saved: Path) -> None:
    from usnet_wsi.anchors import feature_sizes
    edit_config(saved, inference_tile_px=200)
    pred = load_predictor(saved, "cpu")
    assert pred.tile_px == 200 and load_predictor(saved, "cpu", tile_px=160).tile_px == 160
    sizes = feature_sizes(200, pred.model.spec.det_levels)
    assert pred.anchors.shape[0] == sum(s * s for s in sizes) * pred.model.spec.anchors_per_location
    rng = np.random.default_rng(0)
    found = pred.predict(rng.integers(0, 256, (2, 200, 200, 3), dtype=np.uint8))
    assert found.labels.shape == (2, 200, 200)


@pytest.mark.parametrize("value", ["556", 10, True])
def test_a_bad_inference_tile_size_is_refused(saved: Path, value) -> None:
    edit_config(saved, inference_tile_px=value)
    with pytest.raises(WeightsError, match="inference_tile_px"):
        load_predictor(saved, "cpu")


def test_precision_is_resolved_for_the_device() -> None:
    from usnet_wsi.errors import UsageError
    from usnet_wsi.predict import resolve_precision
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(UsageError, match="CUDA"):
        resolve_precision("fp16", cpu)
