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
    canvas = np.zeros(n_tiles * size * size, np.int64)           # mask index + 1, 0 = free
    kept = np.zeros(n, bool)
    sel = masks.usable[masks.owner]
    owner, flat = masks.owner[sel], masks.flat[sel]
    wave = _waves(owner, flat, n)
    for w in range(int(wave.max(initial=-1)) + 1):
        in_wave = wave[owner] == w
        _paint_wave(owner[in_wave], flat[in_wave], masks.need, canvas, kept, (n_tiles, size))
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


def _paint_wave(owner: np.ndarray, flat: np.ndarray, need: np.ndarray, canvas: np.ndarray,
                kept: np.ndarray, shape: tuple[int, int]) -> None:
    """Paint the largest free part of each mask of one wave (masks do not overlap)."""
    free = canvas[flat] == 0
    owner, flat = owner[free], flat[free]
    if len(flat) == 0:
        return
    n_tiles, size = shape
    # one image of all tiles stacked, a blank row between tiles so parts never join across
    rows = (flat // size // size) * (size + 1) + (flat // size) % size
    cols = flat % size
    r0, r1 = rows.min(), rows.max() + 1
    ids = np.zeros((r1 - r0, size), np.int64)
    ids[rows - r0, cols] = owner + 1
    parts = label_parts(ids, background=0, connectivity=1)
    part = parts[rows - r0, cols]
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
