"""The end of a slide's run: tile results -> merged nuclei -> GeoJSON detections and the OME-Zarr
label image.

`NucleiSink` merges the tiles' nuclei in plan order (`usnet_wsi.engine.MergingStage`), numbers
the final nuclei in the order they come, measures them and hands them to the GeoJSON and
label-image writers. It runs off the main loop, in one of two ways that write the same files:

- `ThreadedSink`: in a thread of the calling process;
- `ProcessSink`: in a process of its own (machines with cores to spare, `--workers` 1 or more).
  Merging, measuring, serialising and rasterising then never hold the main process's GIL,
  which the main process needs to read tiles, feed the model and hand out the CPU stage: with
  a fast model (a GPU) that GIL, not the number of cores, sets the pace.

Either way the writers stage their output under temporary names: `close()` finishes them,
`abort()` removes them. An error in the sink is raised again in the caller at its next `put`
or at `close`. The module imports no torch (the process starts light).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import signal
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely import affinity

from usnet_wsi.children import exit_with_parent
from usnet_wsi.engine import MergedStep, MergingStage, TileResult
from usnet_wsi.measure import measurement_rows
from usnet_wsi.nuclei import Nucleus
from usnet_wsi.tiling import TilePlan
from usnet_wsi.writers.background import BackgroundWriter
from usnet_wsi.writers.geojson import GeoJSONWriter
from usnet_wsi.writers.zarr import LabelZarrWriter

__all__ = ["SinkSpec", "SinkSummary", "NucleiSink", "ThreadedSink", "ProcessSink", "open_sink"]

_QUEUE_ITEMS = 64          # tile results in flight to the sink (bounded memory)
_POLL_S = 0.5              # how often a waiting caller checks that the sink process lives
_ABORT_WAIT_S = 30.0       # how long `abort` waits for the sink process to clean up


@dataclass(frozen=True)
class SinkSpec:
    """What the sink merges and where it writes (picklable)."""

    plan: TilePlan
    iou_threshold: float                    # the merge's duplicate threshold
    geojson: Path
    geojson_gz: bool
    fingerprint: str
    zarr: Path
    width: int                              # level-0 slide size
    height: int
    mpp_x: float
    mpp_y: float
    source: dict[str, Any] = field(default_factory=dict)
    view_stretch: tuple[float, float] | None = None   # square-pixel view: x * fx, y * fy


@dataclass
class SinkSummary:
    """What the run record needs once the files are finished."""

    nuclei: int                # final nuclei after the merge
    merge: dict[str, int]      # the Merger's statistics
    written: int               # GeoJSON features
    skipped: int               # polygons degenerate after cleaning
    centroids: np.ndarray      # (N, 2) level-0 centroids, in id order
    merge_s: float             # time spent merging
    write_s: float             # time spent measuring and writing (without finishing)


class NucleiSink:
    """Merges tile results (in plan order), numbers the final nuclei (1, 2, ... in the order
    the merge emits them) and writes them."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.merging = MergingStage(spec.plan, spec.iou_threshold)
        self.geo = GeoJSONWriter(spec.geojson, spec.geojson_gz, spec.fingerprint)
        try:
            self.labels = LabelZarrWriter(spec.zarr, spec.width, spec.height, spec.mpp_x,
                                          spec.mpp_y, source=spec.source)
        except BaseException:
            self.geo.abort()
            raise
        self.label = 0
        self.write_s = 0.0
        self.centroids = array("d")

    def consume(self, result: TileResult) -> None:
        """The next tile's result in plan order."""
        self._write(self.merging.add(result))

    def _write(self, step: MergedStep) -> None:
        """Final nuclei, and the row above which all is final."""
        t0 = time.perf_counter()
        nuclei = [self._to_l0(n) for n in step.nuclei]
        polys = [n.polygon_l0 for n in nuclei]
        rows = measurement_rows(polys, [n.score for n in nuclei],
                                [n.hematoxylin_od for n in nuclei], self.spec.mpp_x,
                                self.spec.mpp_y)
        first = self.label + 1
        self.geo.write({"id": first + i, "polygon_l0": p, "score": n.score, "measurements": m}
                       for i, (p, n, m) in enumerate(zip(polys, nuclei, rows)))
        self.labels.add_many(range(first, first + len(nuclei)), polys, [n.score for n in nuclei])
        self.label += len(nuclei)
        if polys:
            xy = shapely.get_coordinates(shapely.centroid(np.asarray(polys, dtype=object)))
            self.centroids.extend(xy.ravel().tolist())
        if math.isfinite(step.horizon_y_l0):   # after the last step, close() finishes
            fy = self.spec.view_stretch[1] if self.spec.view_stretch else 1.0
            self.labels.complete_above(step.horizon_y_l0 / fy)
        self.write_s += time.perf_counter() - t0

    def _to_l0(self, nucleus: Nucleus) -> Nucleus:
        """A nucleus found in the square-pixel view, in level-0 pixels."""
        if self.spec.view_stretch is None:
            return nucleus
        fx, fy = self.spec.view_stretch
        poly = affinity.scale(nucleus.polygon_l0, 1 / fx, 1 / fy, origin=(0, 0))
        return Nucleus(polygon_l0=poly, score=nucleus.score, tile_index=nucleus.tile_index,
                       hematoxylin_od=nucleus.hematoxylin_od)

    def close(self) -> SinkSummary:
        """Merge and write the last nuclei and finish both files."""
        try:
            self._write(self.merging.flush())
            self.labels.close()
            self.geo.close()
        except BaseException:
            self.abort()
            raise
        xy = np.frombuffer(self.centroids, dtype=np.float64).reshape(-1, 2).copy()
        return SinkSummary(self.merging.nuclei, self.merging.stats, self.geo.n_written,
                           self.geo.n_skipped, xy, self.merging.seconds, self.write_s)

    def abort(self) -> None:
        """Remove what was written."""
        for writer in (self.geo, self.labels):
            writer.abort()


