"""`usnet-wsi segment --scheduler / --scheduler-file` on real dask clusters on 127.0.0.1.

Workers run the oracle model (tests/dask_oracle.py, a worker preload) on small synthetic slides;
the reference is a local run of the same slides with the same oracle. Two clusters: a
LocalCluster (2 worker processes) in this process, and `dask scheduler` + two `dask worker`
processes started in another folder, for the kill test and the path tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import dask_oracle
from child import MPP, H, W, nuclei
from synth import make_slide
from usnet_wsi.cli import main

TESTS = Path(__file__).resolve().parent
needs_distributed = pytest.mark.skipif(find_spec("distributed") is None,
                                       reason="dask.distributed is not installed "
                                              "(pip install 'distributed>=2024.1')")
STAGE_RE = re.compile(r"^\.usnet-tmp-[0-9a-f]{4}-(\d+)-")


def run_cli(*args: Any):
    return CliRunner().invoke(main, ["segment", *map(str, args)])


def err(res) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(res.stderr.split())


def rows(summary: dict, out: Path) -> list[dict]:
    """Summary rows without timings, outputs by file name, OUT named "OUT" in messages."""
    return [{**r, "seconds": None, "outputs": [Path(o).name for o in r["outputs"]],
             "message": r["message"].replace(str(out), "OUT")} for r in summary["slides"]]


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_outputs(ref: Path, out: Path, names: list[str]) -> None:
    """Byte-identical GeoJSON, overview and zarr store; run.json equal but for timings."""
    for name in names:
        for suffix in (".geojson", ".overview.png"):
            assert (out / f"{name}{suffix}").read_bytes() == (ref / f"{name}{suffix}").read_bytes()
        assert files(out / f"{name}.zarr") == files(ref / f"{name}.zarr")
        a, b = (json.loads((d / f"{name}.run.json").read_text()) for d in (ref, out))
        for rec in (a, b):
            rec["counts"].pop("resumed_tiles")      # how much came from a journal may differ
        for key in ("counts", "identity", "manifest", "plan", "weights", "model", "device",
                    "unreadable_tiles", "outputs"):
            assert a[key] == b[key], key


@dataclass
class Slides:
    folder: Path
    a: Path
    b: Path
    bad: Path          # a text file named .svs
    dup: Path          # another a.svs, in a subfolder: same output names as `a`

    def args(self) -> list[Path]:
        return [self.a, self.bad, self.b, self.dup]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Slides:
    folder = tmp_path_factory.mktemp("slides")
    for name in ("a", "b"):
        make_slide(folder / f"{name}.svs", W, H, mpp=MPP, kind="svs", nuclei=nuclei(),
                   tile=128, tissue=[(0, 0, W, H)])
    (folder / "x.svs").write_text("not a slide")
    (folder / "sub").mkdir()
    shutil.copy(folder / "a.svs", folder / "sub" / "a.svs")
    return Slides(folder, folder / "a.svs", folder / "b.svs", folder / "x.svs",
                  folder / "sub" / "a.svs")


@dataclass
class Reference:
    out: Path
    exit_code: int
    summary: dict


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> Reference:
    """A local run of the slides (no cluster) with the same oracle model."""
    out = tmp_path_factory.mktemp("local") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("usnet_wsi.predict.load_predictor", dask_oracle.load)
        res = run_cli(*slides.args(), "-o", out, "--json")
    return Reference(out, res.exit_code, json.loads(res.stdout))


@pytest.fixture(scope="module")
def local_cluster():
    """LocalCluster: 2 worker processes, 1 thread each, the oracle preloaded."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, worker_dashboard_address=None,
                      preload=["dask_oracle"]) as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


# ------------------------------------------------------------------ options, no cluster needed


