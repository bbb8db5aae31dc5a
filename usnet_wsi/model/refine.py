"""The refinement sub-network and the crop/paste geometry around it.

Each detected box is scaled up for context (`refine_context`), cropped from the input (RGB, plus
the segmentation probabilities in the default recipe), resampled to 48x48 and passed through a
small U-Net of four convolution layers that returns the mask of the nucleus at the crop centre.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from usnet_wsi.model.spec import ModelSpec


class RefineNet(nn.Module):
    """conv(48) -> pool -> conv(24) -> up + skip -> conv(48) -> 1x1 conv: four conv layers."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        c_in, w = spec.refine_in_channels, spec.refine_width
        self.c1 = nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True))
        self.c2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w),
                                nn.ReLU(True))
        self.c3 = nn.Sequential(nn.Conv2d(3 * w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True))
        self.c4 = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 48, 48) crops -> (N, 1, 48, 48) mask logits."""
        a = self.c1(x)
        b = self.c2(F.max_pool2d(a, 2))
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.c4(self.c3(torch.cat([a, b], dim=1)))


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
    (N, C, out, out) with bilinear sampling at pixel centres (a differentiable RoIAlign)."""
    if crops.shape[0] == 0:
        return images.new_zeros((0, images.shape[1], out, out))
    _, _, h, w = images.shape
    t = (torch.arange(out, device=images.device, dtype=images.dtype) + 0.5) / out
    xs = crops[:, 0:1] + t[None] * (crops[:, 2:3] - crops[:, 0:1])      # (N, out) pixel coords
    ys = crops[:, 1:2] + t[None] * (crops[:, 3:4] - crops[:, 1:2])
    gx = (2 * xs / w - 1)[:, None, :].expand(-1, out, -1)
    gy = (2 * ys / h - 1)[:, :, None].expand(-1, -1, out)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(images[batch_index], grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def paste_mask(logits48: torch.Tensor, crop: tuple[int, int, int, int]) -> torch.Tensor:
    """Resample one (48, 48) logit map back onto its integer crop box; returns bool (h, w)."""
    x0, y0, x1, y1 = crop
    m = F.interpolate(logits48[None, None], size=(y1 - y0, x1 - x0), mode="bilinear",
                      align_corners=False)[0, 0]
    return m > 0
