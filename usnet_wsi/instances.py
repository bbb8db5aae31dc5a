"""The instance step: US-Net raw outputs of a batch of tiles -> one instance label map per tile.

This is the only place where network outputs become nuclei; `segment`, training validation and
threshold tuning all go through it. One fixed flow of batched tensors, on the model's device:

1. `detect`: score threshold, top-k, decoding and greedy NMS for the whole batch;
2. only detections whose box centre can be owned by the tile (its core plus a margin, given as
   `regions`) go on: the others belong to a neighbouring tile, which refines them itself;
3. RoIAlign of every surviving box (scaled up for context) to 48x48, sampling each tile once;
4. one call of the 48x48 refiner for the whole batch;
5. all masks pasted back at once (bilinear, as `F.interpolate` to the crop size), masks cut off
   by their crop border dropped, and (`seg_agreement`) masks whose pixels the segmentation map
   does not call nucleus, on average;
6. one device-to-host copy of the masks as pixel lists, with scores and minimum sizes;
7. score-ordered painting of the whole batch in a few vectorised waves (`usnet_wsi.painting`):
   exactly as painting one mask after the other, best first, where each mask keeps the
   largest connected part of the pixels still free and is dropped when that part is smaller
   than `min_area_px` or `keep_fraction` of its area. Result: an int32 label map per tile
   plus a score table. With `paint=False` each tile's masks are returned unpainted instead
   (the engine's CPU-stage workers paint them, tile by tile, with the same result).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from usnet_wsi.decode import Detections, detect
from usnet_wsi.model.bundle import Thresholds
from usnet_wsi.model.inference import compute_dtype
from usnet_wsi.model.refine import context_boxes, paste_masks, sample_crops
from usnet_wsi.model.usnet import USNet, USNetOutput
from usnet_wsi.painting import (MaskPixels, TileMasks, UnpaintedBatch, paint_batch,
                                split_by_tile)

# Detections whose box centre lies this many tile pixels outside the tile's `region` are not
# refined (the refined mask's centroid, which decides ownership, sits near the box centre).
REGION_MARGIN_PX = 6.0
_PASTE_CHUNK = 128        # masks pasted per chunk (sorted by size: similar window sides)
_REFINE_CHUNK_CPU = 64    # crops per refiner call on the CPU
_REFINE_CHUNK_GPU = 256   # crops per refiner call on a GPU (always this many: padded)
SCORE_DECIMALS = 5        # scores are rounded so that they do not depend on the batch size


@dataclass
class TileInstances:
    """One tile's nuclei in the tile (model-pixel) frame."""

    labels: np.ndarray        # (H, W) int32: 0 background, k = k-th nucleus (best score first)
    scores: np.ndarray        # (n,) float32: scores[k - 1] is the score of label k
    detected: int = 0         # detections after NMS, before ownership filtering

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class InstanceBatch:
    """Compact result of a batch, on the host: label maps plus a score table."""

    labels: np.ndarray        # (B, H, W) int32
    scores: np.ndarray        # (B, K) float32, NaN beyond each tile's count
    counts: np.ndarray        # (B,) int64
    detected: np.ndarray      # (B,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def tile(self, i: int) -> TileInstances:
        n = int(self.counts[i])
        return TileInstances(self.labels[i], self.scores[i, :n].copy(), int(self.detected[i]))

    @classmethod
    def from_tiles(cls, tiles: Sequence[TileInstances]) -> "InstanceBatch":
        k = max([len(t) for t in tiles] + [1])
        scores = np.full((len(tiles), k), np.nan, np.float32)
        for i, t in enumerate(tiles):
            scores[i, :len(t)] = t.scores
        return cls(np.stack([t.labels for t in tiles]), scores,
                   np.array([len(t) for t in tiles], np.int64),
                   np.array([t.detected for t in tiles], np.int64))

    @classmethod
    def concat(cls, parts: Sequence["InstanceBatch"]) -> "InstanceBatch":
        """The batches one after the other (score tables padded with NaN to the widest)."""
        k = max(p.scores.shape[1] for p in parts)
        scores = [np.pad(p.scores, ((0, 0), (0, k - p.scores.shape[1])),
                         constant_values=np.nan) for p in parts]
        return cls(np.concatenate([p.labels for p in parts]), np.concatenate(scores),
                   np.concatenate([p.counts for p in parts]),
                   np.concatenate([p.detected for p in parts]))

    @classmethod
    def empty(cls, size: int) -> "InstanceBatch":
        return cls(np.zeros((0, size, size), np.int32), np.zeros((0, 1), np.float32),
                   np.zeros(0, np.int64), np.zeros(0, np.int64))


