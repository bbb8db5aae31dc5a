"""Training batches: augmented 300x300 samples -> tensors and per-image targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usnet_wsi.anchors import encode, match
from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.training.data import (Annotated, augment, boxes_of, crop_origins, pad_to,
                                     seg_target)


@dataclass
class Batch:
    images: torch.Tensor        # (B, H, W, 3) uint8
    seg: torch.Tensor           # (B, H, W) int64 class per pixel
    labels: torch.Tensor        # (B, H, W) int32 instance ids
    anchor_labels: torch.Tensor  # (B, A) 1 / 0 / -1
    loc_targets: torch.Tensor   # (B, A, 4)
    boxes: list[torch.Tensor]   # per image (G, 4) xyxy
    ids: list[torch.Tensor]     # per image (G,) instance id of each box


def epoch_windows(data: list[Annotated], rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(image index, y, x) of every 400x400 window (stride 200) of every image, shuffled."""
    wins = [(i, y, x) for i, a in enumerate(data) for y, x in crop_origins(*a.labels.shape)]
    rng.shuffle(wins)
    return wins


def make_batch(data: list[Annotated], windows: list[tuple[int, int, int]], spec: ModelSpec,
               anchors: torch.Tensor, rng: np.random.Generator, window: int = 400) -> Batch:
    imgs, segs, labs, alabs, locs, boxes, ids = [], [], [], [], [], [], []
    for i, y, x in windows:
        a = data[i]
        rgb, lab = pad_to(a.rgb[y:y + window, x:x + window], a.labels[y:y + window, x:x + window],
                          spec.input_size, rng)
        rgb, lab = augment(rgb, lab, spec.input_size, rng)
        b, bid = boxes_of(lab)
        bt = torch.from_numpy(b)
        al, gi = match(bt, anchors)
        loc = encode(bt[gi], anchors) if len(b) else torch.zeros_like(anchors)
        imgs.append(torch.from_numpy(rgb))
        labs.append(torch.from_numpy(lab))
        segs.append(torch.from_numpy(seg_target(lab, spec.seg_classes)))
        alabs.append(al)
        locs.append(loc)
        boxes.append(bt)
        ids.append(torch.from_numpy(bid))
    return Batch(torch.stack(imgs), torch.stack(segs), torch.stack(labs), torch.stack(alabs),
                 torch.stack(locs), boxes, ids)


def refine_samples(batch: Batch, per_image: int, rng: np.random.Generator, jitter: float = 0.15
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jittered GT boxes (like detections) for the refiner: (batch_index, boxes, instance ids)."""
    bidx, bxs, ids = [], [], []
    for i, (b, idv) in enumerate(zip(batch.boxes, batch.ids)):
        if len(b) == 0:
            continue
        pick = rng.choice(len(b), size=min(per_image, len(b)), replace=False)
        bb = b[pick].clone()
        wh = (bb[:, 2:] - bb[:, :2]).repeat(1, 2)
        bb += torch.from_numpy(rng.uniform(-jitter, jitter, bb.shape).astype(np.float32)) * wh
        bidx.append(torch.full((len(pick),), i))
        bxs.append(bb)
        ids.append(idv[pick])
    if not bxs:
        return torch.zeros(0, dtype=torch.long), torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long)
    return torch.cat(bidx), torch.cat(bxs), torch.cat(ids)
