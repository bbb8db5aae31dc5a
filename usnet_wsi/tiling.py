"""Tile geometry: plan tiles over a region of interest, own nuclei, convert coordinate frames.

Pure integer geometry, no I/O. This is the ONLY module that converts between frames:

- `_l0`: level-0 slide pixels;
- `_tile`: pixels of one model input tile (`tile_px` x `tile_px`), whose top-left corner is
  the top-left corner of the tile's read box and whose scale is `plan.l0_per_tile_px`.

Each tile has a *core* (half-open box; the cores of the full grid partition the ROI exactly,
the last row/column clipped at the ROI edge) and a *read box* = the core's top-left grown by the
halo, all read boxes the same size (`read_size_l0`). A detection belongs to the one tile whose
core holds its centre (`owned`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from usnet_wsi.errors import UsageError

Box = tuple[int, int, int, int]

# A tile keeps a nucleus whose centre lies in its core grown by this many tile pixels (inside
# the ROI). Neighbouring tiles resample the same nucleus on different pixel grids, so the centre
# they see differs by a fraction of a pixel; the slack makes sure that one of them always keeps
# it, and the Merger removes the copy kept by both.
OWNERSHIP_SLACK_TILE_PX = 1.0


@dataclass(frozen=True)
class Tile:
    """One tile. `index` is its position in `TilePlan.tiles`; row/col locate it in the grid."""

    index: int
    row: int
    col: int
    core_l0: Box   # x0, y0, x1, y1 half-open; cores partition the ROI
    read_l0: Box   # (core x0, y0) - halo, side read_size_l0; the same size for every tile


@dataclass(frozen=True)
class TilePlan:
    """The tiles to run over a ROI (only tissue tiles kept) and the grid they come from."""

    tiles: tuple[Tile, ...]
    roi_l0: Box
    tile_px: int
    halo_px: int
    read_size_l0: int
    halo_l0: int
    core_size_l0: int
    n_rows: int
    n_cols: int

    @property
    def l0_per_tile_px(self) -> float:
        """Level-0 pixels per tile pixel (read box side / model tile side)."""
        return self.read_size_l0 / self.tile_px

    @property
    def n_grid(self) -> int:
        """Number of tiles in the full grid, before dropping non-tissue tiles."""
        return self.n_rows * self.n_cols


def roi_from_xywh(box_xywh: tuple[int, int, int, int] | None, width_l0: int,
                  height_l0: int, option: str = "--roi") -> Box:
    """Level-0 xyxy ROI from a user (x, y, w, h) box clipped to the slide; whole slide if None.

    UsageError if the box lies entirely outside the slide.
    """
    if box_xywh is None:
        return (0, 0, int(width_l0), int(height_l0))
    x, y, w, h = (int(v) for v in box_xywh)
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(int(width_l0), x + w), min(int(height_l0), y + h)
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"{option} {x},{y},{w},{h} lies outside the slide "
                         f"({width_l0} x {height_l0} level-0 pixels)",
                         f"give a box inside 0,0,{width_l0},{height_l0} (X,Y,W,H)")
    return (x0, y0, x1, y1)


def _check_plan_args(roi_l0: Box, mpp_l0: float, mpp_model: float, tile_px: int,
                     halo_px: int) -> None:
    x0, y0, x1, y1 = roi_l0
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"empty region of interest {roi_l0} (x0, y0, x1, y1)",
                         "give a box with x1 > x0 and y1 > y0")
    for name, v in (("slide mpp", mpp_l0), ("model mpp", mpp_model)):
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"{name} {v!r} must be a finite number > 0", "check --mpp")
    if tile_px < 1 or halo_px < 0 or 2 * halo_px >= tile_px:
        raise UsageError(f"tile of {tile_px} px with a halo of {halo_px} px leaves no core",
                         "use a halo smaller than half the tile side")


def plan_tiles(roi_l0: Box, mpp_l0: float, mpp_model: float, tile_px: int = 300,
               halo_px: int = 32, tissue: np.ndarray | None = None,
               tissue_scale: float = 1.0) -> TilePlan:
    """Plan tiles covering `roi_l0` (level-0 xyxy) for a model working at `mpp_model`.

    read_size_l0 = round(tile_px * mpp_model / mpp_l0), halo_l0 likewise from halo_px, and
    core_size_l0 = read_size_l0 - 2 * halo_l0. If `tissue` (bool mask, `tissue_scale` mask px
    per level-0 px) is given, tiles whose core touches no tissue (dilated by the halo) are
    dropped. UsageError if the settings leave no core, or shrink a non-zero halo to 0 px.
    """
    roi_l0 = tuple(int(v) for v in roi_l0)  # type: ignore[assignment]
    _check_plan_args(roi_l0, mpp_l0, mpp_model, tile_px, halo_px)
    read = max(1, round(tile_px * mpp_model / mpp_l0))
    halo = round(halo_px * read / tile_px)
    core = read - 2 * halo
    if core < 1 or (halo_px > 0 and halo < 1):
        raise UsageError(f"at {mpp_l0:g} um/px a {tile_px} px tile reads only {read} level-0 px, "
                         f"too few for a {halo_px} px halo around a core",
                         "check --mpp, or use a slide scanned at a finer resolution")
    x0, y0, x1, y1 = roi_l0
    n_cols, n_rows = -(-(x1 - x0) // core), -(-(y1 - y0) // core)
    cores = [(r, c, _core(roi_l0, core, r, c)) for r in range(n_rows) for c in range(n_cols)]
    if tissue is not None:
        keep = _touches_tissue([b for _, _, b in cores], tissue, tissue_scale, halo)
        cores = [rc for rc, k in zip(cores, keep) if k]
    tiles = tuple(
        Tile(index=i, row=r, col=c, core_l0=b,
             read_l0=(b[0] - halo, b[1] - halo, b[0] - halo + read, b[1] - halo + read))
        for i, (r, c, b) in enumerate(cores)
    )
    return TilePlan(tiles=tiles, roi_l0=roi_l0, tile_px=int(tile_px), halo_px=int(halo_px),
                    read_size_l0=read, halo_l0=halo, core_size_l0=core,
                    n_rows=n_rows, n_cols=n_cols)


def _core(roi_l0: Box, core: int, row: int, col: int) -> Box:
    x0, y0 = roi_l0[0] + col * core, roi_l0[1] + row * core
    return (x0, y0, min(x0 + core, roi_l0[2]), min(y0 + core, roi_l0[3]))


def _touches_tissue(cores: list[Box], tissue: np.ndarray, scale: float,
                    halo_l0: int) -> np.ndarray:
    """bool per core: does the core overlap the tissue mask dilated by the halo?"""
    mask = np.asarray(tissue, dtype=bool)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"tissue_scale must be > 0, got {scale!r}")
    if not cores:
        return np.zeros(0, dtype=bool)
    r = math.ceil(halo_l0 * scale) + 1   # +1: thumbnail pixels straddle core edges
    grown = ndimage.maximum_filter(mask.view(np.uint8), size=2 * r + 1, mode="constant") > 0
    sat = np.zeros((grown.shape[0] + 1, grown.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = grown.cumsum(0).cumsum(1)
    b = np.asarray(cores, dtype=np.float64) * scale
    h, w = grown.shape
    cx0 = np.clip(np.floor(b[:, 0]), 0, w).astype(int)
    cy0 = np.clip(np.floor(b[:, 1]), 0, h).astype(int)
    cx1 = np.clip(np.ceil(b[:, 2]), 0, w).astype(int)
    cy1 = np.clip(np.ceil(b[:, 3]), 0, h).astype(int)
    total = sat[cy1, cx1] - sat[cy0, cx1] - sat[cy1, cx0] + sat[cy0, cx0]
    return total > 0


def tile_to_l0(xy_tile: np.ndarray, tile: Tile, plan: TilePlan) -> np.ndarray:
    """(N, 2) tile-frame (x, y) -> (N, 2) float level-0 (x, y). Pixel edges map to edges."""
    xy = np.asarray(xy_tile, dtype=np.float64).reshape(-1, 2)
    origin = np.array(tile.read_l0[:2], dtype=np.float64)
    return origin + xy * plan.l0_per_tile_px


def l0_to_tile(xy_l0: np.ndarray, tile: Tile, plan: TilePlan) -> np.ndarray:
    """(N, 2) level-0 (x, y) -> (N, 2) float tile-frame (x, y); inverse of `tile_to_l0`."""
    xy = np.asarray(xy_l0, dtype=np.float64).reshape(-1, 2)
    origin = np.array(tile.read_l0[:2], dtype=np.float64)
    return (xy - origin) / plan.l0_per_tile_px


def owned(tile: Tile, xy_l0: np.ndarray) -> np.ndarray:
    """bool (N,): is each level-0 centre inside the tile's half-open core?"""
    xy = np.asarray(xy_l0, dtype=np.float64).reshape(-1, 2)
    x0, y0, x1, y1 = tile.core_l0
    return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)


