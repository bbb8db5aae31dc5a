"""SSD/RetinaNet-style detection head on three U-Net feature maps (38, 19, 10 px for 300 input)."""

from __future__ import annotations

import math

import torch
from torch import nn

from usnet_wsi.model.spec import ModelSpec


class DetectionHead(nn.Module):
    """Per level: a 3x3 conv tower, then 3x3 convs for k class logits and 4k box offsets."""

    def __init__(self, spec: ModelSpec, prior: float = 0.01) -> None:
        super().__init__()
        k, hw = spec.anchors_per_location, spec.head_width
        self.towers = nn.ModuleList()
        self.cls = nn.ModuleList()
        self.loc = nn.ModuleList()
        for level in spec.det_levels:
            self.towers.append(nn.Sequential(
                nn.Conv2d(spec.width(level), hw, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(hw, hw, 3, padding=1), nn.ReLU(inplace=True)))
            cls = nn.Conv2d(hw, k, 3, padding=1)
            nn.init.constant_(cls.bias, -math.log((1 - prior) / prior))  # RetinaNet prior
            self.cls.append(cls)
            self.loc.append(nn.Conv2d(hw, 4 * k, 3, padding=1))
        self.levels = spec.det_levels

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (conf_logits (B, A), loc_offsets (B, A, 4)) in anchor order."""
        confs, locs = [], []
        for i, level in enumerate(self.levels):
            t = self.towers[i](feats[level])
            b = t.shape[0]
            confs.append(self.cls[i](t).permute(0, 2, 3, 1).reshape(b, -1))
            locs.append(self.loc[i](t).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return torch.cat(confs, dim=1), torch.cat(locs, dim=1)
