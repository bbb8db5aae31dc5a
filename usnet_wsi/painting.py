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

__all__ = ["MaskPixels", "paint_batch"]


@dataclass
class MaskPixels:
    """Masks of a batch as pixel lists. Masks are indexed best first (rank order)."""

    owner: np.ndarray     # (P,) int64: mask index of each pixel
    flat: np.ndarray      # (P,) int64: tile * S * S + y * S + x
    need: np.ndarray      # (N,) int64: pixels the kept part must have (>= 1)
    usable: np.ndarray    # (N,) bool: masks that may be painted at all
    tile: np.ndarray      # (N,) int64: tile of each mask


def paint_batch(masks: MaskPixels, n_tiles: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (labels, kept): int32 (n_tiles, size, size) label maps where the k-th kept mask
    of a tile (in rank order) is label k, and bool (N,) kept masks."""
    n = len(masks.need)
    canvas = np.zeros(n_tiles * size * size, np.int32)           # mask index + 1, 0 = free
    kept = np.zeros(n, bool)
    sel = masks.usable[masks.owner]
    owner, flat = masks.owner[sel], masks.flat[sel]
    wave = _waves(owner, flat, n)[owner]
    by_wave = np.argsort(wave, kind="stable")
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


def _pack_windows(owner: np.ndarray, row: np.ndarray, col: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Lay the bounding windows of the masks side by side on shelves of one small image (the
    labelling then covers the masks, not the tiles). Returns each pixel's row and column
    there, and the image's shape. A window is a translated copy of its mask, so raster order
    within a mask is kept; masks never join, as their pixels hold different ids."""
    uniq, inv = np.unique(owner, return_inverse=True)
    m = len(uniq)
    y0, x0 = np.full(m, row.max()), np.full(m, col.max())
    y1, x1 = np.zeros(m, row.dtype), np.zeros(m, col.dtype)
    np.minimum.at(y0, inv, row)
    np.minimum.at(x0, inv, col)
    np.maximum.at(y1, inv, row)
    np.maximum.at(x1, inv, col)
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
    rows, cols, shape2d = _pack_windows(owner, flat // shape[1], flat % shape[1])
    ids = np.zeros(shape2d, np.int32)
    ids[rows, cols] = owner + 1
    part = label_parts(ids, background=0, connectivity=1)[rows, cols]
    part_size = np.bincount(part)
    part_owner = np.zeros(len(part_size), np.int64)
    part_owner[part] = owner
    # per mask its largest part; ties go to the part met first in raster order (lowest id)
    cand = np.unique(part)
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
