"""Score-ordered painting of a batch of nucleus masks into one label map per tile (numpy).

The rule, as if the masks were painted one after the other, best score first: a mask keeps the
pixels no better mask has taken; of those it keeps its largest 4-connected part (the rest stays
free for worse masks), and it is dropped when that part has fewer than `need` pixels.

Done for the whole batch in a few vectorised waves instead of one mask at a time: a mask's
wave is one more than the deepest better mask it overlaps, so the masks of one wave never
overlap each other and everything they depend on is painted in earlier waves. Each wave takes
one connected-component labelling of all its free pixels (`skimage.measure.label`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label as label_parts

__all__ = ["MaskPixels", "TileMasks", "UnpaintedBatch", "paint_batch", "split_by_tile"]


@dataclass
class MaskPixels:
    """Masks of a batch as pixel lists. Masks are indexed best first (rank order)."""

    owner: np.ndarray     # (P,) int64: mask index of each pixel
    flat: np.ndarray      # (P,) int64: tile * S * S + y * S + x
    need: np.ndarray      # (N,) int64: pixels the kept part must have (>= 1)
    usable: np.ndarray    # (N,) bool: masks that may be painted at all
    tile: np.ndarray      # (N,) int64: tile of each mask


@dataclass
class TileMasks:
    """One tile's masks, best first, not yet painted: what the CPU stage paints (masks of
    different tiles never meet, so painting tile by tile gives the batch's label maps)."""

    pixels: MaskPixels    # flat = y * S + x; tile all 0
    scores: np.ndarray    # (N,) float32, score of each mask
    size: int             # S
    detected: int = 0     # detections after NMS, before ownership filtering

    def paint(self) -> tuple[np.ndarray, np.ndarray]:
        """(int32 (S, S) label map, float32 scores of its labels 1..n)."""
        labels, kept = paint_batch(self.pixels, 1, self.size)
        return labels[0], self.scores[kept]


@dataclass
class UnpaintedBatch:
    """A predictor's result for a batch, each tile's masks still to be painted."""

    tiles: list[TileMasks]

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def detected(self) -> np.ndarray:
        return np.array([t.detected for t in self.tiles], np.int64)


def split_by_tile(masks: MaskPixels, scores: np.ndarray, detected: np.ndarray,
                  size: int) -> list[TileMasks]:
    """A batch's masks (indexed best first within each tile, tiles in order) -> one TileMasks
    per tile, mask indices and flat pixel indices made local to the tile."""
    n_tiles = len(detected)
    first = np.searchsorted(masks.tile, np.arange(n_tiles + 1))        # masks come by tile
    pixel_tile = masks.tile[masks.owner]
    order = np.argsort(pixel_tile, kind="stable")
    bounds = np.searchsorted(pixel_tile[order], np.arange(n_tiles + 1))
    out = []
    for i in range(n_tiles):
        a, b = first[i], first[i + 1]
        px = order[bounds[i]:bounds[i + 1]]
        local = MaskPixels(masks.owner[px] - a, masks.flat[px] - i * size * size,
                           masks.need[a:b], masks.usable[a:b], np.zeros(b - a, np.int64))
        out.append(TileMasks(local, scores[a:b], size, int(detected[i])))
    return out