@pytest.mark.parametrize("options, words", [
    (["--scheduler", "localhost"], ["not a dask scheduler address", "tcp://"]),
    (["--scheduler", "tcp://h:99999"], ["not a dask scheduler address"]),
    (["--scheduler", "tcp://h:8786", "--scheduler-file", "{file}"], ["both name a scheduler"]),
    (["--scheduler-file", "{missing}"], ["no such file"]),
    (["--scheduler-file", "{file}"], ["holds no scheduler address"]),
    (["--scheduler-file", "{text}"], ["not a readable scheduler file"]),
    (["--scheduler-file", "{bad}"], ["holds 'inproc://x', not a dask scheduler address"]),
])
def test_bad_scheduler_options_are_usage_errors(tmp_path, slides, options, words):
    (tmp_path / "file.json").write_text('{"type": "Scheduler"}')
    (tmp_path / "text").write_text("tcp://h:8786")
    (tmp_path / "bad.json").write_text('{"address": "inproc://x"}')
    paths = {"file": tmp_path / "file.json", "missing": tmp_path / "nope.json",
             "text": tmp_path / "text", "bad": tmp_path / "bad.json"}
    res = run_cli(slides.a, "-o", tmp_path / "out", *(o.format(**paths) for o in options))
    assert res.exit_code == 2, res.stderr
    assert "Traceback" not in res.stderr and "fix:" in err(res)
    for w in words:
        assert w in err(res)
    assert not (tmp_path / "out").exists()


@needs_distributed
def test_unreachable_scheduler_is_a_clear_error(tmp_path, slides):
    import dask
    import distributed  # noqa: F401 - its defaults must be in dask's config before the change

    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        res = run_cli(slides.a, "-o", tmp_path / "out", "--scheduler", f"tcp://127.0.0.1:{port}")
    assert res.exit_code == 1
    assert "Traceback" not in res.stderr and "fix:" in err(res)
    assert f"cannot reach the dask scheduler at tcp://127.0.0.1:{port}" in err(res)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ LocalCluster


@needs_distributed
def test_cluster_run_equals_local_run(slides, reference, local_cluster, tmp_path):
    out = tmp_path / "out"
    address = local_cluster.scheduler.address
    res = run_cli(*slides.args(), "-o", out, "--scheduler", address, "--json")
    summary = json.loads(res.stdout)
    assert [r["status"] for r in summary["slides"]] == ["done", "failed", "done", "failed"]
    assert res.exit_code == reference.exit_code == 1
    assert rows(summary, out) == rows(reference.summary, reference.out)
    assert {k: summary[k] for k in ("done", "skipped", "failed", "exit_code")} == \
        {k: reference.summary[k] for k in ("done", "skipped", "failed", "exit_code")}
    text = err(res)
    assert "Traceback" not in res.stderr
    assert "not an image format" in text and "would both write a.*" in text  # bad, duplicate
    assert "a: 56 nuclei from 30 tiles" in text             # a worker's message, forwarded
    assert "slides: 3/3" in text and "tiles=60" in text     # progress across the cluster
    if (os.cpu_count() or 1) > 1:                           # dask's OMP_NUM_THREADS=1
        assert "runs the model on its CPU with 1 thread" in text
    assert_same_outputs(reference.out, out, ["a", "b"])
    workers = set(local_cluster.nthreads())
    for name in ("a", "b"):
        settings = json.loads((out / f"{name}.run.json").read_text())["settings"]
        assert settings["scheduler"] == address and settings["worker"] in workers
        local = json.loads((reference.out / f"{name}.run.json").read_text())["settings"]
        assert local["scheduler"] is None and local["worker"] is None


