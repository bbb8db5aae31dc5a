"""An oracle Predictor: a stand-in for a perfect model on a synthetic slide.

It knows the slide's true nuclei (ellipses from `tests/synth.py`) and, for each tile, returns
the mask (tile frame, at model resolution) of every true nucleus that lies fully inside the
tile's read region, with a fixed per-nucleus score. Running it through the engine therefore
tests tiling + ownership + merge: every true nucleus must come back exactly once, whole.

The geometry here is written independently of `usnet_wsi.tiling` on purpose: the read box of
a tile (`Tile.read_l0`) and the tile side give the scale, and ellipses are rasterised with the
same skimage routine that painted them, so at scale 1 the masks equal the painted labels.
By default it also checks that the pixels it was given are dark under each mask (the engine
fed the right region), raising AssertionError otherwise.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
from skimage.draw import ellipse

from usnet_wsi.instances import InstanceBatch, TileInstances, paint_masks
from usnet_wsi.tiling import Tile

_CELL_L0 = 256   # spatial index cell side, level-0 px


class OraclePredictor:
    """Predictor protocol: name, sha256, device, tile_px, halo_px, mpp, predict()."""

    def __init__(self, nuclei: Sequence | np.ndarray, width_l0: int, height_l0: int,
                 mpp: float, tile_px: int = 300, halo_px: int = 32,
                 check_pixels: bool = True) -> None:
        """`nuclei`: SynthNucleus objects, or an (N, 5) array of cx, cy, rx, ry, angle_deg."""
        if isinstance(nuclei, np.ndarray):
            arr = np.asarray(nuclei, dtype=np.float64).reshape(-1, 5)
        else:
            arr = np.array([(n.cx, n.cy, n.rx, n.ry, n.angle_deg) for n in nuclei],
                           dtype=np.float64).reshape(-1, 5)
        self.cx, self.cy, self.rx, self.ry, self.angle = arr.T
        self.width_l0, self.height_l0 = int(width_l0), int(height_l0)
        self.tile_px, self.halo_px, self.mpp = int(tile_px), int(halo_px), float(mpp)
        self.name, self.device = "oracle", "cpu"
        self.sha256 = hashlib.sha256(arr.tobytes()).hexdigest()
        self.check_pixels = check_pixels
        self.calls = 0
        # half extents of each (rotated) ellipse, for the "fully inside" test and the index
        t = np.radians(self.angle)
        self.hx = np.hypot(self.rx * np.cos(t), self.ry * np.sin(t))
        self.hy = np.hypot(self.rx * np.sin(t), self.ry * np.cos(t))
        self._build_index()

    @classmethod
    def for_slide(cls, synth, mpp_model: float, tile_px: int, halo_px: int,
                  **kw) -> "OraclePredictor":
        """An oracle for a `tests.synth.SynthSlide`."""
        return cls(synth.nuclei, synth.width, synth.height, mpp_model, tile_px, halo_px, **kw)

    def _build_index(self) -> None:
        self._ncols = max(1, -(-self.width_l0 // _CELL_L0) + 2)
        gx = np.clip(np.floor(self.cx / _CELL_L0).astype(int) + 1, 0, self._ncols - 1)
        gy = np.floor(self.cy / _CELL_L0).astype(int) + 1
        cell = gy * self._ncols + gx
        self._order = np.argsort(cell, kind="stable")
        self._cells = cell[self._order]
        self._max_half = float(max(self.hx.max(initial=0), self.hy.max(initial=0)))

    def _near(self, box_l0: tuple[int, int, int, int]) -> np.ndarray:
        """Indices of nuclei whose centre lies within the box grown by the largest half-extent."""
        g = self._max_half + 1
        x0, y0, x1, y1 = box_l0[0] - g, box_l0[1] - g, box_l0[2] + g, box_l0[3] + g
        cx0 = max(0, math.floor(x0 / _CELL_L0) + 1)
        cx1 = min(self._ncols - 1, math.floor(x1 / _CELL_L0) + 1)
        out = []
        for gy in range(math.floor(y0 / _CELL_L0) + 1, math.floor(y1 / _CELL_L0) + 2):
            lo = np.searchsorted(self._cells, gy * self._ncols + cx0, side="left")
            hi = np.searchsorted(self._cells, gy * self._ncols + cx1, side="right")
            out.append(self._order[lo:hi])
        idx = np.sort(np.concatenate(out)) if out else np.zeros(0, int)
        return idx

    def score(self, i: int) -> float:
        """Deterministic, distinct-ish score of nucleus i in [0.5, 1)."""
        return 0.5 + 0.5 * ((i * 0.6180339887) % 1.0)

    def predict(self, tiles: np.ndarray, meta: Sequence[Tile] | None = None,
                regions: np.ndarray | None = None) -> InstanceBatch:
        if tiles.dtype != np.uint8 or tiles.shape[1:] != (self.tile_px, self.tile_px, 3):
            raise AssertionError(f"bad tile batch {tiles.dtype} {tiles.shape}")
        if meta is None or len(tiles) != len(meta):
            raise AssertionError(f"{len(tiles)} tiles but meta {meta!r}")
        if regions is not None and len(regions) != len(tiles):
            raise AssertionError(f"{len(tiles)} tiles but {len(regions)} regions")
        self.calls += 1
        return InstanceBatch.from_tiles([self._tile(rgb, t.read_l0) for rgb, t in zip(tiles, meta)])

    def _tile(self, rgb: np.ndarray, read_l0: tuple[int, int, int, int]) -> TileInstances:
        rx0, ry0, rx1, ry1 = read_l0
        s = (rx1 - rx0) / self.tile_px            # level-0 px per tile px
        masks, origins, scores = [], [], []
        for i in self._near(read_l0):
            found = self._mask(i, rx0, ry0, s)
            if found is None:
                continue
            mask, origin = found
            if self.check_pixels:
                self._check_dark(rgb, mask, origin, i, read_l0)
            masks.append(mask)
            origins.append(origin)
            scores.append(self.score(int(i)))
        return paint_masks(masks, origins, scores, self.tile_px)

    def _mask(self, i: int, rx0: int, ry0: int, s: float):
        """(bool mask, (x0, y0)) of nucleus i in the tile frame, or None if it is not fully
        inside the tile or has no pixel inside the slide."""
        # pixel-centre coordinates: l0 pixel c has its centre at c (skimage) = c + 0.5 (edges)
        cx_t = (self.cx[i] + 0.5 - rx0) / s - 0.5
        cy_t = (self.cy[i] + 0.5 - ry0) / s - 0.5
        rr, cc = ellipse(cy_t, cx_t, self.ry[i] / s, self.rx[i] / s,
                         rotation=math.radians(self.angle[i]))
        if len(rr) == 0 or rr.min() < 0 or cc.min() < 0 or rr.max() >= self.tile_px \
                or cc.max() >= self.tile_px:
            return None
        # keep the pixels whose sample point lies inside the slide
        x_l0 = rx0 + (cc + 0.5) * s
        y_l0 = ry0 + (rr + 0.5) * s
        inside = (x_l0 >= 0) & (x_l0 < self.width_l0) & (y_l0 >= 0) & (y_l0 < self.height_l0)
        rr, cc = rr[inside], cc[inside]
        if len(rr) == 0:
            return None
        r0, c0 = int(rr.min()), int(cc.min())
        mask = np.zeros((int(rr.max()) - r0 + 1, int(cc.max()) - c0 + 1), dtype=bool)
        mask[rr - r0, cc - c0] = True
        return mask, (c0, r0)

    def _check_dark(self, rgb: np.ndarray, mask: np.ndarray, origin: tuple[int, int],
                    i: int, read_l0: tuple[int, int, int, int]) -> None:
        x0, y0 = origin
        h, w = mask.shape
        green = rgb[y0:y0 + h, x0:x0 + w, 1][mask]
        # nuclei are painted with G ~ 42, tissue ~ 160, glass ~ 241; resampling blurs the rim
        dark = float(np.percentile(green, 25))
        if dark > 110:
            raise AssertionError(f"tile at {read_l0}: pixels under true nucleus {i} are not "
                                 f"nucleus-coloured (G 25th percentile {dark:.0f}): wrong region?")
