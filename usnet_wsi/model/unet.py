"""The U-Net backbone: six 2x down-sampling levels, a bottleneck, six up-sampling levels.

For a 300x300 input the levels are 300, 150, 75, 38, 19, 10 and 5 pixels (ceil-mode pooling).
The decoder's features at levels 3, 4 and 5 (38, 19, 10 px) feed the detection head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from usnet_wsi.model.inference import up_concat_conv
from usnet_wsi.model.spec import ModelSpec


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling in ceil mode. At inference on the CPU with even sides it takes the
    maximum of the four strided quarter views instead: the same numbers, about 1.6x faster
    than `max_pool2d` (which also computes the argmax indices)."""
    h, w = x.shape[-2:]
    if torch.is_grad_enabled() or x.device.type != "cpu" or h % 2 or w % 2:
        return F.max_pool2d(x, 2, ceil_mode=True)
    return torch.maximum(torch.maximum(x[..., ::2, ::2], x[..., 1::2, ::2]),
                         torch.maximum(x[..., ::2, 1::2], x[..., 1::2, 1::2]))


def conv_block(c_in: int, c_out: int, n_convs: int) -> nn.Sequential:
    """n_convs x (3x3 conv, batch norm, ReLU)."""
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """Returns the segmentation logits and the decoder feature map of every level."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        w, n = spec.width, spec.convs_per_block
        self.enc = nn.ModuleList([conv_block(3, w(0), n)] +
                                 [conv_block(w(i - 1), w(i), n) for i in range(1, spec.depth + 1)])
        self.bottleneck = conv_block(w(spec.depth), w(spec.depth), n)
        self.dec = nn.ModuleList([conv_block(w(i + 1) + w(i), w(i), n) for i in range(spec.depth)])
        self.seg_head = nn.Conv2d(w(0), spec.seg_classes, 1)

    def concat_blocks(self) -> list[tuple[nn.Sequential, int, bool]]:
        """The decoder blocks, each fed cat([up-sampled map, skip]): the block, the up-sampled
        map's channels, and that it comes first."""
        return [(block, self.spec.width(i + 1), True) for i, block in enumerate(self.dec)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, block in enumerate(self.enc):
            if i > 0:
                x = max_pool2(x)
            x = block(x)
            skips.append(x)
        x = self.bottleneck(x)
        decoded: list[torch.Tensor] = [x] * (self.spec.depth + 1)
        decoded[self.spec.depth] = x
        for i in reversed(range(self.spec.depth)):
            x = up_concat_conv(self.dec[i], x, skips[i])
            decoded[i] = x
        return self.seg_head(x), decoded
