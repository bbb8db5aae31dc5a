"""Raw detector outputs -> scored boxes: threshold, top-k, decode the survivors, NMS.

`detect` works on a whole batch at once and never leaves the device: candidates of every image
are decoded together and suppressed by one greedy NMS in which boxes of different images never
meet. NMS is solved as a fixed point of matrix operations (no loop over boxes), which gives
exactly the greedy result (torchvision's nms would be the usual choice, but torchvision does
not install beside the CPU torch build this project targets).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    n = over.shape[-1]
    above = torch.triu(over, diagonal=1)
    keep = torch.ones(over.shape[:-1], dtype=torch.bool, device=over.device)
    for _ in range(n + 1):
        new = ~(above & keep[..., :, None]).any(dim=-2)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


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
    scores = torch.sigmoid(conf_logits.float())
    top, idx = scores.topk(min(top_k, scores.shape[1]), dim=1)         # sorted, per image
    k = max(int((top >= score_threshold).sum(dim=1).max()), 1)
    top, idx = top[:, :k], idx[:, :k]
    boxes = decode(torch.gather(loc.float(), 1, idx[..., None].expand(-1, -1, 4)), anchors[idx])
    if size is not None:
        boxes = boxes.clamp(0, size)
    valid = (top >= score_threshold) & ((boxes[..., 2:] - boxes[..., :2]) > 2).all(dim=-1)
    over = _batched_iou(boxes) > nms_threshold
    over &= valid[:, :, None] & valid[:, None, :]
    keep = greedy_keep(over) & valid
    img, rank = torch.nonzero(keep, as_tuple=True)
    return Detections(boxes[img, rank], top[img, rank], img)


def _batched_iou(boxes: torch.Tensor) -> torch.Tensor:
    """(B, K, 4) xyxy -> (B, K, K) IoU within each image."""
    lt = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).prod(-1)
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-9)


def detect_boxes(conf_logits: torch.Tensor, loc: torch.Tensor, anchors: torch.Tensor,
                 score_threshold: float, nms_threshold: float, top_k: int = 1000,
                 size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (A,) logits and (A, 4) offsets -> (boxes (N, 4) xyxy, scores (N,))."""
    dets = detect(conf_logits[None], loc[None], anchors, score_threshold, nms_threshold, top_k,
                  size)
    return dets.boxes, dets.scores
