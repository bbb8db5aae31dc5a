"""Raw detector outputs -> scored boxes: threshold, top-k, decode the survivors, NMS.

NMS is a vectorised greedy suppression over at most `top_k` boxes (torchvision's nms would be the
usual choice, but torchvision does not install beside the CPU torch build this project targets).
"""

from __future__ import annotations

import torch

from usnet_wsi.anchors import box_iou, decode


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of kept boxes, highest score first (greedy NMS, ties broken by index)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    n = order.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    over = (iou > iou_threshold).cpu()
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long)]


def detect_boxes(conf_logits: torch.Tensor, loc: torch.Tensor, anchors: torch.Tensor,
                 score_threshold: float, nms_threshold: float, top_k: int = 1000,
                 size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (A,) logits and (A, 4) offsets -> (boxes (N, 4) xyxy, scores (N,))."""
    scores = torch.sigmoid(conf_logits.float())
    cand = torch.nonzero(scores >= score_threshold).flatten()
    if cand.numel() > top_k:
        cand = cand[torch.topk(scores[cand], top_k).indices]
    boxes = decode(loc[cand].float(), anchors[cand])
    if size is not None:
        boxes = boxes.clamp(0, size)
    wh = boxes[:, 2:] - boxes[:, :2]
    ok = (wh > 2).all(dim=1)
    boxes, sc = boxes[ok], scores[cand][ok]
    keep = nms(boxes, sc, nms_threshold)
    return boxes[keep], sc[keep]
