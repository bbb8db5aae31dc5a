"""Resume mid-slide: a run killed anywhere continues from its journal and the outputs are
byte-identical to an uninterrupted run; a journal that does not fit is never trusted."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from child import HALO, MPP, TILE, H, W, nuclei
from oracle import OraclePredictor
from synth import make_slide
from usnet_wsi.config import SegmentConfig
from usnet_wsi.journal import HEADER, journal_dir
from usnet_wsi.pipeline import segment_slide

CHILD = Path(__file__).resolve().parent / "child.py"
NAME = "k"


@pytest.fixture(scope="module")
def kslide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kslide")
    return make_slide(folder / f"{NAME}.svs", W, H, mpp=MPP, nuclei=nuclei(), tile=128,
                      tissue=[(0, 0, W, H)])


def child(mode: str, slide, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), mode, "segment", str(slide.path),
                             "-o", str(out), "--batch-size", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def outputs(out: Path) -> dict[str, bytes]:
    """Every output file's bytes by relative path, run.json aside (it holds times)."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and not path.name.endswith(".run.json"):
            files[path.relative_to(out).as_posix()] = path.read_bytes()
    return files


def record(out: Path) -> dict:
    return json.loads((out / f"{NAME}.run.json").read_text())


@pytest.fixture(scope="module")
def reference(kslide, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = child("plain", kslide, out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return outputs(out), record(out)


def test_sigkill_at_random_points_then_rerun_gives_identical_outputs(kslide, reference,
                                                                    tmp_path):
    """Each trial kills the run at random moments (model, merge, writers, finishing), up to
    three times in a row, then lets it finish."""
    rng = random.Random(20261202)
    resumed = []
    for trial in range(3):
        out = tmp_path / f"t{trial}"
        for attempt in range(4):
            proc = child("slowish", kslide, out)
            try:
                proc.wait(timeout=rng.uniform(1.5, 6.0) if attempt < 3 else 120)
            except subprocess.TimeoutExpired:
                proc.kill()                                       # SIGKILL
                proc.wait()
                continue
            assert proc.returncode == 0, proc.stderr.read()
            break
        assert outputs(out) == reference[0], f"trial {trial}"
        assert not journal_dir(out, NAME).exists()
        resumed.append(record(out)["counts"]["resumed_tiles"])
    assert any(r > 0 for r in resumed), resumed


def test_sigkill_while_writing_the_last_output_resumes_every_tile(kslide, reference,
                                                                  tmp_path):
    out, mark = tmp_path / "out", tmp_path / "overview-started"
    proc = child("slowish", kslide, out, env={"USNET_TEST_MARK": str(mark)})
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (out / f"{NAME}.run.json").exists()
    again = child("plain", kslide, out)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "resuming after" in err
    assert outputs(out) == reference[0]
    counts, ref_counts = record(out)["counts"], reference[1]["counts"]
    assert counts["resumed_tiles"] == counts["tiles"] == ref_counts["tiles"]
    assert {k: v for k, v in counts.items() if k != "resumed_tiles"} == \
        {k: v for k, v in ref_counts.items() if k != "resumed_tiles"}
    assert ref_counts["resumed_tiles"] == 0


# ------------------------------------------------------------------ in-process journal checks


class _Failing(OraclePredictor):
    """The oracle until tile `fail_from`, then a lost device."""

    fail_from = 12

    def predict(self, tiles, meta=None, regions=None):
        if meta[-1].index >= self.fail_from:
            raise RuntimeError("device lost")
        return super().predict(tiles, meta, regions)


def _cfg(out: Path, **kw) -> SegmentConfig:
    out.mkdir(exist_ok=True)
    return SegmentConfig(out_dir=out, batch_size=2, **kw)


def _oracle(cls=OraclePredictor):
    return cls(nuclei(), W, H, MPP, TILE, HALO)


def _interrupted(kslide, out: Path, reporter) -> SegmentConfig:
    cfg = _cfg(out)
    with pytest.raises(RuntimeError, match="device lost"):
        segment_slide(kslide.path, cfg, _oracle(_Failing), reporter)
    assert any(journal_dir(out, NAME).glob("band-*.npz"))
    return cfg


def test_a_damaged_band_is_discarded_with_a_warning(kslide, reference, tmp_path, reporter):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    bands = sorted(journal_dir(cfg.out_dir, NAME).glob("band-*.npz"))
    assert len(bands) >= 2
    data = bands[1].read_bytes()
    bands[1].write_bytes(data[: len(data) // 2])                   # truncated
    oracle = _oracle()
    segment_slide(kslide.path, cfg, oracle, reporter)
    assert any(bands[1].name in w and "damaged" in w for w in reporter.warnings)
    assert outputs(cfg.out_dir) == reference[0]
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        second_band_first_tile = int(z["tiles"][0])
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] == second_band_first_tile


def test_a_flipped_byte_in_a_band_is_never_trusted(kslide, reference, tmp_path, reporter):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    band = sorted(journal_dir(cfg.out_dir, NAME).glob("band-*.npz"))[0]
    data = bytearray(band.read_bytes())
    data[len(data) // 2] ^= 0xFF
    band.write_bytes(bytes(data))
    segment_slide(kslide.path, cfg, _oracle(), reporter)
    assert any("damaged" in w for w in reporter.warnings)
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] == 0
    assert outputs(cfg.out_dir) == reference[0]


def test_an_unreadable_header_starts_over(kslide, reference, tmp_path, reporter):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    (journal_dir(cfg.out_dir, NAME) / HEADER).write_text("{not json")
    segment_slide(kslide.path, cfg, _oracle(), reporter)
    assert any("unreadable; starting the slide over" in m for m in reporter.infos)
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] == 0
    assert outputs(cfg.out_dir) == reference[0]


def test_a_journal_of_other_settings_is_not_used_and_says_why(kslide, tmp_path, reporter):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    other = SegmentConfig(out_dir=cfg.out_dir, batch_size=2, iou_threshold=0.5)
    segment_slide(kslide.path, other, _oracle(), reporter)
    assert any("made otherwise (iou_threshold: 0.3 -> 0.5)" in m for m in reporter.infos)
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] == 0


def test_a_journal_of_another_model_is_not_used(kslide, tmp_path, reporter, monkeypatch):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    monkeypatch.setattr("usnet_wsi.pipeline.weights_id", lambda weights: "0" * 64)
    segment_slide(kslide.path, cfg, _oracle(), reporter)
    assert any("made otherwise (weights:" in m for m in reporter.infos)
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] == 0


