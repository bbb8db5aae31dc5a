"""The refinement sub-network and the crop/paste geometry around it.

Each detected box is scaled up for context (`refine_context`), cropped from the input (RGB, plus
the segmentation probabilities in the default recipe), resampled to 48x48 and passed through a
small U-Net of four convolution layers that returns the mask of the nucleus at the crop centre.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from usnet_wsi.model.inference import up_concat_conv
from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.model.unet import max_pool2


class RefineNet(nn.Module):
    """conv(48) -> pool -> conv(24) -> up + skip -> conv(48) -> 1x1 conv: four conv layers."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        c_in, w = spec.refine_in_channels, spec.refine_width
        self.width = w
        self.c1 = nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True))
        self.c2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w),
                                nn.ReLU(True))
        self.c3 = nn.Sequential(nn.Conv2d(3 * w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True))
        self.c4 = nn.Conv2d(w, 1, 1)

    def concat_blocks(self) -> list[tuple[nn.Sequential, int, bool]]:
        """c3, fed cat([c1 output, up-sampled c2 output]): the block, the first part's
        channels, and that the up-sampled map comes second."""
        return [(self.c3, self.width, False)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 48, 48) crops -> (N, 1, 48, 48) mask logits."""
        a = self.c1(x)
        b = self.c2(max_pool2(a))
        return self.c4(up_concat_conv(self.c3, b, a, up_first=False))


def context_boxes(boxes: torch.Tensor, context: float, size: int) -> torch.Tensor:
    """Scale xyxy boxes about their centres by `context` (aspect ratio kept, sides at least 4 px)
    and round outwards to integer boxes inside [0, size]; returns (N, 4) float xyxy."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).clamp(min=4.0) * context / 2
    x0y0 = torch.floor(c - half).clamp(0, size - 1)
    x1y1 = torch.ceil(c + half).clamp(1, size)
    x1y1 = torch.maximum(x1y1, x0y0 + 1)
    return torch.cat([x0y0, x1y1], dim=1)


def crop_resize(images: torch.Tensor, batch_index: torch.Tensor, crops: torch.Tensor,
                out: int) -> torch.Tensor:
    """Resample the pixel boxes `crops` (xyxy, pixel-edge coords) of images[batch_index] to
    (N, C, out, out) with bilinear sampling at pixel centres (a differentiable RoIAlign).

    Each image is sampled once for all of its crops (the crops of one image are laid side by
    side in one sampling grid), so no image is ever copied per crop. Where the images hold
    many crops each (`sample_crops`), each image is sampled in its own call over exactly its
    crops; where they hold about one each (training targets), in one call over all images.
    Every sample is computed alike either way, so the result does not depend on the grouping.
    """
    n, (b, c, h, w) = crops.shape[0], images.shape
    if n == 0:
        return images.new_zeros((0, c, out, out))
    batch_index = batch_index.to(images.device).long()
    if n >= _CROPS_PER_CALL * b:
        return sample_crops([images], batch_index, crops, out, images.dtype)
    grid = _crop_grid(crops, out, (h, w), images.dtype, images.device)
    counts = torch.bincount(batch_index, minlength=b)
    return _sample_padded(images, batch_index, counts, grid)


# Images holding at least this many crops on average are sampled one call each.
_CROPS_PER_CALL = 8


