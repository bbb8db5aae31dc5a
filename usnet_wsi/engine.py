"""Streaming inference over a tile plan.

Stages overlap, each where its kind of work runs best:

- reader threads prefetch tile regions (OpenSlide and JPEG decoding release the GIL), a bounded
  window ahead of the model;
- a device thread runs the predictor on batches, one batch ahead of the calling thread: the
  network and the batched instance step on the device, one compact result per batch back to
  the host (each tile's masks, unpainted, from a predictor that can leave the painting to the
  CPU stage; label maps + scores from others);
- `workers` processes run the CPU stage (`usnet_wsi.nuclei`: painting where it was left to
  it, ownership, outlines, stain) of earlier batches while the device works on the next one
  (0 runs it in the calling thread, still off the device thread);
- results come back in plan order (`journaled_results`); the Merger (`MergingStage`) removes
  cross-tile duplicates and overlaps, here (`merged_nuclei`) or in `segment`'s writer
  (`usnet_wsi.writers.sink`).

The output does not depend on the batch size or the number of workers. Memory is bounded by the
prefetch window, the batches in flight and about two tile rows of nuclei in the Merger.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from usnet_wsi.children import exit_with_parent
from usnet_wsi.merge import Merger
from usnet_wsi.nuclei import Nucleus, TileFrame, masks_nuclei, tile_nuclei
from usnet_wsi.painting import UnpaintedBatch
from usnet_wsi.tiling import Tile, TilePlan, claim_box_l0, claim_box_tile

if TYPE_CHECKING:  # pragma: no cover - typing only; predict.py imports torch
    from usnet_wsi.instances import InstanceBatch
    from usnet_wsi.predict import Predictor

READ_THREADS = 2


class RegionReader(Protocol):
    def read_region(self, box_l0: tuple[int, int, int, int],
                    out_size: tuple[int, int]) -> np.ndarray: ...


@dataclass
class EngineSettings:
    """Streaming knobs: none of them changes the output."""

    batch_size: int = 8
    workers: int = 0             # CPU-stage worker processes; 0 = in the calling thread
    prefetch_tiles: int = 18
    iou_threshold: float = 0.3


@dataclass
class StageTimes:
    """Seconds per stage (thread-safe). `read` is summed over the reader threads; `post` is
    the calling thread's time in the CPU stage: handing work to the workers and waiting for
    them (all of the CPU stage when workers = 0)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


@dataclass
class TileResult:
    """One tile after the CPU stage: its owned nuclei (level 0) and how many it detected."""

    tile: Tile
    nuclei: list[Nucleus]
    n_detected: int


@dataclass
class EngineCounts:
    tiles: int = 0
    detected: int = 0          # detections after NMS (before ownership)
    owned: int = 0             # nuclei kept by their owning tile (before merge)
    nuclei: int = 0            # final nuclei after merge
    resumed: int = 0           # tiles taken from a resume journal instead of the model
    merge: dict[str, int] = field(default_factory=dict)   # Merger statistics

    def add(self, res: TileResult) -> None:
        """Count one tile's result (before merging)."""
        self.tiles += 1
        self.detected += res.n_detected
        self.owned += len(res.nuclei)


def read_tiles(slide: RegionReader, plan: TilePlan, workers: int, window: int,
               times: StageTimes, start: int = 0) -> Iterator[tuple[Tile, np.ndarray]]:
    """Yield (tile, uint8 RGB tile_px x tile_px) in plan order from tile `start` on, read by
    `workers` threads at most `window` tiles ahead of the consumer."""
    size = (plan.tile_px, plan.tile_px)

    def read(tile: Tile) -> np.ndarray:
        t0 = time.perf_counter()
        rgb = slide.read_region(tile.read_l0, size)
        times.add("read", time.perf_counter() - t0)
        return rgb

    yield from ahead_of_use(plan.tiles[start:], read, window, workers, "usnet-read")


def ahead_of_use(items: Iterable[Any], fn: Callable[[Any], Any], depth: int, threads: int,
                 name: str) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) in the items' order; fn runs in `threads` threads named `name`, at
    most `depth` items ahead of the consumer. The threads stop when the consumer does."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    pending: deque[tuple[Any, Future]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max(1, depth):
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tile_frame(tile: Tile, plan: TilePlan) -> TileFrame:
    """The CPU stage's view of a tile (see `usnet_wsi.nuclei.TileFrame`)."""
    return TileFrame(index=tile.index, origin_l0=(float(tile.read_l0[0]), float(tile.read_l0[1])),
                     l0_per_px=plan.l0_per_tile_px, claim_l0=claim_box_l0(tile, plan))


# ----------------------------------------------------------------------------- CPU stage pool

