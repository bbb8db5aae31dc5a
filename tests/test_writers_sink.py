"""The sink at the end of a run (merge, then GeoJSON and label image): in a thread or in a
process of its own, the same files, and the same nuclei as the engine's own merge; errors reach
the caller; abort and a killed parent leave nothing behind."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr

from oracle import OraclePredictor
from test_engine import ArrayReader, _scene
from usnet_wsi.engine import (EngineSettings, StageTimes, TileResult, merged_nuclei,
                              tile_results)
from usnet_wsi.errors import OutputError, UsageError
from usnet_wsi.nuclei import Nucleus
from usnet_wsi.tiling import plan_tiles
from usnet_wsi.writers import sink as sink_module
from usnet_wsi.writers.sink import ProcessSink, SinkSpec, ThreadedSink, open_sink

W, H, MPP, TILE, HALO = 600, 500, 0.5, 100, 16


def scene():
    """A synthetic slide, its tile plan and the oracle's tile results in plan order."""
    nuclei, image, _ = _scene(W, H, TILE - 2 * HALO)
    plan = plan_tiles((0, 0, W, H), MPP, MPP, TILE, HALO)
    oracle = OraclePredictor(nuclei, W, H, MPP, TILE, HALO)
    results = list(tile_results(ArrayReader(image), plan, oracle, EngineSettings(4, 0, 8),
                                StageTimes()))
    return image, plan, oracle, results


@pytest.fixture(scope="module")
def run_scene():
    return scene()


def spec(folder: Path, plan, view_stretch=None) -> SinkSpec:
    folder.mkdir(parents=True, exist_ok=True)
    return SinkSpec(plan=plan, iou_threshold=0.3, geojson=folder / "s.geojson",
                    geojson_gz=False, fingerprint="f" * 16, zarr=folder / "s.zarr", width=W,
                    height=H, mpp_x=0.25, mpp_y=0.25, source={"slide": "s"},
                    view_stretch=view_stretch)


def run_sink(sink, results) -> object:
    for res in results:
        sink.put(res)
    return sink.close()


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["labels/nuclei/0"][:])


def test_both_sinks_write_the_same_files_with_the_engines_merge(tmp_path, run_scene):
    image, plan, oracle, results = run_scene
    done = {}
    for name, kind in (("thread", ThreadedSink), ("process", ProcessSink)):
        s = spec(tmp_path / name, plan)
        done[name] = (run_sink(kind(s), results), s)
    a, b = done["thread"][0], done["process"][0]
    merged = [n for step in merged_nuclei(ArrayReader(image), plan, oracle, EngineSettings())
              for n in step.nuclei]
    assert a.nuclei == b.nuclei == a.written == b.written == len(merged) > 50
    assert a.merge == b.merge and a.merge["emitted"] == len(merged)
    # ids in the merge's emission order: the centroid of feature k is that of merged nucleus k
    want = shapely.get_coordinates(shapely.centroid(np.array([n.polygon_l0 for n in merged])))
    assert np.array_equal(a.centroids, b.centroids) and np.allclose(a.centroids, want)
    ga, gb = done["thread"][1].geojson, done["process"][1].geojson
    assert ga.read_bytes() == gb.read_bytes() and b'"id"' in ga.read_bytes()
    la, lb = labels_of(done["thread"][1].zarr), labels_of(done["process"][1].zarr)
    assert np.array_equal(la, lb) and la.max() == len(merged)


def test_a_square_pixel_view_is_written_in_level_0(tmp_path, run_scene):
    _, plan, _, results = run_scene
    plain = run_sink(ProcessSink(spec(tmp_path / "a", plan)), results)
    stretched = run_sink(ProcessSink(spec(tmp_path / "b", plan, view_stretch=(2.0, 1.0))),
                         results)
    assert np.allclose(stretched.centroids[:, 0], plain.centroids[:, 0] / 2)
    assert np.allclose(stretched.centroids[:, 1], plain.centroids[:, 1])


def test_an_error_in_the_sink_process_reaches_the_caller_and_removes_the_files(tmp_path,
                                                                              run_scene):
    _, plan, _, results = run_scene
    out = tmp_path / "out"
    sink = ProcessSink(spec(out, plan))
    bad = Nucleus("not a polygon", 0.9, results[1].tile.index)     # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a shapely Polygon"):   # from the merge
        sink.put(results[0])
        sink.put(TileResult(results[1].tile, [bad], 1))
        for res in results[2:]:
            sink.put(res)
            time.sleep(0.02)
        sink.close()
    assert list(out.iterdir()) == []
    assert not sink._proc.is_alive()


def test_a_writer_that_cannot_start_raises_its_output_error_with_the_hint(tmp_path, run_scene):
    _, plan, _, results = run_scene
    s = replace(spec(tmp_path / "out", plan), zarr=tmp_path / "missing" / "s.zarr")
    with pytest.raises(OutputError) as info:
        run_sink(ProcessSink(s), results)
    assert info.value.hint                                  # the fix survives the process
    assert list((tmp_path / "out").iterdir()) == []         # the GeoJSON begun is removed


@pytest.mark.parametrize("kind", [ThreadedSink, ProcessSink])
def test_abort_removes_the_files(tmp_path, run_scene, kind):
    _, plan, _, results = run_scene
    out = tmp_path / "out"
    sink = kind(spec(out, plan))
    for res in results[:5]:
        sink.put(res)
    sink.abort()
    assert list(out.iterdir()) == []
    if kind is ProcessSink:
        assert not sink._proc.is_alive()
        sink.abort()                                        # a second abort does nothing


def test_usnet_errors_keep_their_hint_across_processes():
    err = pickle.loads(pickle.dumps(UsageError("bad --mpp 0", "use --mpp 0.25")))
    assert type(err) is UsageError and err.hint == "use --mpp 0.25" and err.exit_code == 2


def test_open_sink_uses_a_process_only_where_asked_and_allowed(tmp_path, monkeypatch):
    plan = plan_tiles((0, 0, W, H), MPP, MPP, TILE, HALO)
    threaded = open_sink(spec(tmp_path / "a", plan), own_process=False)
    assert isinstance(threaded, ThreadedSink)
    threaded.abort()

    class Daemon:
        daemon = True

    monkeypatch.setattr(sink_module.multiprocessing, "current_process", lambda: Daemon())
    in_daemon = open_sink(spec(tmp_path / "b", plan), own_process=True)   # e.g. in dask
    assert isinstance(in_daemon, ThreadedSink)
    in_daemon.abort()


def test_the_sink_process_ends_when_its_parent_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from pathlib import Path
        from test_writers_sink import HALO, MPP, TILE, H, W, spec
        from usnet_wsi.tiling import plan_tiles
        from usnet_wsi.writers.sink import ProcessSink
        if __name__ == "__main__":
            plan = plan_tiles((0, 0, W, H), MPP, MPP, TILE, HALO)
            sink = ProcessSink(spec(Path({str(tmp_path / 'out')!r}), plan))
            print(sink._proc.pid, flush=True)
            time.sleep(60)
    """)
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _gone(child):
        time.sleep(0.1)
    assert _gone(child), "the sink process outlived its parent"


def _gone(pid: int) -> bool:
    """The process has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return True