@needs_distributed
def test_skips_outputs_made_locally_or_on_the_cluster_and_keeps_the_model_loaded(
        slides, reference, local_cluster, tmp_path, monkeypatch):
    address = local_cluster.scheduler.address
    out = tmp_path / "out"
    statuses = lambda res: [r["status"] for r in json.loads(res.stdout)["slides"]]  # noqa: E731
    assert statuses(run_cli(slides.a, slides.b, "-o", out, "--scheduler", address,
                            "--json")) == ["done", "done"]
    loads = local_cluster.run(dask_oracle.loads)
    res = run_cli(slides.a, slides.b, "-o", out, "--scheduler", address, "--json")
    assert res.exit_code == 0 and statuses(res) == ["skipped", "skipped"]
    assert "skipped, complete outputs" in err(res)
    res = run_cli(slides.a, slides.b, "-o", reference.out, "--scheduler", address, "--json")
    assert statuses(res) == ["skipped", "skipped"]            # outputs of a local run
    monkeypatch.setattr("usnet_wsi.predict.load_predictor", dask_oracle.load)
    res = run_cli(slides.a, slides.b, "-o", out, "--json")
    assert statuses(res) == ["skipped", "skipped"]            # a local run, cluster outputs
    res = run_cli(slides.a, slides.b, "-o", out, "--scheduler", address, "--json", "--overwrite")
    assert statuses(res) == ["done", "done"]
    assert local_cluster.run(dask_oracle.loads) == loads      # no worker loaded it again
    assert all(n <= 1 for n in loads.values())


@needs_distributed
def test_workers_option_in_daemonic_dask_workers_warns_and_runs_in_the_worker(
        slides, reference, local_cluster, tmp_path):
    out = tmp_path / "out"
    res = run_cli(slides.a, "-o", out, "--scheduler", local_cluster.scheduler.address,
                  "--workers", "1")
    assert res.exit_code == 0, res.stderr
    assert "cannot start the --workers 1 CPU-stage processes" in err(res)
    assert "DASK_DISTRIBUTED__WORKER__DAEMON=False" in err(res)
    assert json.loads((out / "a.run.json").read_text())["settings"]["workers"] == 0
    assert_same_outputs(reference.out, out, ["a"])


# ------------------------------------------------------------------ dask scheduler + dask worker


@dataclass
class Procs:
    address: str
    scheduler_file: Path
    workers_cwd: Path
    client: Any


