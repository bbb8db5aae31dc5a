"""Test-time augmentation by flips (`segment --tta`).

The network runs on the tile and on its mirror images; each mirrored output is mapped back to
the tile's frame and the raw outputs are averaged before the one instance step:

- segmentation logits: flipped back;
- detection logits and box offsets: the anchor grid is mirror-symmetric (anchor centres sit at
  (i + 0.5) * step with step = tile / cells), so each anchor of the mirrored tile is an anchor
  of the tile: a fixed permutation maps them back; a horizontal mirror negates the x offset, a
  vertical one the y offset (widths and heights are unchanged).

The averaged outputs are mirror-equivariant: the result for a mirrored tile is the mirrored
result (bit for bit with "flip"; up to rounding with "flips"). Cost: one more forward pass per
flip; the refiner runs once.
"""

from __future__ import annotations

import torch

from usnet_wsi.anchors import anchor_shapes, feature_sizes
from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.model.usnet import USNet, USNetOutput

# --tta choice -> the flips run besides the tile itself, as dims of a (B, C, H, W) tensor
TTA_MODES: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": (),
    "flip": ((3,),),                      # left-right mirror: 2 forward passes
    "flips": ((3,), (2,), (2, 3)),        # left-right, up-down and both: 4 forward passes
}


def anchor_permutation(spec: ModelSpec, tile_px: int, dims: tuple[int, ...]) -> torch.Tensor:
    """(A,) index: anchor i of the mirrored tile is anchor perm[i] of the tile (an
    involution)."""
    parts, offset = [], 0
    for li, size in enumerate(feature_sizes(tile_px, spec.det_levels)):
        k = len(anchor_shapes(spec, li))
        rows = torch.arange(size)
        cols = torch.arange(size)
        if 2 in dims:
            rows = rows.flip(0)
        if 3 in dims:
            cols = cols.flip(0)
        cell = rows[:, None] * size + cols[None, :]                  # (size, size)
        idx = cell.reshape(-1, 1) * k + torch.arange(k)[None, :]     # (size*size, k)
        parts.append(idx.reshape(-1) + offset)
        offset += size * size * k
    return torch.cat(parts)


class FlipTTA:
    """Averaged raw outputs of a model over the tile and its mirror images."""

    def __init__(self, spec: ModelSpec, tile_px: int, mode: str, device: torch.device) -> None:
        if mode not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {mode!r}")
        self.flips = TTA_MODES[mode]
        self.perms = [anchor_permutation(spec, tile_px, d).to(device) for d in self.flips]

    def __call__(self, model: USNet, x: torch.Tensor) -> USNetOutput:
        out = model(x)
        seg, conf, loc = out.seg_logits.float(), out.conf_logits.float(), out.loc.float()
        for dims, perm in zip(self.flips, self.perms):
            xf = torch.flip(x, dims).contiguous(memory_format=torch.channels_last)
            o = model(xf)
            seg = seg + torch.flip(o.seg_logits.float(), dims)
            conf = conf + o.conf_logits.float()[:, perm]
            sign = torch.ones(4, device=x.device)
            sign[0], sign[1] = (-1 if 3 in dims else 1), (-1 if 2 in dims else 1)
            loc = loc + o.loc.float()[:, perm] * sign
        n = 1 + len(self.flips)
        return USNetOutput(seg / n, conf / n, loc / n)
