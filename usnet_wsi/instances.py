"""US-Net raw outputs of a batch of tiles -> non-overlapping nucleus masks per tile.

Per tile: detection boxes (threshold, top-k, decode, NMS) -> refinement of each box (crop of the
scaled box resampled to 48x48 -> mask) -> in the default recipe, segmentation components that no
refined mask covers are refined too (rescued) -> masks painted in score order so that no two
overlap; a mask that loses most of its area to better-scored ones is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from usnet_wsi.decode import detect_boxes
from usnet_wsi.model.bundle import Thresholds
from usnet_wsi.model.refine import context_boxes, crop_resize, paste_mask
from usnet_wsi.model.usnet import USNet, USNetOutput


@dataclass
class TileNuclei:
    """One tile's nuclei in the tile (model-pixel) frame."""

    masks: list[np.ndarray]     # bool (h, w) per nucleus
    origins: np.ndarray         # (N, 2) int: (x0, y0) of each mask's top-left in tile px
    scores: np.ndarray          # (N,) float32

    def __len__(self) -> int:
        return len(self.masks)


def refine_boxes(model: USNet, refine_input: torch.Tensor, boxes: list[torch.Tensor]
                 ) -> list[list[tuple[tuple[int, int, int, int], torch.Tensor]]]:
    """Run the refiner on every box of every image; returns per image [(crop, bool mask)]."""
    spec = model.spec
    size = refine_input.shape[-1]
    crops = [context_boxes(b, spec.refine_context, size) for b in boxes]
    bidx = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(crops)])
    allc = torch.cat(crops) if crops else torch.zeros((0, 4))
    logits = model.refiner(crop_resize(refine_input, bidx.to(refine_input.device),
                                       allc.to(refine_input.device), spec.refine_size))[:, 0]
    out: list[list] = [[] for _ in boxes]
    for j in range(allc.shape[0]):
        crop = tuple(int(v) for v in allc[j].tolist())
        out[int(bidx[j])].append((crop, paste_mask(logits[j].float(), crop).cpu()))
    return out


def _rescue_boxes(interior: np.ndarray, covered: np.ndarray, thr: Thresholds) -> torch.Tensor:
    """Boxes of segmentation components (interior prob > threshold) no mask covers."""
    lab, n = ndimage.label(interior & ~covered)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        if (lab[sl] == i).sum() >= thr.rescue_min_area_px:
            boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def truncated(mask: np.ndarray, crop: tuple[int, int, int, int], size: int,
              max_fraction: float) -> bool:
    """True when the mask runs along its crop border (away from the tile edge) for more than
    `max_fraction` of that border: the box was too small and the mask is a cut-off piece of a
    larger nucleus (it would otherwise come out as a box-shaped fragment)."""
    x0, y0, x1, y1 = crop
    sides = [(mask[0], y0 > 0), (mask[-1], y1 < size), (mask[:, 0], x0 > 0),
             (mask[:, -1], x1 < size)]
    inner = [s for s, inside in sides if inside]
    if not inner:
        return False
    on = sum(int(s.sum()) for s in inner)
    return on > max_fraction * sum(len(s) for s in inner)


def _paint(items: list[tuple[float, tuple[int, int, int, int], np.ndarray]], size: int,
           thr: Thresholds) -> TileNuclei:
    """Paint masks in score order onto one canvas; keep each one's largest remaining part."""
    canvas = np.zeros((size, size), dtype=bool)
    masks, origins, scores = [], [], []
    for score, (x0, y0, x1, y1), m in sorted(items, key=lambda t: -t[0]):
        free = m & ~canvas[y0:y1, x0:x1]
        lab, n = ndimage.label(free)
        if n == 0:
            continue
        if n > 1:
            free = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        area = int(free.sum())
        if area < thr.min_area_px or area < thr.keep_fraction * max(int(m.sum()), 1):
            continue
        canvas[y0:y1, x0:x1] |= free
        ys, xs = np.nonzero(free)
        sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        masks.append(free[sl])
        origins.append((x0 + xs.min(), y0 + ys.min()))
        scores.append(score)
    return TileNuclei(masks, np.array(origins, dtype=np.int64).reshape(-1, 2),
                      np.array(scores, dtype=np.float32))


def _refine_input(model: USNet, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, probs], dim=1) if model.spec.refine_inputs == "rgb+seg" else x


@torch.no_grad()
def tile_instances(model: USNet, x: torch.Tensor, out: USNetOutput, anchors: torch.Tensor,
                   thr: Thresholds) -> list[TileNuclei]:
    """Normalised input batch x and its raw outputs -> one TileNuclei per tile."""
    size = x.shape[-1]
    probs = model.seg_probs(out.seg_logits.float())
    inp = _refine_input(model, x.float(), probs)
    dets = [detect_boxes(out.conf_logits[i], out.loc[i], anchors, thr.score, thr.nms, thr.top_k,
                         size) for i in range(x.shape[0])]
    refined = refine_boxes(model, inp, [d[0].to("cpu") for d in dets])
    items = [[(float(s), c, m.numpy()) for s, (c, m) in zip(d[1].tolist(), r)
              if not truncated(m.numpy(), c, size, thr.max_edge_fraction)]
             for d, r in zip(dets, refined)]
    if model.spec.rescue_missed:
        _add_rescued(model, inp, probs, items, thr)
    return [_paint(it, size, thr) for it in items]


def _add_rescued(model: USNet, inp: torch.Tensor, probs: torch.Tensor, items: list[list],
                 thr: Thresholds) -> None:
    """Refine boxes of segmentation components the detections missed; score = mean prob."""
    size = inp.shape[-1]
    interior = (probs[:, 1] if probs.shape[1] > 1 else probs[:, 0]).cpu().numpy()
    fg = model.foreground(probs).cpu().numpy()
    boxes = []
    for i, its in enumerate(items):
        covered = np.zeros((size, size), dtype=bool)
        for _, (x0, y0, x1, y1), m in its:
            covered[y0:y1, x0:x1] |= m
        boxes.append(_rescue_boxes(interior[i] > thr.rescue_prob, covered, thr))
    for i, res in enumerate(refine_boxes(model, inp, boxes)):
        for crop, m in res:
            m = m.numpy()
            x0, y0, x1, y1 = crop
            score = float(fg[i, y0:y1, x0:x1][m].mean()) if m.any() else 0.0
            items[i].append((score * 0.5, crop, m))