def claim_box_l0(tile: Tile, plan: TilePlan) -> tuple[float, float, float, float]:
    """Half-open level-0 box of the nucleus centres `tile` keeps: its core grown by the
    ownership slack, clipped to the ROI."""
    slack = OWNERSHIP_SLACK_TILE_PX * plan.l0_per_tile_px
    x0, y0, x1, y1 = tile.core_l0
    rx0, ry0, rx1, ry1 = plan.roi_l0
    return (max(x0 - slack, rx0), max(y0 - slack, ry0), min(x1 + slack, rx1),
            min(y1 + slack, ry1))


def claim_box_tile(tile: Tile, plan: TilePlan) -> tuple[float, float, float, float]:
    """`claim_box_l0` in the tile frame (model pixels)."""
    b = claim_box_l0(tile, plan)
    (x0, y0), (x1, y1) = l0_to_tile(np.array([b[:2], b[2:]]), tile, plan)
    return (float(x0), float(y0), float(x1), float(y1))


def claimed(tile: Tile, plan: TilePlan, centres_l0: np.ndarray) -> np.ndarray:
    """bool (N,): centres inside the tile's claim box (`claim_box_l0`)."""
    xy = np.asarray(centres_l0, dtype=np.float64).reshape(-1, 2)
    x0, y0, x1, y1 = claim_box_l0(tile, plan)
    return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