def test_no_resume_starts_over(kslide, reference, tmp_path, reporter):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    fresh = SegmentConfig(out_dir=cfg.out_dir, batch_size=2, resume=False)
    oracle = _oracle()
    segment_slide(kslide.path, fresh, oracle, reporter)
    assert any("--no-resume" in m for m in reporter.infos)
    rec = record(cfg.out_dir)
    assert rec["counts"]["resumed_tiles"] == 0 and rec["settings"]["resume"] is False
    assert oracle.calls == -(-rec["counts"]["tiles"] // 2)          # every tile predicted
    assert outputs(cfg.out_dir) == reference[0]


def test_resume_with_another_batch_size_is_still_identical(kslide, reference, tmp_path,
                                                           reporter):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    segment_slide(kslide.path, SegmentConfig(out_dir=cfg.out_dir, batch_size=5), _oracle(),
                  reporter)
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] > 0
    assert outputs(cfg.out_dir) == reference[0]


def test_a_journal_made_on_another_kind_of_device_is_not_used(kslide, tmp_path, reporter):
    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    elsewhere = _oracle()
    elsewhere.device = "cuda:0"
    segment_slide(kslide.path, cfg, elsewhere, reporter)
    assert any("made otherwise (device_kind: cpu -> cuda)" in m for m in reporter.infos)
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] == 0


def test_cli_no_resume_flag_starts_over(kslide, reference, tmp_path, reporter, monkeypatch):
    from click.testing import CliRunner

    from usnet_wsi.cli import main

    cfg = _interrupted(kslide, tmp_path / "out", reporter)
    monkeypatch.setattr("usnet_wsi.predict.load_predictor",
                        lambda weights=None, device="auto", *rest: _oracle())
    res = CliRunner().invoke(main, ["segment", str(kslide.path), "-o", str(cfg.out_dir),
                                    "--no-resume"])
    assert res.exit_code == 0, res.stderr
    assert "--no-resume" in " ".join(res.stderr.split())
    assert record(cfg.out_dir)["counts"]["resumed_tiles"] == 0
    assert outputs(cfg.out_dir) == reference[0]
