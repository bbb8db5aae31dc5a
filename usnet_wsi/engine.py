"""Streaming inference over a tile plan.

Three stages overlap: a pool of reader threads prefetches tile regions (a bounded window
ahead of the model), the calling thread runs the predictor on batches, and a pool of
post-processing threads turns each tile's masks into level-0 nuclei (owned filter, polygon,
Hematoxylin OD). Results are consumed in plan order, so the output does not depend on the
batch size or the number of workers; the Merger then removes cross-tile duplicates and
overlaps. Memory is bounded by the prefetch window and ~2 tile rows of nuclei in the Merger.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from usnet_wsi.console import Task
from usnet_wsi.geometry import mask_to_polygon, transform_polygon
from usnet_wsi.measure import hematoxylin_od_mean
from usnet_wsi.merge import Merger, Nucleus
from usnet_wsi.tiling import Tile, TilePlan, tile_to_l0

if TYPE_CHECKING:  # pragma: no cover - typing only; predict.py imports torch
    from usnet_wsi.predict import Predictor, TileNuclei

# A detection is kept by a tile when its centre lies in the core grown by this many tile
# pixels (inside the ROI). Neighbouring tiles resample the same nucleus on different pixel
# grids, so the centre they see differs by a fraction of a pixel; the slack makes sure
# that one of them always keeps it, and the Merger removes the copy kept by both.
OWNERSHIP_SLACK_TILE_PX = 1.0


class RegionReader(Protocol):
    def read_region(self, box_l0: tuple[int, int, int, int],
                    out_size: tuple[int, int]) -> np.ndarray: ...


@dataclass
class EngineSettings:
    """Streaming knobs: none of them changes the output."""

    batch_size: int = 8
    workers: int = 2
    prefetch_tiles: int = 18
    iou_threshold: float = 0.3


@dataclass
class StageTimes:
    """Seconds per stage (thread-safe). read/post are summed over their worker threads."""

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
    """One tile after post-processing: its owned nuclei (level 0) and how many it saw."""

    tile: Tile
    nuclei: list[Nucleus]
    n_detected: int


@dataclass
class EngineCounts:
    tiles: int = 0
    detected: int = 0          # all detections the model returned (before ownership)
    owned: int = 0             # detections kept by their owning tile (before merge)
    nuclei: int = 0            # final nuclei after merge
    merge: dict[str, int] = field(default_factory=dict)   # Merger statistics


def read_tiles(slide: RegionReader, plan: TilePlan, workers: int, window: int,
               times: StageTimes) -> Iterator[tuple[Tile, np.ndarray]]:
    """Yield (tile, uint8 RGB tile_px x tile_px) in plan order, read by `workers` threads
    at most `window` tiles ahead of the consumer."""
    size = (plan.tile_px, plan.tile_px)

    def read(tile: Tile) -> np.ndarray:
        t0 = time.perf_counter()
        rgb = slide.read_region(tile.read_l0, size)
        times.add("read", time.perf_counter() - t0)
        return rgb

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="usnet-read")
    pending: deque[tuple[Tile, Future]] = deque()
    try:
        for tile in plan.tiles:
            pending.append((tile, pool.submit(read, tile)))
            if len(pending) >= max(1, window):
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()
    finally:
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


def claimed(tile: Tile, plan: TilePlan, centres_l0: np.ndarray) -> np.ndarray:
    """bool (N,): centres inside the tile's core grown by the ownership slack, within the ROI."""
    xy = np.asarray(centres_l0, dtype=np.float64).reshape(-1, 2)
    slack = OWNERSHIP_SLACK_TILE_PX * plan.l0_per_tile_px
    x0, y0, x1, y1 = tile.core_l0
    rx0, ry0, rx1, ry1 = plan.roi_l0
    x0, y0 = max(x0 - slack, rx0), max(y0 - slack, ry0)
    x1, y1 = min(x1 + slack, rx1), min(y1 + slack, ry1)
    return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)


def _mask_centres_tile(masks: Sequence[np.ndarray], origins: np.ndarray) -> np.ndarray:
    """(N, 2) tile-frame centroids (pixel-edge frame: a pixel's centre is at +0.5)."""
    out = np.full((len(masks), 2), np.nan)
    for i, m in enumerate(masks):
        rows, cols = np.nonzero(m)
        if len(rows):
            out[i] = (origins[i][0] + cols.mean() + 0.5, origins[i][1] + rows.mean() + 0.5)
    return out


def _clip_to_tile(rgb: np.ndarray, mask: np.ndarray, origin: Sequence[int]
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(tile pixels under the mask, the mask, its origin), all clipped to the tile, so that
    polygons never leave the tile's read box."""
    x0, y0 = int(origin[0]), int(origin[1])
    h, w = mask.shape
    th, tw = rgb.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, tw), min(y0 + h, th)
    if cx1 <= cx0 or cy1 <= cy0:
        return rgb[:0, :0], mask[:0, :0], (cx0, cy0)
    return (rgb[cy0:cy1, cx0:cx1], mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], (cx0, cy0))