def _crop_grid(crops: torch.Tensor, out: int, hw: tuple[int, int], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """(N, out, out, 2) grid_sample coordinates of the pixel-centre samples of each crop."""
    h, w = hw
    t = (torch.arange(out, device=device, dtype=dtype) + 0.5) / out
    crops = crops.to(device, dtype)
    xs = crops[:, 0:1] + t[None] * (crops[:, 2:3] - crops[:, 0:1])      # (N, out) pixel coords
    ys = crops[:, 1:2] + t[None] * (crops[:, 3:4] - crops[:, 1:2])
    return torch.stack([(2 * xs / w - 1)[:, None, :].expand(-1, out, -1),
                        (2 * ys / h - 1)[:, :, None].expand(-1, -1, out)], dim=-1)


def sample_crops(sources: Sequence[torch.Tensor], batch_index: torch.Tensor,
                 crops: torch.Tensor, out: int, dtype: torch.dtype, split: int = 1
                 ) -> torch.Tensor:
    """The crops of `crop_resize(torch.cat(sources, 1), batch_index, crops, out)`, sampled one
    call per image and written straight into one (N, C, out, out) channels-last tensor of
    `dtype` (one conversion, no concatenated image, no per-crop copies; `sources` are
    (B, C_j, H, W) float32 maps in any layout): the refiner's input at inference, and
    `crop_resize` itself where the images hold many crops each. Autograd reaches `sources`.

    Each image's crops are sampled in one call, cut into `split` equal parts that form the
    batch of that call (over the image expanded, not copied): the CPU sampler runs one thread
    per batch item, so `split` = the CPU threads keeps them all busy. Every sample is computed
    alike whatever the split, so the result does not depend on it."""
    b, (h, w) = sources[0].shape[0], sources[0].shape[-2:]
    channels = [s.shape[1] for s in sources]
    dev = sources[0].device
    patches = torch.empty((len(crops), sum(channels), out, out), dtype=dtype, device=dev,
                          memory_format=torch.channels_last)
    if len(crops) == 0:
        return patches
    batch_index = batch_index.to(dev).long()
    grid = _crop_grid(crops, out, (h, w), sources[0].dtype, dev)
    order = torch.argsort(batch_index, stable=True)
    counts = torch.bincount(batch_index, minlength=b)
    start = 0
    for i, k in zip(torch.nonzero(counts).flatten().tolist(), counts[counts > 0].tolist()):
        parts = _split_grid(grid[order[start:start + k]], split)
        c0 = 0
        for src, c in zip(sources, channels):
            sampled = _sample(src[i:i + 1].expand(len(parts), -1, -1, -1), parts)
            _unsplit(sampled, patches[start:start + k, c0:c0 + c])
            c0 += c
        start += k
    if bool((order != torch.arange(len(order), device=dev)).any()):   # back to input order
        patches = patches[torch.argsort(order)].contiguous(memory_format=torch.channels_last)
    return patches


def _split_grid(grid: torch.Tensor, parts: int) -> torch.Tensor:
    """(K, out, out, 2) -> (parts, ceil(K / parts), out, out, 2), padded with points outside."""
    k, per = grid.shape[0], -(-grid.shape[0] // parts)
    if per * parts > k:
        grid = torch.cat([grid, grid.new_full((per * parts - k, *grid.shape[1:]), -2.0)])
    return grid.view(parts, per, *grid.shape[1:])


def _unsplit(sampled: torch.Tensor, dest: torch.Tensor) -> None:
    """Copy (parts, C, per * out, out) samples into `dest` (k, C, out, out), crops in grid
    order (the padding at the end left out)."""
    parts, c, rows, out = sampled.shape
    per = rows // out
    for p, first in enumerate(range(0, len(dest), per)):
        n = min(per, len(dest) - first)
        dest[first:first + n] = sampled[p].view(c, per, out, out)[:, :n].transpose(0, 1)


def _sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(M, C, H, W) images, (M, K, out, out, 2) grids -> (M, C, K * out, out) samples."""
    m, k, out = grid.shape[:3]
    return F.grid_sample(image, grid.reshape(m, k * out, out, 2), mode="bilinear",
                         padding_mode="border", align_corners=False)


def _sample_padded(images: torch.Tensor, batch_index: torch.Tensor, counts: torch.Tensor,
                   grid: torch.Tensor) -> torch.Tensor:
    """One sampling call for the whole batch: each image's crops in slots 0.. of a grid as
    long as the most crops of any image (unused slots lie outside)."""
    b, c = images.shape[:2]
    out = grid.shape[1]
    slot = _slot_in_image(batch_index, counts)
    k = int(counts.max())
    padded = grid.new_full((b, k, out, out, 2), -2.0)
    padded[batch_index, slot] = grid
    sampled = _sample(images, padded)                                  # (B, C, k*out, out)
    return sampled.view(b, c, k, out, out)[batch_index, :, slot]     # (N, C, out, out)


def _slot_in_image(batch_index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Position of each crop among the crops of its image (0, 1, ... in input order)."""
    order = torch.argsort(batch_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(batch_index)
    slot[order] = torch.arange(len(batch_index), device=batch_index.device) \
        - starts[batch_index[order]]
    return slot


def paste_masks(logits: torch.Tensor, crops: torch.Tensor, side: int, cut: float = 0.0
                ) -> torch.Tensor:
    """Resample (N, S, S) logit maps onto their integer crop boxes, all at once.

    Returns bool (N, side, side) windows: pixel (r, c) of window n is pixel
    (crops[n, 1] + r, crops[n, 0] + c) of the image, True where the bilinearly resampled logit
    is > `cut` (the same samples as `F.interpolate(..., align_corners=False)` to the crop's size);
    pixels beyond the crop's own height / width are False. `side` >= the largest crop side."""
    n, s = logits.shape[0], logits.shape[-1]
    if n == 0:
        return torch.zeros((0, side, side), dtype=torch.bool, device=logits.device)
    wh = (crops[:, 2:] - crops[:, :2]).to(logits.device, torch.float32)   # (N, 2) crop w, h
    idx = torch.arange(side, device=logits.device, dtype=torch.float32) + 0.5
    gx = 2 * idx[None] / wh[:, 0:1] - 1                                   # (N, side)
    gy = 2 * idx[None] / wh[:, 1:2] - 1
    grid = torch.stack([gx[:, None, :].expand(-1, side, -1),
                        gy[:, :, None].expand(-1, -1, side)], dim=-1)
    m = F.grid_sample(logits.float().view(n, 1, s, s), grid, mode="bilinear",
                      padding_mode="border", align_corners=False)[:, 0]
    inside = (gx < 1)[:, None, :] & (gy < 1)[:, :, None]
    return (m > cut) & inside


def paste_mask(logits48: torch.Tensor, crop: tuple[int, int, int, int]) -> torch.Tensor:
    """One (S, S) logit map resampled onto its integer crop box; returns bool (h, w)."""
    x0, y0, x1, y1 = crop
    side = max(x1 - x0, y1 - y0)
    box = torch.tensor([crop], dtype=torch.float32)
    return paste_masks(logits48[None], box, side)[0, :y1 - y0, :x1 - x0]
