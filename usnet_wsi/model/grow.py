"""Growing a trained US-Net wider without changing what it computes (Net2WiderNet).

`widen` gives the U-Net a larger base width: every widened feature map keeps its old channels
and adds copies of randomly chosen ones; a layer that reads a copied channel splits that
channel's weights between the copies (random positive shares summing to one). The grown
network computes the same function as the old one, in training mode too (batch norm sees
identical copies), and the unequal shares let the copies drift apart once training continues.
The detection head, the refiner and levels already at `max_width` keep their weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from usnet_wsi.errors import UsageError
from usnet_wsi.model.usnet import USNet

__all__ = ["widen"]


@dataclass
class _Map:
    """New channel -> old channel it copies, and its share when a layer reads it."""

    src: np.ndarray
    share: np.ndarray

    @classmethod
    def identity(cls, n: int) -> "_Map":
        return cls(np.arange(n), np.ones(n))

    @classmethod
    def grown(cls, old: int, new: int, rng: np.random.Generator) -> "_Map":
        src = np.concatenate([np.arange(old), rng.integers(0, old, new - old)])
        weight = np.where(np.arange(new) < old, 1.0, rng.uniform(0.5, 1.5, new))
        total = np.bincount(src, weights=weight, minlength=old)
        return cls(src, weight / total[src])

    def then(self, other: "_Map", old_offset: int) -> "_Map":
        """The channels of a concatenation [self, other]; `other`'s old channels start at
        `old_offset`."""
        return _Map(np.concatenate([self.src, other.src + old_offset]),
                    np.concatenate([self.share, other.share]))


def widen(model: USNet, base_width: int, seed: int = 0) -> USNet:
    """A copy of `model` with U-Net base width `base_width` (>= its own) computing the same."""
    spec = model.spec
    if base_width < spec.base_width:
        raise UsageError(f"a base width of {base_width} is narrower than the bundle's "
                         f"{spec.base_width}", f"use {spec.base_width} or more")
    grown = USNet(replace(spec, base_width=base_width))
    target = grown.state_dict()        # tensors of unchanged shape (refiner, head, deep levels)
    grown.load_state_dict({k: v for k, v in model.state_dict().items()
                           if v.shape == target[k].shape}, strict=False)
    rng = np.random.default_rng(seed)
    maps = [_Map.grown(spec.width(i), grown.spec.width(i), rng) for i in range(spec.depth + 1)]
    old, new = model.unet, grown.unet
    with torch.no_grad():
        for i in range(spec.depth + 1):
            _block(old.enc[i], new.enc[i], _Map.identity(3) if i == 0 else maps[i - 1], maps[i])
        _block(old.bottleneck, new.bottleneck, maps[spec.depth], maps[spec.depth])
        for i in range(spec.depth):
            _block(old.dec[i], new.dec[i], maps[i + 1].then(maps[i], spec.width(i + 1)), maps[i])
        _conv(old.seg_head, new.seg_head, maps[0], _Map.identity(spec.seg_classes))
        for level, t_old, t_new in zip(spec.det_levels, model.head.towers, grown.head.towers):
            _conv(t_old[0], t_new[0], maps[level], _Map.identity(t_old[0].out_channels))
    return grown.train(model.training)


def _block(old: nn.Sequential, new: nn.Sequential, m_in: _Map, m_out: _Map) -> None:
    """conv, batch norm, ReLU, conv, ...: the first conv reads `m_in`, the others `m_out`."""
    source = m_in
    for a, b in zip(old, new):
        if isinstance(a, nn.Conv2d):
            _conv(a, b, source, m_out)
            source = m_out
        elif isinstance(a, nn.BatchNorm2d):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(b, name).copy_(getattr(a, name)[torch.from_numpy(m_out.src)])
            b.num_batches_tracked.copy_(a.num_batches_tracked)


def _conv(old: nn.Conv2d, new: nn.Conv2d, m_in: _Map, m_out: _Map) -> None:
    src_out, src_in = torch.from_numpy(m_out.src), torch.from_numpy(m_in.src)
    share = torch.from_numpy(m_in.share).to(old.weight.dtype)
    new.weight.copy_(old.weight[src_out][:, src_in] * share[None, :, None, None])
    if old.bias is not None:
        new.bias.copy_(old.bias[src_out])
