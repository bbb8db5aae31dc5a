"""US-Net: the U-Net backbone, its segmentation output, the detection head and the refiner."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from usnet_wsi.model.head import DetectionHead
from usnet_wsi.model.refine import RefineNet
from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.model.unet import UNet

# ImageNet-free normalisation: H&E RGB in [0, 1] centred on a typical stained-tissue grey.
_MEAN = (0.70, 0.55, 0.70)
_STD = (0.20, 0.22, 0.18)


class USNetOutput(NamedTuple):
    seg_logits: torch.Tensor     # (B, C, H, W)
    conf_logits: torch.Tensor    # (B, A)
    loc: torch.Tensor            # (B, A, 4) encoded offsets


class USNet(nn.Module):
    """forward(images) returns the same raw tensors in training and inference."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.unet = UNet(spec)
        self.head = DetectionHead(spec)
        self.refiner = RefineNet(spec)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) normalised float (channels-last strides).
        One new tensor, normalised in place."""
        x = images_uint8.permute(0, 3, 1, 2).to(torch.float32, copy=True)
        return x.div_(255.0).sub_(self.mean).div_(self.std)

    def forward(self, x: torch.Tensor) -> USNetOutput:
        seg, feats = self.unet(x)
        conf, loc = self.head(feats)
        return USNetOutput(seg, conf, loc)

    def seg_probs(self, seg_logits: torch.Tensor) -> torch.Tensor:
        if self.spec.seg_classes == 1:
            return torch.sigmoid(seg_logits)
        return torch.softmax(seg_logits, dim=1)

    def foreground(self, probs: torch.Tensor) -> torch.Tensor:
        """Nucleus probability (B, H, W) from the segmentation probabilities."""
        return probs[:, 0] if self.spec.seg_classes == 1 else 1 - probs[:, 0]

    def detector_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def unet_parameters(self) -> list[nn.Parameter]:
        return list(self.unet.parameters())

    def refiner_parameters(self) -> list[nn.Parameter]:
        return list(self.refiner.parameters())
