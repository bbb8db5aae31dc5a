"""Box-shaped fragments: predicted nuclei with a straight side where their mask was cut off.

The refiner segments each detected nucleus inside an axis-aligned crop (the detected box grown by
`refine_context`). When the box is too small, the mask runs into the crop border and the nucleus
comes out as a piece with a straight, horizontal or vertical side, lying on the piece's own
bounding box (the whole mask is inside the crop). Round nuclei do not look like that: a rasterised
circle of radius r px has flat runs of only about 2 sqrt(r) px at its extremes.

Definition (`cut_sides`), for the exterior ring of one outline, in pixel coordinates:

- a *side* is a maximal run of consecutive ring vertices that all lie within `tol_px` of one line
  x = c or y = c, where c is the ring's minimum or maximum x (or y): a straight, axis-aligned
  stretch of outline on the bounding box (tolerating `tol_px` of wobble, i.e. after
  simplification with that tolerance);
- its length is the extent of those vertices along the line; its *turn* at an end is the angle
  asin(t / L) where t is how far from the line the outline has got after following it for
  L = `min_side_px` beyond that end. A straight cut at distance d from the centre of a disc of
  radius r crosses the outline at acos(d / r), so a cut through the middle half of a round
  nucleus turns by 60 degrees or more; a flat spot of a smooth outline leaves the line gently;
- it is a *cut side* when its length is at least `min_side_px` and at least `min_fraction` of the
  outline's bounding-box extent in the same direction, it turns by at least `min_turn_deg` at
  one end at least, and, when a `frame` (the image's x0, y0, x1, y1) is given, it does not lie
  within `FRAME_MARGIN_PX` of the frame's edge: a nucleus cut by the border of the image is cut
  in the ground truth too.

An outline with at least one cut side is a *box fragment* (`is_box_fragment`);
`count_box_fragments` counts them. `min_side_px(mpp)` scales the default length, 6 px at the
model's 0.25 um/px (1.5 um), to an image's resolution. With the defaults, a rasterised circle or
ellipse has no cut side, a disc cut by a straight line through its middle
half has one, a square has four, a square with well-rounded corners has none.

Hand-drawn annotations have some straight, sharply turning stretches too: run the same count on
the ground-truth outlines for the floor of this definition on a dataset.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from shapely.geometry import Polygon

from usnet_wsi.geometry import mask_to_polygon

MIN_SIDE_PX_AT_025 = 6.0     # px at 0.25 um/px (1.5 um)
MIN_SIDE_FRACTION = 0.5      # of the outline's extent along the side
STRAIGHT_TOL_PX = 0.5        # distance from the line a vertex may have and still be on it
FRAME_MARGIN_PX = 2.0        # a side this close to the image border is the border's cut
MIN_TURN_DEG = 60.0          # the outline leaves the side this steeply at one end at least

Outline = np.ndarray | Polygon   # (N, 2) x, y ring (closed or not), or a shapely Polygon
Frame = tuple[float, float, float, float]   # x0, y0, x1, y1


@dataclass(frozen=True)
class Side:
    """A straight axis-aligned stretch of outline: on the line x = at (axis 'x') or y = at."""

    axis: str
    at: float
    lo: float
    hi: float
    turn_deg: float = 90.0   # the larger of the two ends' turns

    @property
    def length(self) -> float:
        return self.hi - self.lo


def min_side_px(mpp: float) -> float:
    """The default minimum side length (1.5 um, 6 px at 0.25 um/px) in pixels at `mpp` um/px."""
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    return MIN_SIDE_PX_AT_025 * 0.25 / mpp


def exterior_xy(outline: Outline) -> np.ndarray:
    """(N, 2) float vertices of the exterior ring, without the closing repeat."""
    xy = np.asarray(outline.exterior.coords if isinstance(outline, Polygon) else outline, float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"an outline must be an (N, 2) array of x, y, got shape {xy.shape}")
    xy = xy[:, :2]
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    return xy


def _runs(near: np.ndarray) -> list[np.ndarray]:
    """Index arrays of maximal circular runs of True, each of at least two vertices."""
    n = len(near)
    if near.all():
        return [np.arange(n)]
    start = int(np.flatnonzero(~near)[0])          # rotate so the ring starts off the line
    order = np.roll(np.arange(n), -start)
    runs, current = [], []
    for i in order:
        if near[i]:
            current.append(i)
        else:
            if len(current) >= 2:
                runs.append(np.array(current))
            current = []
    if len(current) >= 2:
        runs.append(np.array(current))
    return runs


def _on_frame(axis: int, at: float, frame: Frame | None) -> bool:
    if frame is None:
        return False
    return min(abs(at - frame[axis]), abs(at - frame[axis + 2])) <= FRAME_MARGIN_PX


def _point_along(xy: np.ndarray, start: int, step: int, length: float) -> np.ndarray:
    """The point reached by following the ring from vertex `start` (direction `step` = +1 or
    -1) for `length`; the last vertex before coming back to `start` if the ring is shorter."""
    order = (start + step * np.arange(len(xy) + 1)) % len(xy)
    pts = xy[order]
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    k = int(np.searchsorted(cum, length))
    if k >= len(pts):
        return pts[-1]
    if k == 0:
        return pts[0]
    f = (length - cum[k - 1]) / seg[k - 1]
    return pts[k - 1] + f * (pts[k] - pts[k - 1])


def _turn_deg(xy: np.ndarray, run: np.ndarray, axis: int, at: float, reach: float) -> float:
    """The larger of the run's two end turns, in degrees (see the module docstring)."""
    turns = []
    for start, step in ((run[0], -1), (run[-1], 1)):
        t = abs(_point_along(xy, int(start), step, reach)[axis] - at)
        turns.append(float(np.degrees(np.arcsin(min(1.0, t / reach)))))
    return max(turns)


