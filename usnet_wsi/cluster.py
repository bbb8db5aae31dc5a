"""`segment` on an existing dask.distributed cluster: each slide is one task.

A thin executor around `runner.run_one`, the same per-slide unit the local loop runs, so a slide
gives the same outputs and the same summary row wherever it runs:

- the client connects to the scheduler, writes a probe file with a random token into OUTDIR and
  submits one task per slide (`pure=False`: a slide is never taken from a cache);
- on a worker the task checks that it sees the slide and the probe (OUTDIR must be a folder
  every worker reaches, e.g. on a shared file system), then runs `run_one` with the model the
  worker keeps loaded between slides (`cached_model`);
- messages and tile progress of a slide travel to the client as dask events (topic per run),
  where the client's Reporter shows them with the slides done and running and tiles/s;
- a worker that dies mid-slide is replaced by the scheduler, which runs the task again on another
  worker (up to dask's `distributed.scheduler.allowed-failures`), through `run_one` again.

dask.distributed is imported only here, and only when a cluster is used.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import CancelledError
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from usnet_wsi import __version__
from usnet_wsi.config import SegmentConfig, check_scheduler, default_workers
from usnet_wsi.console import Reporter, Task
from usnet_wsi.errors import ClusterError, InputError, OutputError, UsageError
from usnet_wsi.runner import LazyPredictor, PlannedSlide, failed_result, load_model, run_one

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client, Future

    from usnet_wsi.pipeline import SlideResult
    from usnet_wsi.predict import Predictor

SHARED_FOLDER_FIX = "use a folder every worker can reach under the same path, e.g. on a shared " \
                    "file system"
_TILE_EVENT_EVERY_S = 1.0     # a worker reports a slide's tile progress at most this often
_LATE_EVENTS_WAIT_S = 5.0     # after the last slide, wait this long for its last messages
_MODELS_KEPT = 2              # models a worker keeps loaded (most recently used)


@dataclass(frozen=True)
class SlideJob:
    """One slide task: its place in the run, its path as given and as workers open it, and
    whether the client could see it (then a worker that cannot is told so)."""

    index: int
    path: str
    where: str
    seen_here: bool


@dataclass(frozen=True)
class RunContext:
    """What every task of one run shares."""

    topic: str                    # dask event topic of the run
    probe: str                    # name of the probe file in OUTDIR
    token: str                    # its content
    version: str                  # the client's usnet-wsi version
    verbose: int
    cpu_workers: int | None       # --workers as given; None: each worker's own default


@dataclass
class TaskOutcome:
    """What a task returns: the slide's row, or the error that stops the run (the model could
    not be loaded)."""

    row: "SlideResult | None" = None
    fatal: BaseException | None = None
    worker: str = ""


# ------------------------------------------------------------------------------ client side


def read_scheduler_file(path: Path) -> str:
    """The scheduler address in a scheduler file (`dask scheduler --scheduler-file PATH`,
    dask-jobqueue, ...); UsageError when the file is missing or holds no address."""
    fix = "give the file the scheduler wrote (dask scheduler --scheduler-file PATH), or " \
          "its address with --scheduler tcp://HOST:PORT"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--scheduler-file {path}: no such file", fix) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--scheduler-file {path} is not a readable scheduler file ({err})",
                         fix) from None
    address = data.get("address") if isinstance(data, dict) else None
    if not isinstance(address, str):
        raise UsageError(f"--scheduler-file {path} holds no scheduler address", fix)
    try:
        return check_scheduler(address) or address
    except UsageError:
        raise UsageError(f"--scheduler-file {path} holds {address!r}, not a dask scheduler "
                         "address", fix) from None


def connect(address: str, verbose: int = 1) -> "Client":
    """A client of the scheduler at `address`; ClusterError when it cannot be reached within
    dask's connect timeout (distributed.comm.timeouts.connect). dask's own log lines are
    shown with -v only: errors reach the user as usnet-wsi messages."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs dask.distributed, which is not installed",
                         "pip install 'distributed>=2024.1'") from None
    if verbose < 2:
        _quiet_dask_logs()
    try:
        return Client(address, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise ClusterError(f"cannot reach the dask scheduler at {address}: {err}",
                           "start one with `dask scheduler` and workers with `dask worker "
                           "ADDRESS`, or check the address and that this machine can reach "
                           "it") from None


def _quiet_dask_logs() -> None:
    """Only critical log lines from dask.distributed in this process (it configures its
    loggers with levels of their own)."""
    names = [n for n in logging.root.manager.loggerDict
             if n == "distributed" or n.startswith("distributed.")]
    for name in names + ["distributed"]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def run_on_cluster(planned: list[PlannedSlide], cfg: SegmentConfig, reporter: Reporter,
                   verbose: int, cpu_workers: int | None) -> list["SlideResult"]:
    """Run each slide as one task on the cluster at cfg.scheduler; rows in the order given."""
    from usnet_wsi.outputs import clean_stale

    client = connect(str(cfg.scheduler), verbose)
    try:
        _describe(client, cfg, len(planned), reporter)
        shared = shared_config(cfg)
        with probe_file(shared.out_dir) as (probe, token):
            ctx = RunContext(topic=f"usnet-wsi-{token[:16]}", probe=probe, token=token,
                             version=__version__, verbose=verbose, cpu_workers=cpu_workers)
            rows = _Collector(client, ctx, reporter).run(planned, shared)
    finally:
        client.close()
    removed = clean_stale(cfg.out_dir)
    if removed:
        reporter.info(f"removed {len(removed)} temporary file(s) left in {cfg.out_dir} by "
                      "workers that were killed")
    return [_as_given(row, p, cfg.out_dir) for row, p in zip(rows, planned)]


def _describe(client: "Client", cfg: SegmentConfig, n_slides: int, reporter: Reporter) -> None:
    threads = client.nthreads()
    if threads:
        reporter.info(f"dask scheduler {cfg.scheduler}: {len(threads)} worker(s), "
                      f"{sum(threads.values())} thread(s); {n_slides} slide(s)")
    else:
        reporter.info(f"dask scheduler {cfg.scheduler} has no workers yet; the "
                      f"{n_slides} slide(s) wait until one joins")


def shared_config(cfg: SegmentConfig) -> SegmentConfig:
    """cfg with OUTDIR and --weights as absolute paths: workers may run in other folders (a
    shipped bundle's name stays a name)."""
    weights = cfg.weights
    if weights is not None and (weights.exists() or len(weights.parts) > 1):
        weights = Path(os.path.abspath(weights))
    return replace(cfg, out_dir=Path(os.path.abspath(cfg.out_dir)), weights=weights)


@contextmanager
def probe_file(out_dir: Path) -> Iterator[tuple[str, str]]:
    """A hidden file with a random token in OUTDIR for the run's tasks to look for; yields its
    name and token. Removed at the end (a killed client's is removed by the next run)."""
    from usnet_wsi.outputs import remove_tree
    from usnet_wsi.writers.atomic import temp_name

    token = uuid.uuid4().hex
    path = Path(out_dir) / temp_name("usnet-probe")
    try:
        path.write_text(token, encoding="utf-8")
    except OSError as err:
        raise OutputError(f"cannot write to output folder {out_dir}: {err.strerror or err}",
                          "choose a folder you can write to with -o") from None
    try:
        yield path.name, token
    finally:
        remove_tree(path)


def _as_given(row: "SlideResult", planned: PlannedSlide, out_dir: Path) -> "SlideResult":
    """A worker's row with the slide and output paths as the user gave them."""
    return replace(row, path=planned.path,
                   outputs=[str(Path(out_dir) / Path(o).name) for o in row.outputs])


class _Collector:
    """Submits the slides, shows their messages and progress, gathers their rows.

    Events and finished tasks arrive from dask's threads into one queue; everything is shown
    from the calling thread."""

    def __init__(self, client: "Client", ctx: RunContext, reporter: Reporter) -> None:
        self.client, self.ctx, self.reporter = client, ctx, reporter
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.running: dict[int, str] = {}      # slide index -> worker address
        self.finished: set[int] = set()
        self.ended: set[int] = set()           # slides whose task sent its last event
        self.names: dict[int, str] = {}
        self.tiles, self.t0 = 0, time.monotonic()

    def run(self, planned: list[PlannedSlide], cfg: SegmentConfig) -> list["SlideResult"]:
        rows: dict[int, SlideResult] = {}
        for i, p in enumerate(planned):
            self.names[i] = p.name
            if p.refused is not None:
                rows[i] = failed_result(p.path, p.name, p.refused, self.reporter,
                                        self.ctx.verbose)
        self.client.subscribe_topic(self.ctx.topic, lambda ev: self.inbox.put(("event", ev[1])))
        futures: dict[Future, int] = {}
        try:
            futures = self._submit(planned, rows, cfg)
            with self.reporter.task("slides", total=len(futures)) as task:
                rows.update(self._gather(futures, planned, task))
        except KeyboardInterrupt:
            if self.running:
                self.reporter.info(f"{len(self.running)} slide(s) already running on workers "
                                   "finish there (their outputs appear whole or not at all); "
                                   "the others are cancelled")
            raise
        finally:
            self.client.cancel([f for f in futures if not f.done()])
            self.client.unsubscribe_topic(self.ctx.topic)
        return [rows[i] for i in range(len(planned))]

    def _submit(self, planned: list[PlannedSlide], rows: dict[int, Any],
                cfg: SegmentConfig) -> dict["Future", int]:
        futures = {}
        for i, p in enumerate(planned):
            if i in rows:
                continue
            where = os.path.abspath(p.path)
            job = SlideJob(i, p.path, where, os.path.exists(where))
            fut = self.client.submit(run_task, job, cfg, self.ctx, pure=False,
                                     key=f"usnet-wsi-{p.name}-{uuid.uuid4().hex[:12]}")
            futures[fut] = i
        for fut in futures:
            fut.add_done_callback(lambda f: self.inbox.put(("done", f)))
        return futures

    def _gather(self, futures: dict["Future", int], planned: list[PlannedSlide],
                task: Task) -> dict[int, "SlideResult"]:
        rows: dict[int, SlideResult] = {}
        deadline = None if futures else time.monotonic()
        while deadline is None or (time.monotonic() < deadline and self._awaiting(rows)):
            try:
                kind, item = self.inbox.get(timeout=0.5)
            except queue.Empty:
                task.advance(0, **self._fields())
                continue
            if kind == "event":
                self._on_event(item, task)
                continue
            i = futures[item]
            rows[i] = self._row(item, i, planned[i])
            self.finished.add(i)
            self.running.pop(i, None)
            task.advance(1, **self._fields())
            if len(rows) == len(futures):
                deadline = time.monotonic() + _LATE_EVENTS_WAIT_S
        return rows

    def _awaiting(self, rows: dict[int, Any]) -> bool:
        """Slides whose task finished but whose last messages have not arrived yet."""
        return any(i not in self.ended for i in rows)

    def _fields(self) -> dict[str, Any]:
        rate = self.tiles / max(time.monotonic() - self.t0, 1e-9)
        return {"running": len(self.running), "tiles": self.tiles, "tiles/s": f"{rate:.1f}"}

    def _row(self, future: "Future", i: int, planned: PlannedSlide) -> "SlideResult":
        """The slide's row; a task that failed as a whole (its workers died, the scheduler was
        lost) is a failed row, a model that could not be loaded stops the run."""
        try:
            outcome: TaskOutcome = future.result()
        except Exception as err:  # noqa: BLE001 - the slide fails, the others go on
            self.ended.add(i)                        # no last event will come
            return failed_result(planned.path, planned.name, _task_failure(err, planned),
                                 self.reporter, self.ctx.verbose)
        if outcome.fatal is not None:
            self.reporter.info(f"{planned.name}: worker {outcome.worker} could not load the "
                               "model; stopping")
            raise outcome.fatal
        assert outcome.row is not None
        return outcome.row

    def _on_event(self, msg: dict[str, Any], task: Task) -> None:
        i, kind = msg.get("slide"), msg.get("kind")
        if kind == "start":
            self._on_start(i, str(msg.get("worker")))
        elif kind == "end":
            self.ended.add(i)
        elif kind == "tiles":
            self.tiles += int(msg.get("n", 0))
            task.advance(0, **self._fields())
        elif kind == "error":
            self.reporter.error(msg.get("message", ""), msg.get("hint", ""),
                                msg.get("detail", ""))
        elif kind in ("info", "warn", "debug"):
            getattr(self.reporter, kind)(str(msg.get("text", "")))

    def _on_start(self, i: Any, worker: str) -> None:
        if i in self.finished:
            return
        name = self.names.get(i, str(i))
        if i in self.running:
            self.reporter.info(f"{name}: worker {self.running[i]} was lost; the slide starts "
                               f"again on {worker}")
        else:
            self.reporter.debug(f"{name}: running on {worker}")
        self.running[i] = worker


def _task_failure(err: BaseException, planned: PlannedSlide) -> BaseException:
    """A clearer error for a task that failed on the cluster as a whole."""
    if type(err).__name__ == "KilledWorker":
        return ClusterError(f"{planned.path}: every worker that ran it died ({err})",
                            "give the workers more memory, or segment this slide without "
                            "--scheduler to see why")
    if isinstance(err, CancelledError):
        reason = getattr(err, "reason", "cancelled")
        return ClusterError(f"{planned.path}: the cluster dropped the slide ({reason})",
                            "run the same command again once the scheduler is back; slides "
                            "whose outputs are complete are skipped")
    return err


# ------------------------------------------------------------------------------ worker side

_MODELS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_DAEMON_WARNED: set[str] = set()


def cached_model(cfg: SegmentConfig, reporter: Reporter) -> "Predictor":
    """This worker's model for cfg, loaded once and kept between slides (per weights bundle
    and its contents, device, tile size, precision and test-time augmentation)."""
    from usnet_wsi.pipeline import weights_id

    key = (None if cfg.weights is None else str(cfg.weights), weights_id(cfg.weights),
           cfg.device, cfg.tile_px, cfg.precision, cfg.tta)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = load_model(cfg, reporter, where=f" (worker {cfg.worker})")
            _warn_if_one_thread(model, cfg, reporter)
            _MODELS[key] = model
            while len(_MODELS) > _MODELS_KEPT:
                _MODELS.popitem(last=False)
        _MODELS.move_to_end(key)
        return model


def _warn_if_one_thread(model: "Predictor", cfg: SegmentConfig, reporter: Reporter) -> None:
    """dask starts workers with OMP_NUM_THREADS=1: on a CPU the model would use one core."""
    torch = sys.modules.get("torch")
    cores = os.cpu_count() or 1
    if torch is None or not str(model.device).startswith("cpu") or cores < 2 \
            or torch.get_num_threads() > 1:
        return
    reporter.warn(f"worker {cfg.worker} runs the model on its CPU with 1 thread (dask gives "
                  "workers OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1); start CPU workers with both "
                  f"set to their share of the {cores} cores, e.g. OMP_NUM_THREADS={cores} "
                  f"MKL_NUM_THREADS={cores} dask worker ... --nworkers 1")


def run_task(job: SlideJob, cfg: SegmentConfig, ctx: RunContext) -> TaskOutcome:
    """On a worker: one slide through `run_one`, its messages and progress sent to the client."""
    from distributed import get_worker

    worker = get_worker()
    send = _sender(worker, ctx.topic, job.index)
    reporter = ForwardingReporter(send, ctx.verbose)
    send("start", worker=worker.address)
    try:
        cfg = replace(cfg, worker=worker.address,
                      workers=_cpu_stage_workers(ctx, worker.address, reporter))
        model = LazyPredictor(cfg, reporter, load=cached_model)
        try:
            row = run_one(job.where, cfg, model, reporter, ctx.verbose,
                          check=lambda: check_reach(job, cfg, ctx))
        except Exception as err:
            if err is not model.error:
                raise
            return TaskOutcome(fatal=err, worker=worker.address)
        return TaskOutcome(row=row, worker=worker.address)
    finally:
        send("end")


def _sender(worker: Any, topic: str, index: int) -> Callable[..., None]:
    def send(kind: str, **fields: Any) -> None:
        worker.log_event(topic, {"slide": index, "kind": kind, **fields})

    return send


def _cpu_stage_workers(ctx: RunContext, address: str, reporter: Reporter) -> int:
    """--workers on this worker: as given, else this machine's default; 0 in a daemonic dask
    worker process (dask's default), which may not start processes of its own."""
    if not multiprocessing.current_process().daemon:
        return default_workers() if ctx.cpu_workers is None else ctx.cpu_workers
    if ctx.cpu_workers and ctx.topic not in _DAEMON_WARNED:
        _DAEMON_WARNED.add(ctx.topic)
        reporter.warn(f"worker {address} is a daemon process and cannot start the --workers "
                      f"{ctx.cpu_workers} CPU-stage processes; that stage runs in the worker "
                      "itself (start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False to "
                      "allow them)")
    return 0


def check_reach(job: SlideJob, cfg: SegmentConfig, ctx: RunContext) -> None:
    """Refuse the slide on this worker when it runs another usnet-wsi than the client, or
    cannot see the slide or OUTDIR the client sees."""
    if ctx.version != __version__:
        raise ClusterError(f"worker {cfg.worker} runs usnet-wsi {__version__}, the client "
                           f"{ctx.version}", "install the same usnet-wsi on every worker")
    if job.seen_here and not os.path.exists(job.where):
        raise InputError(f"{job.where} is not reachable from worker {cfg.worker}",
                         "put the slides in a folder every worker can reach under the same "
                         "path, e.g. on a shared file system")
    if not _sees_probe(cfg.out_dir / ctx.probe, ctx.token):
        raise OutputError(f"output folder {cfg.out_dir} is not reachable from worker "
                          f"{cfg.worker} (it does not see the probe file written there)",
                          SHARED_FOLDER_FIX)


def _sees_probe(path: Path, token: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == token
    except (OSError, UnicodeDecodeError):
        return False


class ForwardingReporter(Reporter):
    """A worker's Reporter for one slide: messages and tile progress become events for the
    client (nothing is printed on the worker)."""

    def __init__(self, send: Callable[..., None], verbosity: int) -> None:
        super().__init__(verbosity=verbosity, style="none")
        self.send = send

    def info(self, msg: str) -> None:
        if self.verbosity >= 1:
            self.send("info", text=msg)

    def warn(self, msg: str) -> None:
        self.send("warn", text=msg)

    def debug(self, msg: str) -> None:
        if self.verbosity >= 2:
            self.send("debug", text=msg)

    def error(self, msg: str, hint: str = "", detail: str = "") -> None:
        self.send("error", message=msg, hint=hint, detail=detail)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        t = _TileCounter(self.send)
        try:
            yield t
        finally:
            t.flush()


class _TileCounter:
    """Counts a slide's tiles and sends them on at most every _TILE_EVENT_EVERY_S."""

    def __init__(self, send: Callable[..., None]) -> None:
        self.send, self.pending, self.last = send, 0, time.monotonic()

    def advance(self, n: int = 1, **fields: object) -> None:
        self.pending += n
        if time.monotonic() - self.last >= _TILE_EVENT_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.send("tiles", n=self.pending)
        self.pending, self.last = 0, time.monotonic()