def paint_masks(masks: Sequence[np.ndarray], origins: Sequence[tuple[int, int]],
                scores: Sequence[float], size: int) -> TileInstances:
    """Host-side painting of given masks into a tile label map with the same painter as the
    model's masks (`usnet_wsi.painting`; best score first, no minimum size); for predictors
    that produce masks themselves (e.g. test oracles). Masks are clipped to the tile."""
    order = sorted(range(len(masks)), key=lambda i: -float(scores[i]))
    owners, flats = [], []
    for rank, i in enumerate(order):
        r, c = np.nonzero(np.asarray(masks[i], bool))
        y, x = r + origins[i][1], c + origins[i][0]
        inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        owners.append(np.full(int(inside.sum()), rank, np.int64))
        flats.append(y[inside].astype(np.int64) * size + x[inside])
    n = len(order)
    pixels = MaskPixels(np.concatenate(owners or [np.zeros(0, np.int64)]),
                        np.concatenate(flats or [np.zeros(0, np.int64)]), np.ones(n, np.int64),
                        np.ones(n, bool), np.zeros(n, np.int64))
    sorted_scores = np.array([float(scores[i]) for i in order], np.float32)
    labels, kept_scores = TileMasks(pixels, sorted_scores, size).paint()
    return TileInstances(labels, kept_scores, len(masks))


# ----------------------------------------------------------------------------- the flow

@torch.no_grad()
def batch_instances(model: USNet, x: torch.Tensor, out: USNetOutput, anchors: torch.Tensor,
                    thr: Thresholds, regions: torch.Tensor | None = None,
                    autocast: Callable[[], ContextManager] = nullcontext,
                    paint: bool = True) -> InstanceBatch | UnpaintedBatch:
    """Normalised input batch x (B, 3, S, S) and its raw outputs -> label maps and scores.

    `regions`: (B, 4) xyxy tile-pixel boxes where a nucleus centre must lie for the tile to
    keep it (None: the whole tile). `autocast`: the context the refiner runs in. `paint`:
    False leaves step 7 to the caller (each tile's masks, for a CPU-stage worker)."""
    b, size = x.shape[0], x.shape[-1]
    dets = detect(out.conf_logits, out.loc, anchors, thr.score, thr.nms, thr.top_k, size)
    detected = torch.bincount(dets.image, minlength=b)
    if regions is not None:
        dets = dets.select(_centre_in(dets, regions.to(x.device), REGION_MARGIN_PX))
    crops = context_boxes(dets.boxes, model.spec.refine_context, size)
    probs = _seg_probs(model, out, thr)
    with autocast():
        logits = _refine(model, x, probs, dets.image, crops)
    if thr.quality_weight > 0 or thr.final_score > 0:
        dets, logits, crops = _rerank(dets, logits, crops, thr)
    masks = _paste(logits, crops, dets.image, size, thr)
    if thr.seg_agreement > 0:
        masks.usable &= _agreement(masks, model.foreground(probs)) >= thr.seg_agreement
    return _to_host(masks, _need(masks.area, thr), dets, (b, size), detected, paint)


def _centre_in(dets: Detections, regions: torch.Tensor, margin: float) -> torch.Tensor:
    c = (dets.boxes[:, :2] + dets.boxes[:, 2:]) / 2
    r = regions[dets.image].to(c.dtype)
    return ((c >= r[:, :2] - margin) & (c < r[:, 2:] + margin)).all(dim=1)


def _seg_probs(model: USNet, out: USNetOutput, thr: Thresholds) -> torch.Tensor | None:
    """The float32 segmentation probabilities (B, C, H, W), in the network's layout, where
    the refiner reads them (default recipe) or `seg_agreement` needs them."""
    if model.spec.refine_inputs != "rgb+seg" and thr.seg_agreement <= 0:
        return None
    return model.seg_probs(out.seg_logits.float())