def _sides_on(xy: np.ndarray, axis: int, at: float, reach: float, tol_px: float) -> list[Side]:
    """Every straight run of the ring on the line (axis, at), with its length and turn."""
    along = xy[:, 1 - axis]
    return [Side("xy"[axis], at, float(along[run].min()), float(along[run].max()),
                 _turn_deg(xy, run, axis, at, reach))
            for run in _runs(np.abs(xy[:, axis] - at) <= tol_px)]


def cut_sides(outline: Outline, min_side_px: float, min_fraction: float = MIN_SIDE_FRACTION,
              tol_px: float = STRAIGHT_TOL_PX, frame: Frame | None = None,
              min_turn_deg: float = MIN_TURN_DEG) -> list[Side]:
    """The cut sides of one outline (see the module docstring for the definition)."""
    xy = exterior_xy(outline)
    if len(xy) < 3 or min_side_px <= 0:
        return []
    sides = []
    for axis in (0, 1):
        extent = float(np.ptp(xy[:, 1 - axis]))
        for at in dict.fromkeys((float(xy[:, axis].min()), float(xy[:, axis].max()))):
            if _on_frame(axis, at, frame):
                continue
            sides += [s for s in _sides_on(xy, axis, at, min_side_px, tol_px)
                      if s.length >= max(min_side_px, min_fraction * extent)
                      and s.turn_deg >= min_turn_deg]
    return sides


def is_box_fragment(outline: Outline, min_side_px: float, **kwargs) -> bool:
    """True when the outline has at least one cut side (keyword arguments as `cut_sides`)."""
    return bool(cut_sides(outline, min_side_px, **kwargs))


def count_box_fragments(outlines: Iterable[Outline], min_side_px: float, **kwargs) -> int:
    """How many outlines are box fragments (keyword arguments as `cut_sides`)."""
    return sum(is_box_fragment(o, min_side_px, **kwargs) for o in outlines)


def label_outlines(labels: np.ndarray) -> list[Polygon]:
    """The outline of every instance of a label image (0 = background), in pixel-edge
    coordinates of the image, traced as `segment` traces its masks (largest part, holes kept)."""
    outlines = []
    for value, box in enumerate(ndi.find_objects(np.asarray(labels)), start=1):
        if box is None:
            continue
        poly = mask_to_polygon(labels[box] == value, (box[1].start, box[0].start))
        if poly is not None:
            outlines.append(poly)
    return outlines