def _wait_for_scheduler_file(path: Path, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited: {log.read_text()[-2000:]}")
        try:
            return json.loads(path.read_text())["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    raise RuntimeError("dask scheduler did not start in 60 s")


@pytest.fixture(scope="module")
def dask_procs(tmp_path_factory):
    """`dask scheduler` and two `dask worker --nworkers 1 --nthreads 1 --preload dask_oracle`
    processes on 127.0.0.1, all started in a folder of their own (workers-cwd)."""
    from distributed import Client

    root = tmp_path_factory.mktemp("dask")
    cwd, sfile, log = root / "workers-cwd", root / "scheduler.json", root / "dask.log"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")])}
    dask = [sys.executable, "-m", "dask"]
    procs: list[subprocess.Popen] = []
    client = None
    with log.open("w") as fh:
        def start(*args: str) -> subprocess.Popen:
            procs.append(subprocess.Popen([*dask, *args], cwd=cwd, env=env, stdout=fh,
                                          stderr=subprocess.STDOUT))
            return procs[-1]

        try:
            scheduler = start("scheduler", "--host", "127.0.0.1", "--port", "0",
                              "--no-dashboard", "--scheduler-file", str(sfile))
            address = _wait_for_scheduler_file(sfile, scheduler, log)
            worker = ["--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                      "--no-dashboard", "--preload", "dask_oracle"]
            start("worker", "--scheduler-file", str(sfile), *worker)
            start("worker", address, *worker)
            client = Client(address, set_as_default=False)
            client.wait_for_workers(2, timeout=90)
            yield Procs(address, sfile, cwd, client)
        finally:
            if client is not None:
                client.close()
            _stop(procs[1:])                        # the workers first, then the scheduler
            _stop(procs[:1])


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _stage_pid(out: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """The process that owns the first staging folder to appear in `out` (a worker mid-slide)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for p in out.glob(".usnet-tmp-*") if out.is_dir() else ():
            m = STAGE_RE.match(p.name)
            if m:
                return int(m.group(1))
        time.sleep(0.02)
    raise AssertionError(f"no slide started writing in {out}")


def _wait_for_journal(out: Path, names, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until each slide's resume journal holds a finished band of tiles."""
    deadline = time.monotonic() + timeout
    while not all(any((out / f".{n}.partial").glob("band-*.npz")) for n in names):
        assert time.monotonic() < deadline and proc.poll() is None, "no journal appeared"
        time.sleep(0.02)


@needs_distributed
def test_killed_worker_slide_runs_again_elsewhere(dask_procs, slides, reference, tmp_path):
    client = dask_procs.client
    worker_pids = set(client.run(os.getpid).values())
    client.run(dask_oracle.set_delay, 0.2)        # 15 batches of 2 tiles: about 3 s a slide
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "usnet_wsi", "segment", str(slides.a), str(slides.b), "-o",
           str(out), "--scheduler", dask_procs.address, "--batch-size", "2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = _stage_pid(out, proc)
        assert pid in worker_pids                    # a dask worker, mid-slide
        _wait_for_journal(out, ("a", "b"), proc)     # both slides have finished tile rows
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        client.run(dask_oracle.set_delay, 0)
    assert proc.returncode == 0, stderr
    assert [r["status"] for r in json.loads(stdout)["slides"]] == ["done", "done"]
    assert "was lost; the slide starts again on" in " ".join(stderr.split())
    assert_same_outputs(reference.out, out, ["a", "b"])
    assert not list(out.glob(".usnet-*"))           # the killed worker's staging folder too
    resumed = [json.loads((out / f"{n}.run.json").read_text())["counts"]["resumed_tiles"]
               for n in ("a", "b")]
    assert max(resumed) > 0                          # the killed slide resumed from its journal
    assert not list(out.glob(".*.partial"))


@needs_distributed
def test_scheduler_file_and_relative_paths_with_workers_in_another_folder(
        dask_procs, slides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = (os.path.relpath(p, tmp_path) for p in (slides.a, slides.b))
    res = run_cli(a, b, "-o", "out", "--scheduler-file", dask_procs.scheduler_file, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert [(r["path"], r["status"], r["nuclei"]) for r in summary["slides"]] == \
        [(a, "done", len(nuclei())), (b, "done", len(nuclei()))]
    assert summary["slides"][0]["outputs"][0] == os.path.join("out", "a.geojson")
    assert (tmp_path / "out" / "a.geojson").exists()
    assert not (dask_procs.workers_cwd / "out").exists()
    settings = json.loads((tmp_path / "out" / "b.run.json").read_text())["settings"]
    assert settings["scheduler"] == dask_procs.address


@needs_distributed
@pytest.mark.skipif(not os.path.isdir("/proc/self/cwd"), reason="needs Linux /proc")
def test_out_that_workers_cannot_reach_fails_each_slide_with_the_fix(
        dask_procs, slides, tmp_path, monkeypatch):
    """OUT is one absolute path that names a different folder in each process, as node-local
    storage does on a cluster: a link to /proc/self/cwd/out (the workers run elsewhere)."""
    (tmp_path / "out").mkdir()
    scratch = tmp_path / "scratch"
    scratch.symlink_to("/proc/self/cwd/out")
    monkeypatch.chdir(tmp_path)
    res = run_cli(slides.a, slides.b, "-o", scratch, "--scheduler", dask_procs.address,
                  "--json")
    assert res.exit_code == 1
    summary = json.loads(res.stdout)
    assert [r["status"] for r in summary["slides"]] == ["failed", "failed"]
    for r in summary["slides"]:
        assert f"output folder {scratch} is not reachable from worker tcp://127.0.0.1:" \
            in r["message"]
    text = err(res)
    assert "Traceback" not in res.stderr
    assert "fix: use a folder every worker can reach under the same path, e.g. on a shared " \
           "file system" in text
    assert list((tmp_path / "out").iterdir()) == []      # nothing written, probe removed
    assert not (dask_procs.workers_cwd / "out").exists()
