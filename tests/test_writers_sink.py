"""The sink at the end of a run: in a thread or in a process of its own, the same files; errors
reach the caller; abort and a killed parent leave nothing behind."""

from __future__ import annotations

import math
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
import zarr
from shapely.geometry import Point

from usnet_wsi.engine import MergedStep
from usnet_wsi.errors import OutputError, UsageError
from usnet_wsi.nuclei import Nucleus
from usnet_wsi.writers import sink as sink_module
from usnet_wsi.writers.sink import ProcessSink, SinkSpec, ThreadedSink, open_sink

W, H = 1500, 1100


def spec(folder: Path, view_stretch=None) -> SinkSpec:
    folder.mkdir(parents=True, exist_ok=True)
    return SinkSpec(geojson=folder / "s.geojson", geojson_gz=False, fingerprint="f" * 16,
                    zarr=folder / "s.zarr", width=W, height=H, mpp_x=0.25, mpp_y=0.25,
                    source={"slide": "s"}, view_stretch=view_stretch)


def steps(n_rows: int = 4, per_row: int = 12) -> list[MergedStep]:
    """Rows of round nuclei, each row final once the next has come; the last step closes."""
    rng = np.random.default_rng(7)
    out = []
    for r in range(n_rows):
        y = 60 + r * 250
        nuclei = [Nucleus(Point(60 + 110 * k + rng.uniform(-5, 5), y).buffer(rng.uniform(6, 14)),
                          float(rng.uniform(0.5, 1.0)), r, float(rng.uniform(0.1, 0.4)))
                  for k in range(per_row)]
        out.append(MergedStep(nuclei, float(y - 30)))
    out.append(MergedStep([], math.inf))
    return out


def run_sink(sink, items) -> object:
    for step in items:
        sink.put(step)
    return sink.close()


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["labels/nuclei/0"][:])


def test_thread_and_process_sinks_write_the_same_files(tmp_path):
    items = steps()
    done = {}
    for name, kind in (("thread", ThreadedSink), ("process", ProcessSink)):
        s = spec(tmp_path / name)
        summary = run_sink(kind(s), items)
        done[name] = (summary, s)
    a, b = done["thread"][0], done["process"][0]
    assert a.written == b.written == 48 and a.skipped == b.skipped == 0
    assert np.array_equal(a.centroids, b.centroids) and a.centroids.shape == (48, 2)
    ga, gb = done["thread"][1].geojson, done["process"][1].geojson
    assert ga.read_bytes() == gb.read_bytes() and b'"id"' in ga.read_bytes()
    la, lb = labels_of(done["thread"][1].zarr), labels_of(done["process"][1].zarr)
    assert np.array_equal(la, lb) and la.max() == 48


def test_a_square_pixel_view_is_written_in_level_0(tmp_path):
    items = steps(2, 3)
    plain = run_sink(ProcessSink(spec(tmp_path / "a")), items)
    stretched = run_sink(ProcessSink(spec(tmp_path / "b", view_stretch=(2.0, 1.0))), items)
    assert np.allclose(stretched.centroids[:, 0], plain.centroids[:, 0] / 2)
    assert np.allclose(stretched.centroids[:, 1], plain.centroids[:, 1])


def test_an_error_in_the_sink_process_reaches_the_caller_and_removes_the_files(tmp_path):
    out = tmp_path / "out"
    sink = ProcessSink(spec(out))
    sink.put(steps()[0])
    sink.put(MergedStep([Nucleus("not a polygon", 0.9, 0)], 10.0))     # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Geometry"):      # shapely's error, from the process
        for step in steps()[1:]:
            sink.put(step)
            time.sleep(0.05)
        sink.close()
    assert list(out.iterdir()) == []
    assert not sink._proc.is_alive()


def test_a_writer_that_cannot_start_raises_its_output_error_with_the_hint(tmp_path):
    sink = ProcessSink(replace(spec(tmp_path / "out"), zarr=tmp_path / "missing" / "s.zarr"))
    with pytest.raises(OutputError) as info:
        run_sink(sink, steps())
    assert info.value.hint                                  # the fix survives the process
    assert list((tmp_path / "out").iterdir()) == []         # the GeoJSON begun is removed


def test_abort_removes_the_files_and_ends_the_process(tmp_path):
    out = tmp_path / "out"
    sink = ProcessSink(spec(out))
    for step in steps()[:3]:
        sink.put(step)
    sink.abort()
    assert list(out.iterdir()) == []
    assert not sink._proc.is_alive()
    sink.abort()                                            # a second abort does nothing


def test_threaded_sink_abort_removes_the_files(tmp_path):
    out = tmp_path / "out"
    sink = ThreadedSink(spec(out))
    for step in steps()[:3]:
        sink.put(step)
    sink.abort()
    assert list(out.iterdir()) == []


def test_usnet_errors_keep_their_hint_across_processes():
    err = pickle.loads(pickle.dumps(UsageError("bad --mpp 0", "use --mpp 0.25")))
    assert type(err) is UsageError and err.hint == "use --mpp 0.25" and err.exit_code == 2


def test_open_sink_uses_a_process_only_where_asked_and_allowed(tmp_path, monkeypatch):
    threaded = open_sink(spec(tmp_path / "a"), own_process=False)
    assert isinstance(threaded, ThreadedSink)
    threaded.abort()

    class Daemon:
        daemon = True

    monkeypatch.setattr(sink_module.multiprocessing, "current_process", lambda: Daemon())
    in_daemon = open_sink(spec(tmp_path / "b"), own_process=True)   # e.g. in a dask worker
    assert isinstance(in_daemon, ThreadedSink)
    in_daemon.abort()


def test_the_sink_process_ends_when_its_parent_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from pathlib import Path
        from test_writers_sink import spec
        from usnet_wsi.writers.sink import ProcessSink
        if __name__ == "__main__":
            sink = ProcessSink(spec(Path({str(tmp_path / 'out')!r})))
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