class ThreadedSink:
    """A NucleiSink fed through a bounded queue to one writer thread."""

    def __init__(self, spec: SinkSpec) -> None:
        self._sink = NucleiSink(spec)
        self._writer = BackgroundWriter(self._sink.consume, _QUEUE_ITEMS)

    def put(self, result: TileResult) -> None:
        self._writer.put(result)

    def close(self) -> SinkSummary:
        try:
            self._writer.close()
        except BaseException:
            self._sink.abort()
            raise
        return self._sink.close()

    def abort(self) -> None:
        self._writer.abort()
        self._sink.abort()


class ProcessSink:
    """A NucleiSink in a child process ('spawn': nothing of the caller's state is inherited),
    fed through a bounded queue. The process ends itself when its parent dies."""

    def __init__(self, spec: SinkSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._items = ctx.Queue(_QUEUE_ITEMS)
        self._replies = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_serve, name="usnet-write", daemon=True,
                                 args=(spec, self._items, self._replies, self._stop,
                                       os.getpid()))
        self._proc.start()
        self._ended = False

    def put(self, result: TileResult) -> None:
        """Queue one tile result (waits while the queue is full); raises the sink's error if
        any."""
        self._send(("tile", result))

    def close(self) -> SinkSummary:
        """Wait until every result is merged and written and both files are finished."""
        self._send(("close", None))
        kind, payload = self._reply(timeout=None)
        self._end()
        if kind != "done":
            raise payload if isinstance(payload, BaseException) else RuntimeError(kind)
        return payload

    def _send(self, item: tuple[str, Any]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._items.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        """Stop at once and remove what was written (errors ignored)."""
        if self._ended:
            return
        self._stop.set()
        try:
            self._items.put_nowait(("abort", None))
        except queue.Full:
            pass                    # the sink sees the stop flag before its next result
        try:
            self._reply(timeout=_ABORT_WAIT_S)
        except BaseException:  # noqa: BLE001 - aborting already; the first error is reported
            pass
        self._end()

    def _raise_if_failed(self) -> None:
        """Raise the sink's error if it has replied (it replies early only on an error) or
        died."""
        if self._replies.empty() and self._proc.is_alive():
            return
        kind, payload = self._reply(timeout=_POLL_S)
        self._end()
        raise payload if isinstance(payload, BaseException) else RuntimeError(kind)

    def _reply(self, timeout: float | None) -> tuple[str, Any]:
        """The sink's one reply: ("done", SinkSummary), ("aborted", None) or ("error", exc)."""
        waited = 0.0
        while True:
            alive = self._proc.is_alive()       # before the wait: a reply sent just before
            try:                                # the process ended is still read
                return self._replies.get(timeout=_POLL_S)
            except queue.Empty:
                waited += _POLL_S
                if not alive:
                    return "error", RuntimeError(f"the writer process stopped (exit code "
                                                 f"{self._proc.exitcode})")
                if timeout is not None and waited >= timeout:
                    return "error", TimeoutError("the writer process did not answer")

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._proc.join(timeout=_ABORT_WAIT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        for q in (self._items, self._replies):
            q.cancel_join_thread()
            q.close()


def _serve(spec: SinkSpec, items: Any, replies: Any, stop: Any, parent_pid: int) -> None:
    """The sink process: tile results in, one reply out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent decides on Ctrl-C
    exit_with_parent(parent_pid)
    try:
        sink = NucleiSink(spec)
    except BaseException as err:  # noqa: BLE001 - handed to the parent
        replies.put(("error", _portable(err)))
        return
    while True:
        kind, result = items.get()
        if kind == "abort" or stop.is_set():
            sink.abort()
            replies.put(("aborted", None))
            return
        try:
            if kind == "close":
                replies.put(("done", sink.close()))
                return
            sink.consume(result)
        except BaseException as err:  # noqa: BLE001 - handed to the parent
            sink.abort()
            replies.put(("error", _portable(err)))
            return


def _portable(err: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError that names it."""
    import pickle
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(err).__name__}: {err}")


def open_sink(spec: SinkSpec, own_process: bool) -> ThreadedSink | ProcessSink:
    """A sink in its own process where asked and allowed (a daemonic process, such as a dask
    worker, may not start one), else in a thread."""
    if own_process and not multiprocessing.current_process().daemon:
        return ProcessSink(spec)
    return ThreadedSink(spec)
