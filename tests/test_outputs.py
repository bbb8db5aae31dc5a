"""Outputs of a slide as one set: --overwrite is all or nothing (disk full, errors and Ctrl-C in
the swap, kill -9 in the swap), skip only when nothing changed, manifest checks, SIGTERM, stale
temporaries, long slide names and the same slide given twice. The model is the oracle."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from child import HALO, MPP, TILE, H, W, nuclei
from oracle import OraclePredictor
from synth import make_slide
from usnet_wsi.cli import main
from usnet_wsi.outputs import STAGE_PREFIX, clean_stale, fingerprint_file
from usnet_wsi.writers.atomic import NAME_MAX, AtomicTarget, host_tag, temp_name

CHILD = Path(__file__).resolve().parent / "child.py"


def run(*args: str):
    return CliRunner().invoke(main, ["segment", *map(str, args)])


def err(res) -> str:
    return " ".join(res.stderr.split())


@pytest.fixture(autouse=True)
def oracle(monkeypatch):
    monkeypatch.setattr("usnet_wsi.predict.load_predictor",
                        lambda weights=None, device="auto", *rest: OraclePredictor(
                            nuclei(), W, H, MPP, TILE, HALO))


@pytest.fixture
def slide(tmp_path):
    return make_slide(tmp_path / "s1.svs", W, H, mpp=MPP, nuclei=nuclei(), tile=128,
                      tissue=[(0, 0, W, H)])


def snapshot(out: Path) -> dict:
    """Every entry of OUTDIR (hidden ones too) with its fingerprint."""
    return {p.name: fingerprint_file(p) for p in sorted(out.iterdir())}


def first_run(slide, out, *extra) -> dict:
    res = run(slide.path, "-o", out, "--roi", "0,0,200,300", *extra)
    assert res.exit_code == 0, res.stderr
    return snapshot(out)


def test_disk_full_during_overwrite_keeps_the_old_set(tmp_path, slide, monkeypatch):
    out = tmp_path / "out"
    before = first_run(slide, out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("usnet_wsi.pipeline.write_overview", full)
    res = run(slide.path, "-o", out, "--overwrite")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    after = snapshot(out)
    assert after.pop(".s1.partial", None) is not None   # finished tiles kept for a re-run
    assert after == before                               # the old set, nothing else
    monkeypatch.undo()
    monkeypatch.setattr("usnet_wsi.predict.load_predictor",
                        lambda weights=None, device="auto", *rest: OraclePredictor(
                            nuclei(), W, H, MPP, TILE, HALO))
    res = run(slide.path, "-o", out, "--roi", "0,0,200,300", "--json")
    assert json.loads(res.stdout)["slides"][0]["status"] == "skipped"
    assert snapshot(out) == before                       # the skip removed the stale journal


@pytest.mark.parametrize("fail_at, exc", [(2, OSError(errno.EIO, "I/O error")),
                                          (5, KeyboardInterrupt()), (6, OSError(errno.EIO, "x")),
                                          (8, OSError(errno.ENOSPC, "full"))])
def test_failure_inside_the_swap_puts_the_old_set_back(tmp_path, slide, monkeypatch, fail_at,
                                                       exc):
    """Renames 1-4 move the old outputs aside (run.json first), 5-8 bring the new ones in
    (zarr first, run.json last): a failure at any of them leaves the old set."""
    out = tmp_path / "out"
    before = first_run(slide, out)
    real, calls = os.replace, []

    def replace(src, dst):
        if (STAGE_PREFIX in str(src)) != (STAGE_PREFIX in str(dst)):   # in or out of the stage
            calls.append(dst)
            if len(calls) == fail_at:
                raise exc
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    res = run(slide.path, "-o", out, "--overwrite")
    monkeypatch.setattr(os, "replace", real)
    assert res.exit_code in (1, 130)
    after = snapshot(out)
    assert after.pop(".s1.partial", None) is not None   # every tile, kept for a re-run
    assert after == before


def test_kill_in_the_middle_of_the_swap_is_rolled_back_by_the_next_run(tmp_path, slide):
    out = tmp_path / "out"
    before = first_run(slide, out)
    child = subprocess.run([sys.executable, str(CHILD), "die-in-swap", "segment",
                            str(slide.path), "-o", str(out), "--overwrite"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 9, child.stderr
    assert (out / "s1.zarr").exists() and not (out / "s1.run.json").exists()  # a mixed set
    res = run(slide.path, "-o", out, "--roi", "0,0,200,300", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["slides"][0]["status"] == "skipped"
    assert snapshot(out) == before                               # old set back, stage gone


def test_sigterm_cleans_up_says_so_and_exits_143(tmp_path, slide):
    out = tmp_path / "out"
    before = first_run(slide, out)
    proc = subprocess.Popen([sys.executable, str(CHILD), "slow", "segment", str(slide.path),
                             "-o", str(out), "--overwrite", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(STAGE_PREFIX) for p in out.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    after = snapshot(out)
    after.pop(".s1.partial", None)                       # finished tiles, if any, are kept
    assert after == before


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, slide):
    out = tmp_path / "out"
    first_run(slide, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = host_tag()
    stale = [out / f".s1.geojson.tmp-{host}-{dead}-0123abcd",
             out / f"{STAGE_PREFIX}{host}-{dead}-89abcdef"]
    live = [out / f".s1.geojson.tmp-{host}-{os.getppid()}-0123abcd",   # a live process
            out / f".s1.geojson.tmp-ffff-{dead}-0123abcd" if host != "ffff" else
            out / f".s1.geojson.tmp-fffe-{dead}-0123abcd",               # another host
            out / ".notes.txt"]                                           # not ours
    stale[0].write_text("x")
    stale[1].mkdir()
    (stale[1] / "z.zarr").mkdir()
    for p in live:
        p.write_text("x")
    res = run(slide.path, "-o", out, "--roi", "0,0,200,300")
    assert res.exit_code == 0 and "removed 2 temporary" in err(res)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    assert clean_stale(out) == []


@pytest.mark.parametrize("change, word", [
    (["--mpp", "0.45"], "mpp_x"), ([], "roi_xywh"), (["--roi", "0,0,200,300", "--no-tissue-mask"],
                                                     "tissue_mask")])
def test_changed_settings_are_not_skipped_and_not_replaced(tmp_path, slide, change, word):
    out = tmp_path / "out"
    before = first_run(slide, out)
    res = run(slide.path, "-o", out, *change)
    assert res.exit_code == 1 and word in err(res) and "--overwrite" in err(res)
    assert snapshot(out) == before
    res = run(slide.path, "-o", out, *change, "--overwrite", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["slides"][0]["status"] == "done"


def test_skipped_slide_reports_its_real_nuclei_count(tmp_path, slide):
    out = tmp_path / "out"
    res = run(slide.path, "-o", out, "--json")
    n = json.loads(res.stdout)["slides"][0]["nuclei"]
    assert n == len(nuclei())
    res = run(slide.path, "-o", out, "--json")
    s = json.loads(res.stdout)["slides"][0]
    assert (s["status"], s["nuclei"]) == ("skipped", n)


def test_outputs_that_do_not_match_run_json_are_redone(tmp_path, slide):
    out = tmp_path / "out"
    first_run(slide, out)
    geo = out / "s1.geojson"
    geo.write_text(geo.read_text().replace("detection", "DETECTION"))   # same size, other bytes
    res = run(slide.path, "-o", out, "--roi", "0,0,200,300", "--json")
    assert json.loads(res.stdout)["slides"][0]["status"] == "done"
    assert "do not match their run.json" in err(res)
    record = json.loads((out / "s1.run.json").read_text())
    assert record["manifest"]["s1.geojson"] == fingerprint_file(geo)


def test_same_slide_twice_by_path_or_link_is_processed_once(tmp_path, slide):
    link = tmp_path / "link.svs"
    link.symlink_to(slide.path)
    res = run(slide.path, slide.path, link, "-o", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert [s["status"] for s in summary["slides"]] == ["done"] and summary["failed"] == 0
    assert "processed once" in err(res)


def test_long_slide_name_fits_and_too_long_one_is_explained(tmp_path):
    name = "n" * 231                                      # 235 bytes with ".svs"
    s = make_slide(tmp_path / f"{name}.svs", W, H, mpp=MPP, nuclei=nuclei(), tile=128)
    res = run(s.path, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "out" / f"{name}.overview.png").exists()
    longer = make_slide(tmp_path / f"{'m' * 245}.svs", W, H, mpp=MPP, nuclei=[], tile=128)
    res = run(longer.path, "-o", tmp_path / "out2")
    assert res.exit_code == 1 and "255-byte" in err(res) and "shorter name" in err(res)
    assert "Traceback" not in res.stderr and not (tmp_path / "out2").exists()


def test_temporary_names_fit_and_abort_never_masks_the_error(tmp_path):
    final = tmp_path / ("é" * 120 + ".geojson")            # 248 bytes
    assert len(temp_name(final.name).encode()) <= NAME_MAX
    target = AtomicTarget(final)
    target.temp.write_text("x")
    target.temp.unlink()
    target.temp.mkdir()
    (target.temp / "f").write_text("x")
    target.abort()                                          # no exception, temp gone
    assert not target.temp.exists()
    bad = AtomicTarget(tmp_path / "x.json")
    bad.temp = tmp_path / ("y" * 300)                       # unlink raises ENAMETOOLONG
    bad.abort()
