"""Anchor grid and box coding (SSD style).

Anchors are xyxy boxes in model-input pixels. For a 300x300 input and feature maps of 38, 19 and
10 cells with 4 anchors per cell the grid holds (38^2 + 19^2 + 10^2) * 4 = 7620 anchors. Order:
level, then row, then column, then (scale, ratio) — the order the detection head emits.
"""

from __future__ import annotations

import math

import torch

from usnet_wsi.model.spec import ModelSpec

VARIANCES = (0.1, 0.2)   # SSD variances for centre and size offsets


def feature_sizes(input_size: int, levels: tuple[int, ...]) -> list[int]:
    """Side of the U-Net feature map at each level (ceil-mode 2x pooling)."""
    sizes = []
    for level in levels:
        s = input_size
        for _ in range(level):
            s = math.ceil(s / 2)
        sizes.append(s)
    return sizes


def anchor_shapes(spec: ModelSpec, level_index: int) -> list[tuple[float, float]]:
    """(width, height) of the anchors of one detector level, in emission order."""
    base = spec.anchor_sizes[level_index]
    return [(base * s, base * s * r) for s in spec.anchor_scales for r in spec.anchor_ratios]


def make_anchors(spec: ModelSpec) -> torch.Tensor:
    """All anchors as an (A, 4) float32 xyxy tensor in model-input pixels."""
    out = []
    for li, size in enumerate(feature_sizes(spec.input_size, spec.det_levels)):
        step = spec.input_size / size
        centres = (torch.arange(size, dtype=torch.float64) + 0.5) * step
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        shapes = torch.tensor(anchor_shapes(spec, li), dtype=torch.float64)  # (k, 2)
        cx = cx.reshape(-1, 1).expand(-1, len(shapes))
        cy = cy.reshape(-1, 1).expand(-1, len(shapes))
        w, h = shapes[:, 0].expand_as(cx), shapes[:, 1].expand_as(cy)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        out.append(boxes.reshape(-1, 4))
    return torch.cat(out).float()


def _cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    wh = boxes[..., 2:] - boxes[..., :2]
    return torch.cat([boxes[..., :2] + wh / 2, wh], dim=-1)


def encode(gt_xyxy: torch.Tensor, anchors_xyxy: torch.Tensor) -> torch.Tensor:
    """Offsets (dx, dy, dw, dh) of matched GT boxes relative to their anchors (SSD coding)."""
    g, a = _cxcywh(gt_xyxy), _cxcywh(anchors_xyxy)
    dxy = (g[..., :2] - a[..., :2]) / (a[..., 2:] * VARIANCES[0])
    dwh = torch.log(g[..., 2:].clamp(min=1e-3) / a[..., 2:]) / VARIANCES[1]
    return torch.cat([dxy, dwh], dim=-1)


def decode(offsets: torch.Tensor, anchors_xyxy: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode`: offsets -> xyxy boxes."""
    a = _cxcywh(anchors_xyxy)
    cxy = a[..., :2] + offsets[..., :2] * VARIANCES[0] * a[..., 2:]
    wh = a[..., 2:] * torch.exp((offsets[..., 2:] * VARIANCES[1]).clamp(max=8.0))
    return torch.cat([cxy - wh / 2, cxy + wh / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M). Computed in place on (N, M)
    planes (matching takes it for every anchor and nucleus of every training window)."""
    def overlap(lo: int, hi: int) -> torch.Tensor:
        side = torch.minimum(a[:, None, hi], b[None, :, hi])
        return side.sub_(torch.maximum(a[:, None, lo], b[None, :, lo])).clamp_(min=0)
    inter = overlap(0, 2).mul_(overlap(1, 3))
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = (area_a[:, None] + area_b[None, :]).sub_(inter).clamp_(min=1e-9)
    return inter.div_(union)


def match(gt_xyxy: torch.Tensor, anchors_xyxy: torch.Tensor, pos_iou: float = 0.5,
          neg_iou: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign anchors to GT boxes.

    Returns (labels, gt_index): labels 1 positive, 0 negative, -1 ignored; every GT box gets at
    least its best anchor (SSD's bipartite step) so small nuclei are never left unmatched.
    """
    n = anchors_xyxy.shape[0]
    labels = torch.zeros(n, dtype=torch.long)
    index = torch.zeros(n, dtype=torch.long)
    if gt_xyxy.numel() == 0:
        return labels, index
    iou = box_iou(anchors_xyxy, gt_xyxy)              # (A, G)
    best_iou, index = iou.max(dim=1)
    labels[(best_iou >= neg_iou) & (best_iou < pos_iou)] = -1
    labels[best_iou >= pos_iou] = 1
    best_anchor = iou.argmax(dim=0)                    # (G,)
    index[best_anchor] = torch.arange(gt_xyxy.shape[0])
    labels[best_anchor] = 1
    return labels, index
