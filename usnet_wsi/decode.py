"""Raw detector outputs -> scored boxes: threshold, top-k, decode the survivors, NMS.

`detect` works on a whole batch at once: candidates of every image are decoded together and
suppressed by greedy NMS within their image. On a GPU, NMS is solved as a fixed point of matrix
operations (no loop over boxes, no host sync per box), which gives exactly the greedy result; on
a CPU the classic loop over kept boxes is cheaper (torchvision's nms would be the usual choice,
but torchvision does not install beside the CPU torch build this project targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usnet_wsi.anchors import box_iou, decode


@dataclass
class Detections:
    """Boxes of a batch of tiles: xyxy in tile pixels, score and the tile they belong to."""

    boxes: torch.Tensor      # (N, 4) float32
    scores: torch.Tensor     # (N,) float32
    image: torch.Tensor      # (N,) int64, index in the batch

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, keep: torch.Tensor) -> "Detections":
        return Detections(self.boxes[keep], self.scores[keep], self.image[keep])


def greedy_keep(over: torch.Tensor) -> torch.Tensor:
    """Greedy suppression on score-sorted conflict matrices (..., n, n): over[i, j] means box i
    suppresses box j if i is kept and ranks higher (i < j). Returns bool (..., n) kept, equal
    to the one-by-one greedy loop.

    Fixed point: box j is kept iff no kept box ranked above it conflicts with it. Iterating
    from "all kept" settles the first k boxes after k rounds at most; it usually takes 2-4."""
    if over.device.type == "cpu":
        return _greedy_keep_loop(over)
    return greedy_keep_rounds(over)


def greedy_keep_rounds(over: torch.Tensor) -> torch.Tensor:
    """`greedy_keep` by matrix rounds (the device path)."""
    n = over.shape[-1]
    above = torch.triu(over, diagonal=1)
    keep = torch.ones(over.shape[:-1], dtype=torch.bool, device=over.device)
    for _ in range(n + 1):
        new = ~(above & keep[..., :, None]).any(dim=-2)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def _greedy_keep_loop(over: torch.Tensor) -> torch.Tensor:
    """`greedy_keep` one box at a time in numpy: on a CPU this beats the matrix rounds."""
    conflicts = over.numpy().reshape(-1, over.shape[-1], over.shape[-1])
    keep = np.ones(conflicts.shape[:2], dtype=bool)
    for b, matrix in enumerate(conflicts):
        row = keep[b]
        for i in range(len(row)):
            if row[i]:
                row[i + 1:] &= ~matrix[i, i + 1:]
    return torch.from_numpy(keep.reshape(over.shape[:-1]))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of kept boxes, highest score first (greedy NMS, ties broken by index)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    over = box_iou(boxes[order], boxes[order]) > iou_threshold
    return order[greedy_keep(over)]


def detect(conf_logits: torch.Tensor, loc: torch.Tensor, anchors: torch.Tensor,
           score_threshold: float, nms_threshold: float, top_k: int,
           size: int | None) -> Detections:
    """A batch: (B, A) logits and (B, A, 4) offsets -> the boxes that survive NMS: per image
    the `top_k` best candidates above `score_threshold`, decoded (clipped to [0, size]; boxes
    of 2 px or less dropped) and suppressed greedily within their image. Sorted by (image,
    score descending)."""
    if conf_logits.shape[1] != anchors.shape[0] or loc.shape[1] != anchors.shape[0]:
        raise ValueError(f"{conf_logits.shape[1]} network outputs per image for "
                         f"{anchors.shape[0]} anchors: the anchors are for another tile size")
    scores = torch.sigmoid(conf_logits.float())
    top, idx = _top_candidates(scores, min(top_k, scores.shape[1]))
    k = max(int((top >= score_threshold).sum(dim=1).max()), 1)
    top, idx = top[:, :k], idx[:, :k]
    boxes = decode(torch.gather(loc.float(), 1, idx[..., None].expand(-1, -1, 4)), anchors[idx])
    if size is not None:
        boxes = boxes.clamp(0, size)
    valid = (top >= score_threshold) & ((boxes[..., 2:] - boxes[..., :2]) > 2).all(dim=-1)
    if boxes.device.type == "cpu":
        keep = _nms_sorted_cpu(boxes, valid, nms_threshold)
    else:
        over = _batched_iou(boxes) > nms_threshold
        over &= valid[:, :, None] & valid[:, None, :]
        keep = greedy_keep(over) & valid
    img, rank = torch.nonzero(keep, as_tuple=True)
    return Detections(boxes[img, rank], top[img, rank], img)


def _top_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (row) the k best scores and their anchors, by score descending and, among
    equal scores, by anchor index: `topk` leaves the order of ties to the kernel (and a GPU's
    kernel may change with the batch shape), and the greedy NMS that follows depends on it."""
    top, idx = scores.topk(k, dim=1)
    idx, by_anchor = idx.sort(dim=1)
    top = top.gather(1, by_anchor)
    order = torch.argsort(top, dim=1, descending=True, stable=True)
    return top.gather(1, order), idx.gather(1, order)


def _nms_sorted_cpu(boxes: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS of score-sorted (B, K, 4) boxes in numpy, one kept box at a time: only the
    kept boxes (a small fraction) are compared with the rest. Returns bool (B, K) kept."""
    keep = valid.numpy().copy()
    for b, bx in enumerate(boxes.numpy().astype(np.float32)):
        x0, y0, x1, y1 = bx.T
        area = (x1 - x0) * (y1 - y0)
        alive = keep[b]
        for i in np.flatnonzero(alive):
            if not alive[i]:
                continue
            rest = slice(i + 1, None)
            w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
            h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
            inter = w * h
            iou = inter / np.maximum(area[i] + area[rest] - inter, np.float32(1e-9))
            alive[rest] &= ~(iou > threshold)
    return torch.from_numpy(keep)


def _batched_iou(boxes: torch.Tensor) -> torch.Tensor:
    """(B, K, 4) xyxy -> (B, K, K) IoU within each image."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    w = (torch.minimum(x1[:, :, None], x1[:, None, :])
         - torch.maximum(x0[:, :, None], x0[:, None, :])).clamp_(min=0)
    h = (torch.minimum(y1[:, :, None], y1[:, None, :])
         - torch.maximum(y0[:, :, None], y0[:, None, :])).clamp_(min=0)
    inter = w.mul_(h)
    area = (x1 - x0) * (y1 - y0)
    union = (area[:, :, None] + area[:, None, :]).sub_(inter).clamp_(min=1e-9)
    return inter.div_(union)


def detect_boxes(conf_logits: torch.Tensor, loc: torch.Tensor, anchors: torch.Tensor,
                 score_threshold: float, nms_threshold: float, top_k: int = 1000,
                 size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (A,) logits and (A, 4) offsets -> (boxes (N, 4) xyxy, scores (N,))."""
    dets = detect(conf_logits[None], loc[None], anchors, score_threshold, nms_threshold, top_k,
                  size)
    return dets.boxes, dets.scores