def paint_batch(masks: MaskPixels, n_tiles: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (labels, kept): int32 (n_tiles, size, size) label maps where the k-th kept mask
    of a tile (in rank order) is label k, and bool (N,) kept masks."""
    n = len(masks.need)
    canvas = np.zeros(n_tiles * size * size, np.int32)           # mask index + 1, 0 = free
    kept = np.zeros(n, bool)
    sel = masks.usable[masks.owner]
    owner, flat = masks.owner[sel], masks.flat[sel]
    wave = _waves(owner, flat, n)[owner]
    by_wave = np.argsort(wave.astype(np.int16) if n < 2 ** 15 else wave,
                         kind="stable")                  # small integers: a radix sort
    bounds = np.searchsorted(wave[by_wave], np.arange(int(wave.max(initial=-1)) + 2))
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = by_wave[a:b]
        _paint_wave(owner[idx], flat[idx], masks.need, canvas, kept, (n_tiles, size))
    local = np.zeros(n + 1, np.int32)
    idx = np.flatnonzero(kept)
    per_tile = np.bincount(masks.tile[idx], minlength=n_tiles)
    start = np.cumsum(per_tile) - per_tile
    local[idx + 1] = np.arange(len(idx)) - start[masks.tile[idx]] + 1
    return local[canvas].reshape(n_tiles, size, size), kept


def _waves(owner: np.ndarray, flat: np.ndarray, n: int) -> np.ndarray:
    """(N,) wave of each mask: 0 if no better mask overlaps it, else 1 + the largest wave of
    the better masks it overlaps."""
    wave = np.zeros(n, np.int64)
    if len(flat) == 0:
        return wave
    key = np.sort(flat * n + owner)                  # by pixel, then by mask
    f, o = key // n, key % n
    same = f[1:] == f[:-1]                          # consecutive owners of one pixel
    pairs = np.unique(o[:-1][same] * n + o[1:][same])
    better, worse = pairs // n, pairs % n
    for _ in range(n + 1):
        new = wave.copy()
        np.maximum.at(new, worse, wave[better] + 1)
        if np.array_equal(new, wave):
            break
        wave = new
    return wave


def _dense_ids(values: np.ndarray) -> np.ndarray:
    """`np.unique(values, return_inverse=True)[1]` for small non-negative integers, in linear
    time: the rank of each value among the distinct values."""
    present = np.zeros(int(values.max()) + 1, bool)
    present[values] = True
    return (np.cumsum(present) - 1)[values]


def _group_ranges(ids: np.ndarray, m: int, *values: np.ndarray
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(min, max) of each of `values` per id 0..m-1 (every id present). Pixels come grouped
    by mask, so one reduceat over the runs does it; otherwise they are grouped first."""
    starts = np.flatnonzero(np.diff(ids)) + 1
    if len(starts) + 1 != m:                      # an id in more than one run
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], tuple(v[order] for v in values)
        starts = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], starts])
    run_id = ids[starts]
    out = []
    for v in values:
        lo, hi = np.empty(m, v.dtype), np.empty(m, v.dtype)
        lo[run_id], hi[run_id] = np.minimum.reduceat(v, starts), np.maximum.reduceat(v, starts)
        out.append((lo, hi))
    return out


def _pack_windows(owner: np.ndarray, row: np.ndarray, col: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Lay the bounding windows of the masks side by side on shelves of one small image (the
    labelling then covers the masks, not the tiles). Returns each pixel's row and column
    there, and the image's shape. A window is a translated copy of its mask, so raster order
    within a mask is kept; masks never join, as their pixels hold different ids."""
    inv = _dense_ids(owner)
    m = int(inv.max()) + 1
    (y0, y1), (x0, x1) = _group_ranges(inv, m, row, col)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    order = np.argsort(-h, kind="stable")                   # tallest first: tight shelves
    width = max(int(np.sqrt((h * w).sum())) + 1, 64)
    start = np.cumsum(w[order]) - w[order]
    shelf = start // width
    first = np.ones(m, bool)
    first[1:] = shelf[1:] != shelf[:-1]
    shelf_h = h[order][first]                                # its first window is its tallest
    oy, ox = np.zeros(m, np.int64), np.zeros(m, np.int64)
    oy[order] = (np.cumsum(shelf_h) - shelf_h)[np.cumsum(first) - 1]
    ox[order] = start - shelf * width
    shape = (int(shelf_h.sum()), width + int(w.max()))
    return oy[inv] + row - y0[inv], ox[inv] + col - x0[inv], shape


def _paint_wave(owner: np.ndarray, flat: np.ndarray, need: np.ndarray, canvas: np.ndarray,
                kept: np.ndarray, shape: tuple[int, int]) -> None:
    """Paint the largest free part of each mask of one wave (masks do not overlap)."""
    free = canvas[flat] == 0
    owner, flat = owner[free], flat[free]
    if len(flat) == 0:
        return
    rows, cols, shape2d = _pack_windows(owner, *np.divmod(flat, shape[1]))
    ids = np.zeros(shape2d, np.int32)
    ids[rows, cols] = owner + 1
    part = label_parts(ids, background=0, connectivity=1)[rows, cols]
    part_size = np.bincount(part)
    part_owner = np.zeros(len(part_size), np.int64)
    part_owner[part] = owner
    # per mask its largest part; ties go to the part met first in raster order (lowest id)
    cand = np.arange(1, len(part_size))          # every part has a pixel here: ids 1..K
    order = np.lexsort((cand, -part_size[cand], part_owner[cand]))
    first = np.ones(len(order), bool)
    first[1:] = part_owner[cand[order]][1:] != part_owner[cand[order]][:-1]
    best = cand[order][first]
    best = best[part_size[best] >= need[part_owner[best]]]
    chosen = np.zeros(len(part_size), bool)
    chosen[best] = True
    paint = chosen[part]
    canvas[flat[paint]] = owner[paint] + 1
    kept[part_owner[best]] = True
