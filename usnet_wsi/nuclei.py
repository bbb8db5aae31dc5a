"""Nuclei in level-0 coordinates, and the CPU stage that makes them from a tile's label map.

`tile_nuclei` is the CPU-bound half of the instance path: a tile's label map (from
`usnet_wsi.instances`) -> the nuclei the tile owns (centroid in its claimed box) -> outline
polygons in level-0 pixels -> hematoxylin OD mean. Centroids, ownership, stain means and the
outlines (`usnet_wsi.contours`) are computed for all nuclei of the tile at once. The module
imports no torch, so the engine can run it in light worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import Polygon

from usnet_wsi.contours import masks_to_polygons
from usnet_wsi.measure import hematoxylin_od
from usnet_wsi.painting import TileMasks

__all__ = ["Nucleus", "TileFrame", "masks_nuclei", "tile_nuclei"]


@dataclass
class Nucleus:
    """One nucleus in level-0 pixel coordinates, as owned by tile `tile_index`."""

    polygon_l0: Polygon
    score: float
    tile_index: int
    hematoxylin_od: float = math.nan

    @property
    def centroid_l0(self) -> tuple[float, float]:
        """(x, y) area centroid, level-0 pixels."""
        c = self.polygon_l0.centroid
        return (float(c.x), float(c.y))

    @property
    def bbox_l0(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) bounds, level-0 pixels."""
        return tuple(float(v) for v in self.polygon_l0.bounds)  # type: ignore[return-value]


@dataclass(frozen=True)
class TileFrame:
    """What the CPU stage needs to know of a tile: where its pixels lie in level 0 and which
    nucleus centres it keeps (small, so it travels cheaply to worker processes)."""

    index: int
    origin_l0: tuple[float, float]          # level-0 position of the tile's top-left corner
    l0_per_px: float                        # level-0 pixels per tile pixel
    claim_l0: tuple[float, float, float, float]   # half-open xyxy box of owned centres

    def to_l0(self, xy_tile: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy_tile, dtype=np.float64).reshape(-1, 2)
        return np.asarray(self.origin_l0) + xy * self.l0_per_px

    def claims(self, xy_l0: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = self.claim_l0
        x, y = xy_l0[:, 0], xy_l0[:, 1]
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def tile_nuclei(frame: TileFrame, rgb: np.ndarray, labels: np.ndarray,
                scores: np.ndarray) -> list[Nucleus]:
    """The nuclei a tile owns, from its label map (labels 1..n, `scores[k - 1]` for label k)
    and its RGB pixels, ordered by label."""
    n = len(scores)
    if n == 0:
        return []
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    area = np.bincount(lab, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(lab, weights=cols + 0.5, minlength=n + 1)[1:] / area
        cy = np.bincount(lab, weights=rows + 0.5, minlength=n + 1)[1:] / area
        od = np.bincount(lab, weights=hematoxylin_od(rgb[rows, cols]), minlength=n + 1)[1:] / area
    owned = (area > 0) & frame.claims(frame.to_l0(np.column_stack([cx, cy])))
    boxes = ndimage.find_objects(labels, max_label=n)
    keys = np.flatnonzero(owned)
    polys = masks_to_polygons(labels, boxes, keys, pixels=(rows, cols))
    traced = [i for i, p in enumerate(polys) if p is not None]
    if not traced:
        return []
    keys = keys[traced]
    corner = np.array([(boxes[k][1].start, boxes[k][0].start) for k in keys], np.float64)
    geoms = np.array([polys[i] for i in traced], dtype=object)
    _, at = shapely.get_coordinates(geoms, include_z=False, return_index=True)
    l0 = shapely.transform(geoms, lambda xy: frame.to_l0(xy + corner[at]))   # tile -> l0
    return [Nucleus(g, float(scores[k]), frame.index, float(od[k])) for g, k in zip(l0, keys)]


def masks_nuclei(frame: TileFrame, rgb: np.ndarray, masks: TileMasks) -> list[Nucleus]:
    """`tile_nuclei` of a tile whose masks are still to be painted (best score first)."""
    labels, scores = masks.paint()
    return tile_nuclei(frame, rgb, labels, scores)