def _refine(model: USNet, x: torch.Tensor, probs: torch.Tensor | None, image: torch.Tensor,
            crops: torch.Tensor) -> torch.Tensor:
    """48x48 logits (N, 48, 48) of the refiner for every crop, in one call. Its crops are
    sampled from the RGB input, and in the default recipe from the segmentation
    probabilities after it."""
    cpu = x.device.type == "cpu"
    sources = [x.float()] + ([probs] if model.spec.refine_inputs == "rgb+seg" else [])
    patches = sample_crops(sources, image, crops, model.spec.refine_size, compute_dtype(x),
                           split=torch.get_num_threads() if cpu else 1)
    if not cpu:
        return _refine_fixed_chunks(model.refiner, patches, _REFINE_CHUNK_GPU)
    return _refine_on_cpu(model.refiner, patches)


def _refine_on_cpu(refiner: torch.nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """The refiner over chunks of `_REFINE_CHUNK_CPU` crops: a chunk's activations stay in the
    CPU caches (2.4x faster than one call). The channels-last CPU kernels give the same
    numbers for any batch of two or more, so no chunk has a single crop (a lone crop is run
    twice) and results do not depend on the chunking."""
    if len(patches) == 1:
        return refiner(torch.cat([patches, patches]))[:1, 0].float()
    chunks = list(patches.split(_REFINE_CHUNK_CPU))
    if len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return torch.cat([refiner(c)[:, 0].float() for c in chunks])


def _refine_fixed_chunks(refiner: torch.nn.Module, patches: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """The refiner over chunks of exactly `chunk` crops, the last one padded with zeros: every
    call has the same shape, so the convolution algorithms a GPU picks by shape, and with
    them each crop's logits, do not depend on how many crops a batch has."""
    n = len(patches)
    padded = patches.new_zeros((-(-n // chunk) * chunk, *patches.shape[1:])).contiguous(
        memory_format=torch.channels_last)
    padded[:n] = patches
    out = [refiner(c)[:, 0].float() for c in padded.split(chunk)]
    return torch.cat(out)[:n] if out else patches.new_zeros((0, *patches.shape[-2:]),
                                                            dtype=torch.float32)


def mask_quality(logits: torch.Tensor) -> torch.Tensor:
    """(N,) how sure the refiner is of each 48x48 mask: the mean foreground probability over
    the pixels it calls foreground (0 for an empty mask). Ragged, low-contrast blobs get
    probabilities near 0.5; crisp nuclei near 1."""
    prob = torch.sigmoid(logits.float())
    fg = (logits > 0).float()
    return (prob * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp_min(1.0)


def _rerank(dets: Detections, logits: torch.Tensor, crops: torch.Tensor, thr: Thresholds
            ) -> tuple[Detections, torch.Tensor, torch.Tensor]:
    """Score = detection^(1-w) * mask quality^w; drop scores below `final_score`; reorder
    best first within each tile (the painting order)."""
    w = float(thr.quality_weight)
    q = mask_quality(logits).clamp_min(1e-6)
    score = dets.scores.float().clamp_min(1e-6) ** (1 - w) * q ** w
    keep = torch.nonzero(score >= thr.final_score).flatten()
    order = keep[torch.argsort(-score[keep], stable=True)]
    order = order[torch.argsort(dets.image[order], stable=True)]
    ranked = Detections(dets.boxes[order], score[order].to(dets.scores.dtype), dets.image[order])
    return ranked, logits[order], crops[order]


@dataclass
class _Masks:
    """Pasted masks as pixel lists: mask index and flat (image, y, x) index of every pixel."""

    owner: torch.Tensor       # (P,) int64 mask index of each pixel
    flat: torch.Tensor        # (P,) int64 image * S * S + y * S + x
    area: torch.Tensor        # (N,) int64 pixels per mask
    usable: torch.Tensor      # (N,) bool: not cut off by its crop border


def _paste(logits: torch.Tensor, crops: torch.Tensor, image: torch.Tensor, size: int,
           thr: Thresholds) -> _Masks:
    """Paste every mask onto its crop (in chunks of similar size) as pixel lists: the pixels
    whose resampled refiner probability is above `mask_threshold`."""
    p = min(max(thr.mask_threshold, 1e-6), 1 - 1e-6)
    cut = math.log(p / (1 - p))
    n, dev = logits.shape[0], logits.device
    crops = crops.to(dev)
    side = (crops[:, 2:] - crops[:, :2]).max(dim=1).values
    order = torch.argsort(side, stable=True)
    owners, flats = [], []
    usable = torch.ones(n, dtype=torch.bool, device=dev)
    for chunk in (order.split(_PASTE_CHUNK) if n else ()):
        c, s = crops[chunk], int(side[chunk].max())
        win = paste_masks(logits[chunk], c, s, cut)
        usable[chunk] = ~_cut_off(win, c, size, thr.max_edge_fraction)
        k, q = torch.nonzero(win.view(len(chunk), s * s), as_tuple=True)
        corner = (image[chunk] * size + c[:, 1].long()) * size + c[:, 0].long()
        step = torch.arange(s, device=dev)
        offset = (step[:, None] * size + step[None, :]).view(-1)   # window pixel -> tile offset
        owners.append(chunk[k])
        flats.append(corner[k] + offset[q])
    owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long, device=dev)
    flat = torch.cat(flats) if flats else torch.zeros(0, dtype=torch.long, device=dev)
    return _Masks(owner, flat, torch.bincount(owner, minlength=n), usable)


def _cut_off(win: torch.Tensor, crops: torch.Tensor, size: int, max_fraction: float
             ) -> torch.Tensor:
    """bool (N,): the mask covers more than `max_fraction` of its crop border sides that lie
    inside the tile: the box was too small and the mask is a cut-off piece of a nucleus."""
    x0, y0, x1, y1 = crops.long().unbind(dim=1)
    w, h = x1 - x0, y1 - y0
    n = torch.arange(win.shape[0], device=win.device)
    on = torch.stack([win[:, 0, :].sum(1), win[n, h - 1, :].sum(1),
                      win[:, :, 0].sum(1), win[n, :, w - 1].sum(1)], dim=1)
    inner = torch.stack([y0 > 0, y1 < size, x0 > 0, x1 < size], dim=1)
    length = torch.stack([w, w, h, h], dim=1)
    total = (inner * length).sum(1)
    return (total > 0) & ((on * inner).sum(1) > max_fraction * total)


def _agreement(masks: _Masks, foreground: torch.Tensor) -> torch.Tensor:
    """(N,) the mean segmentation foreground probability over each mask's pixels (0 for an
    empty mask): ragged blobs on textured background, which the segmentation map does not
    call nucleus, score low."""
    fg = foreground.reshape(-1)[masks.flat].double()
    total = torch.bincount(masks.owner, weights=fg, minlength=len(masks.area))
    return total / masks.area.clamp_min(1)


def _need(area: torch.Tensor, thr: Thresholds) -> torch.Tensor:
    """(N,) pixels a mask must keep: `min_area_px`, `keep_fraction` of its area, at least 1."""
    need = torch.maximum(torch.full_like(area, thr.min_area_px),
                         torch.ceil(thr.keep_fraction * area).long())
    return torch.maximum(need, torch.ones_like(need))


def _to_host(masks: _Masks, need: torch.Tensor, dets: Detections, shape: tuple[int, int],
             detected: torch.Tensor, paint: bool = True) -> InstanceBatch | UnpaintedBatch:
    """One copy of the compact tables to the host, then painting (usnet_wsi.painting), or the
    masks split by tile for painting elsewhere."""
    b, size = shape
    owner, flat, need, usable, tile, scores, detected = (
        t.cpu().numpy() for t in (masks.owner, masks.flat, need, masks.usable, dets.image,
                                  dets.scores, detected))
    pixels = MaskPixels(owner, flat, need, usable, tile)
    if not paint:
        rounded = np.round(scores.astype(np.float32), SCORE_DECIMALS)
        return UnpaintedBatch(split_by_tile(pixels, rounded, detected, size))
    labels, kept = paint_batch(pixels, b, size)
    idx = np.flatnonzero(kept)
    counts = np.bincount(tile[idx], minlength=b)
    table = np.full((b, max(int(counts.max(initial=0)), 1)), np.nan, np.float32)
    slot = np.arange(len(idx)) - (np.cumsum(counts) - counts)[tile[idx]]
    table[tile[idx], slot] = scores[idx]
    return InstanceBatch(labels, np.round(table, SCORE_DECIMALS), counts.astype(np.int64),
                         detected.astype(np.int64))