def tile_nuclei_l0(tile: Tile, plan: TilePlan, rgb: np.ndarray,
                   found: "TileNuclei") -> list[Nucleus]:
    """A tile's claimed detections as level-0 nuclei with their Hematoxylin OD mean."""
    masks = [np.asarray(m, dtype=bool) for m in found.masks]
    origins = np.asarray(found.origins, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(found.scores, dtype=np.float64).reshape(-1)
    if not (len(masks) == len(origins) == len(scores)):
        raise ValueError(f"tile {tile.index}: {len(masks)} masks, {len(origins)} origins, "
                         f"{len(scores)} scores")
    if not masks:
        return []
    centres_l0 = tile_to_l0(_mask_centres_tile(masks, origins), tile, plan)
    keep = claimed(tile, plan, centres_l0) & np.isfinite(centres_l0).all(axis=1)
    to_l0 = lambda xy: tile_to_l0(xy, tile, plan)  # noqa: E731
    out: list[Nucleus] = []
    for i in np.flatnonzero(keep):
        pixels, mask, origin = _clip_to_tile(rgb, masks[i], origins[i])
        poly_tile = mask_to_polygon(mask, origin_xy=origin) if mask.any() else None
        if poly_tile is None:
            continue
        od = hematoxylin_od_mean(pixels, mask)
        out.append(Nucleus(polygon_l0=transform_polygon(poly_tile, to_l0),
                           score=float(scores[i]), tile_index=tile.index, hematoxylin_od=od))
    return out


def _post(tile: Tile, plan: TilePlan, rgb: np.ndarray, found: "TileNuclei",
          times: StageTimes) -> TileResult:
    t0 = time.perf_counter()
    nuclei = tile_nuclei_l0(tile, plan, rgb, found)
    times.add("post", time.perf_counter() - t0)
    return TileResult(tile=tile, nuclei=nuclei, n_detected=len(found.masks))


def _predict(predictor: "Predictor", batch: list[tuple[Tile, np.ndarray]],
             times: StageTimes) -> list["TileNuclei"]:
    tiles = [t for t, _ in batch]
    images = np.stack([rgb for _, rgb in batch])
    t0 = time.perf_counter()
    found = predictor.predict(images, tiles)
    times.add("predict", time.perf_counter() - t0)
    if len(found) != len(tiles):
        raise RuntimeError(f"predictor returned {len(found)} results for {len(tiles)} tiles")
    return found


def tile_results(slide: RegionReader, plan: TilePlan, predictor: "Predictor",
                 settings: EngineSettings, times: StageTimes) -> Iterator[TileResult]:
    """Per-tile results in plan order; reading, model and post-processing overlap."""
    if (predictor.tile_px, predictor.halo_px) != (plan.tile_px, plan.halo_px):
        raise ValueError(f"plan tiles {plan.tile_px}/{plan.halo_px} px do not match the "
                         f"predictor's {predictor.tile_px}/{predictor.halo_px} px")
    post = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="usnet-post")
    pending: deque[Future] = deque()
    max_pending = 2 * settings.batch_size
    try:
        with closing(read_tiles(slide, plan, settings.workers, settings.prefetch_tiles,
                                times)) as tiles:
            for batch in batched(tiles, settings.batch_size):
                for (tile, rgb), found in zip(batch, _predict(predictor, batch, times)):
                    pending.append(post.submit(_post, tile, plan, rgb, found, times))
                while len(pending) > max_pending:
                    yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        post.shutdown(wait=True, cancel_futures=True)


@dataclass
class MergedStep:
    """Nuclei that became final after one tile (or the final flush), and a promise:
    no nucleus yielded later reaches above level-0 row `horizon_y_l0`."""

    nuclei: list[Nucleus]
    horizon_y_l0: float


def merged_nuclei(slide: RegionReader, plan: TilePlan, predictor: "Predictor",
                  settings: EngineSettings, task: Task | None = None,
                  times: StageTimes | None = None,
                  counts: EngineCounts | None = None) -> Iterator[MergedStep]:
    """Final nuclei of the plan (merged, non-overlapping) in a deterministic order.

    Progress: `task.advance(1, nuclei=...)` per tile. `times` and `counts` are filled in.
    """
    times = times if times is not None else StageTimes()
    counts = counts if counts is not None else EngineCounts()
    merger = Merger(plan, iou_threshold=settings.iou_threshold)
    row_top = {t.row: t.read_l0[1] for t in plan.tiles}
    with closing(tile_results(slide, plan, predictor, settings, times)) as results:
        for res in results:
            t0 = time.perf_counter()
            final = merger.add(res.tile, res.nuclei)
            times.add("merge", time.perf_counter() - t0)
            counts.tiles += 1
            counts.detected += res.n_detected
            counts.owned += len(res.nuclei)
            counts.nuclei += len(final)
            # later nuclei come from rows still pending in the merger or from this row onwards
            horizon = min(row_top[r] for r in merger.pending_rows + [res.tile.row])
            yield MergedStep(final, float(horizon))
            if task is not None:
                task.advance(1, nuclei=counts.nuclei)
    t0 = time.perf_counter()
    final = merger.flush()
    times.add("merge", time.perf_counter() - t0)
    counts.nuclei += len(final)
    counts.merge = asdict(merger.stats)
    yield MergedStep(final, math.inf)


def segment_nuclei(slide: RegionReader, plan: TilePlan, predictor: "Predictor",
                   settings: EngineSettings, times: StageTimes | None = None,
                   counts: EngineCounts | None = None) -> Iterator[Nucleus]:
    """The final nuclei only (see `merged_nuclei`)."""
    for step in merged_nuclei(slide, plan, predictor, settings, None, times, counts):
        yield from step.nuclei


def seconds_per_tile(predictor: "Predictor", batch_size: int, repeats: int = 1,
                     tiles: np.ndarray | None = None) -> float:
    """Measured predictor time per tile (detection, refinement and instance painting included):
    one warm-up batch, then `repeats`. `tiles` are real tissue tiles when given (realistic
    nucleus counts); otherwise blank tiles, which measure the network alone."""
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