class _Inline(Executor):
    """Runs submitted work at once in the calling thread (workers = 0)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(err)
        return fut


_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def cpu_pool(workers: int) -> Executor:
    """The shared pool of `workers` CPU-stage processes (started once, reused across slides;
    'spawn' so that no torch or reader-thread state is inherited). Workers end themselves when
    the main process dies (even by SIGKILL), so no orphan outlives a killed run."""
    if workers <= 0:
        return _Inline()
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            ctx = multiprocessing.get_context("spawn")
            pool = _POOLS[workers] = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),))
        return pool


def _drop_pool(workers: int) -> None:
    """Forget a pool whose process died, so the next call starts a fresh one."""
    with _POOLS_LOCK:
        pool = _POOLS.pop(workers, None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _shutdown_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.shutdown(wait=False, cancel_futures=True)
        _POOLS.clear()


# ----------------------------------------------------------------------------- streaming

def _predict(predictor: "Predictor", batch: list[tuple[Tile, np.ndarray]], plan: TilePlan,
             times: StageTimes) -> "InstanceBatch | UnpaintedBatch":
    """The predictor on one batch; a predictor that can leaves the painting of the masks to
    the CPU stage (off the device thread, whose pace sets the run's)."""
    images = np.stack([rgb for _, rgb in batch])
    regions = np.array([claim_box_tile(t, plan) for t, _ in batch], dtype=np.float32)
    meta = [t for t, _ in batch]
    t0 = time.perf_counter()
    if getattr(predictor, "defers_painting", False):
        found = predictor.predict(images, meta, regions, paint=False)  # type: ignore[call-arg]
    else:
        found = predictor.predict(images, meta, regions)
    times.add("predict", time.perf_counter() - t0)
    if len(found) != len(batch):
        raise RuntimeError(f"predictor returned {len(found)} results for {len(batch)} tiles")
    return found


def _submit_batch(pool: Executor, batch: list[tuple[Tile, np.ndarray]],
                  found: "InstanceBatch | UnpaintedBatch", plan: TilePlan,
                  times: StageTimes) -> list[tuple[Tile, int, Future]]:
    out = []
    t0 = time.perf_counter()
    detected = found.detected
    for i, (tile, rgb) in enumerate(batch):
        frame = tile_frame(tile, plan)
        if isinstance(found, UnpaintedBatch):
            fut = pool.submit(masks_nuclei, frame, rgb, found.tiles[i])
        else:
            n = int(found.counts[i])
            fut = pool.submit(tile_nuclei, frame, rgb, found.labels[i], found.scores[i, :n])
        out.append((tile, int(detected[i]), fut))
    times.add("post", time.perf_counter() - t0)   # all of the CPU stage when it runs inline
    return out


def _result(item: tuple[Tile, int, Future], times: StageTimes) -> TileResult:
    tile, detected, fut = item
    t0 = time.perf_counter()
    nuclei = fut.result()
    times.add("post", time.perf_counter() - t0)
    return TileResult(tile=tile, nuclei=nuclei, n_detected=detected)


def predicted_batches(tiles: Iterable[tuple[Tile, np.ndarray]], predictor: "Predictor",
                      plan: TilePlan, settings: EngineSettings, times: StageTimes
                      ) -> Iterator[tuple[list[tuple[Tile, np.ndarray]], Any]]:
    """(batch, the predictor's result) in order. The predictor runs in a device thread one
    batch ahead, so the model works on the next batch while the calling thread hands this
    one to the CPU stage."""
    def predict(batch: list[tuple[Tile, np.ndarray]]) -> Any:
        return _predict(predictor, batch, plan, times)

    yield from ahead_of_use(batched(tiles, settings.batch_size), predict, 2, 1, "usnet-device")


def tile_results(slide: RegionReader, plan: TilePlan, predictor: "Predictor",
                 settings: EngineSettings, times: StageTimes,
                 start: int = 0) -> Iterator[TileResult]:
    """Per-tile results in plan order from tile `start` on; reading, model and CPU stage
    overlap."""
    if (predictor.tile_px, predictor.halo_px) != (plan.tile_px, plan.halo_px):
        raise ValueError(f"plan tiles {plan.tile_px}/{plan.halo_px} px do not match the "
                         f"predictor's {predictor.tile_px}/{predictor.halo_px} px")
    pool = cpu_pool(settings.workers) if plan.tiles[start:] else _Inline()
    pending: deque[tuple[Tile, int, Future]] = deque()
    max_pending = 2 * settings.batch_size + max(settings.workers, 1)
    try:
        with closing(read_tiles(slide, plan, READ_THREADS, settings.prefetch_tiles,
                                times, start)) as tiles, \
                closing(predicted_batches(tiles, predictor, plan, settings, times)) as batches:
            for batch, found in batches:
                pending.extend(_submit_batch(pool, batch, found, plan, times))
                while len(pending) > max_pending or (pending and pending[0][2].done()):
                    yield _result(pending.popleft(), times)
        while pending:
            yield _result(pending.popleft(), times)
    except BaseException as err:
        for _, _, fut in pending:
            fut.cancel()
        if isinstance(err, BrokenProcessPool):
            _drop_pool(settings.workers)
        raise


@dataclass
class MergedStep:
    """Nuclei that became final after one tile (or the final flush), and a promise:
    no nucleus yielded later reaches above level-0 row `horizon_y_l0`."""

    nuclei: list[Nucleus]
    horizon_y_l0: float


class Journal(Protocol):
    """Where a run keeps its finished tiles so that a re-run can continue (see
    `usnet_wsi.journal`): `done` are the results of the plan's first tiles from an earlier
    run, `record` keeps each new result."""

    done: list[TileResult]

    def record(self, result: TileResult) -> None: ...


def journaled_results(slide: RegionReader, plan: TilePlan, predictor: "Predictor",
                      settings: EngineSettings, times: StageTimes,
                      journal: Journal | None) -> Iterator[TileResult]:
    """Per-tile results in plan order: the journal's first, then the model's for the remaining
    tiles (each recorded in the journal)."""
    done = journal.done if journal is not None else []
    yield from done
    with closing(tile_results(slide, plan, predictor, settings, times, len(done))) as results:
        for res in results:
            if journal is not None:
                t0 = time.perf_counter()
                journal.record(res)
                times.add("journal", time.perf_counter() - t0)
            yield res


class MergingStage:
    """Tile results in plan order -> merged steps: the Merger, and after each tile the row
    above which every nucleus is final. Counts the final nuclei and the seconds spent."""

    def __init__(self, plan: TilePlan, iou_threshold: float) -> None:
        self.merger = Merger(plan, iou_threshold=iou_threshold)
        self.row_top = {t.row: t.read_l0[1] for t in plan.tiles}
        self.nuclei = 0
        self.seconds = 0.0

    def add(self, res: TileResult) -> MergedStep:
        t0 = time.perf_counter()
        final = self.merger.add(res.tile, res.nuclei)
        self.nuclei += len(final)
        # later nuclei come from rows still pending in the merger or from this row onwards
        horizon = min(self.row_top[r] for r in self.merger.pending_rows + [res.tile.row])
        self.seconds += time.perf_counter() - t0
        return MergedStep(final, float(horizon))

    def flush(self) -> MergedStep:
        t0 = time.perf_counter()
        final = self.merger.flush()
        self.nuclei += len(final)
        self.seconds += time.perf_counter() - t0
        return MergedStep(final, math.inf)

    @property
    def stats(self) -> dict[str, int]:
        return asdict(self.merger.stats)


def merged_nuclei(slide: RegionReader, plan: TilePlan, predictor: "Predictor",
                  settings: EngineSettings, times: StageTimes | None = None,
                  counts: EngineCounts | None = None) -> Iterator[MergedStep]:
    """Final nuclei of the plan (merged, non-overlapping) in a deterministic order, merged in
    the calling thread (`segment` merges in its writer instead: `usnet_wsi.writers.sink`).
    `times` and `counts` are filled in."""
    times = times if times is not None else StageTimes()
    counts = counts if counts is not None else EngineCounts()
    merging = MergingStage(plan, settings.iou_threshold)
    try:
        with closing(tile_results(slide, plan, predictor, settings, times)) as results:
            for res in results:
                step = merging.add(res)
                counts.add(res)
                counts.nuclei = merging.nuclei
                yield step
        step = merging.flush()
        counts.nuclei, counts.merge = merging.nuclei, merging.stats
        yield step
    finally:
        times.add("merge", merging.seconds)


def segment_nuclei(slide: RegionReader, plan: TilePlan, predictor: "Predictor",
                   settings: EngineSettings, times: StageTimes | None = None,
                   counts: EngineCounts | None = None) -> Iterator[Nucleus]:
    """The final nuclei only (see `merged_nuclei`)."""
    for step in merged_nuclei(slide, plan, predictor, settings, times, counts):
        yield from step.nuclei


def seconds_per_tile(predictor: "Predictor", batch_size: int, repeats: int = 1,
                     tiles: np.ndarray | None = None) -> float:
    """Measured predictor time per tile (network and instance step): one warm-up batch, then
    `repeats`. `tiles` are real tissue tiles when given (realistic nucleus counts); otherwise
    blank tiles, which measure the network alone."""
    size = predictor.tile_px
    if tiles is None:
        tiles = np.full((batch_size, size, size, 3), 240, np.uint8)
    meta = [Tile(index=i, row=0, col=i, core_l0=(0, 0, size, size), read_l0=(0, 0, size, size))
            for i in range(len(tiles))]
    predictor.predict(tiles, meta)
    t0 = time.perf_counter()
    for _ in range(max(1, repeats)):
        predictor.predict(tiles, meta)
    return (time.perf_counter() - t0) / (max(1, repeats) * len(tiles))
