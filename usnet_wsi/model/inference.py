"""The inference copy of a model: batch norm folded into the convolutions and, on the CPU, each
convolution fused with the ReLU after it.

A 3x3 convolution followed by a separate ReLU reads and writes every activation twice; on a CPU
the network's full-resolution layers are bound by memory, not arithmetic, so the second pass is
a large share of the forward pass. oneDNN applies the ReLU to each output while it is still in
registers (a "post-op"); the numbers are the same bits as convolution then ReLU, since rounding
to bfloat16 never changes a value's sign.

A convolution of a channel concatenation (the U-Net decoder's upsampled map and skip connection,
the refiner's two levels) is run as two convolutions on the parts instead, the first result
added to the second one's accumulators by another post-op: the concatenated copy is never made
(the U-Net forward pass is about 1.24x faster on a CPU).

When one part is the other level's map up-sampled 2x (bilinear, as `F.interpolate` with
align_corners=False), the convolution of the up-sampled part is computed on the small map
instead: each of the four output phases (even or odd row and column) of "3x3 convolution after
2x bilinear up-sampling" is itself a 3x3 convolution of the small map, with weights that are
fixed sums of the layer's weights. One convolution with four times the output channels makes the
four phases, which are interleaved into the full-size accumulator; the two rows and columns at
each border (where the up-sampling clamps and the convolution pads with zeros) are computed as
before, on thin strips. The up-sampled map (the largest tensor of the pass) is never made.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _fuse_pairs(module: nn.Module, first: type, second: type,
                combine: Callable[[nn.Module, nn.Module], nn.Module]) -> nn.Module:
    """Replace every `first` layer directly followed by a `second` layer (in a Sequential,
    at any depth) with combine(first, second); in place, returns the module."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Sequential):
            layers, out = list(child), []
            while layers:
                layer = layers.pop(0)
                if isinstance(layer, first) and layers and isinstance(layers[0], second):
                    layer = combine(layer, layers.pop(0))
                out.append(layer)
            child = nn.Sequential(*out)
            setattr(module, name, child)
        _fuse_pairs(child, first, second, combine)
    return module


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every Conv2d directly followed by a BatchNorm2d (in a Sequential) into one Conv2d
    (inference only; the module is changed in place and returned)."""
    return _fuse_pairs(module, nn.Conv2d, nn.BatchNorm2d,
                       lambda conv, bn: fuse_conv_bn_eval(conv.eval(), bn.eval()))


def fused_relu_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution kernels for the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_convolution_pointwise")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of x computes in: autocast's on x's device when autocast is on
    there, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class ConvReLU(nn.Module):
    """ReLU(conv(x)) in one oneDNN call on the CPU, in the autocast dtype when autocast is on
    (bfloat16) or the input's (float32); any other device or dtype runs conv, then ReLU."""

    _FUSED_DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self._weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights in `dtype`, cast once (an inference copy's weights never change)."""
        if dtype not in self._weights:
            c = self.conv
            self._weights[dtype] = (
                c.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last),
                None if c.bias is None else c.bias.detach().to(dtype))
        return self._weights[dtype]

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype of the fused oneDNN path for input x, or None where it does not apply."""
        dtype = compute_dtype(x)
        if x.device.type != "cpu" or dtype not in self._FUSED_DTYPES or torch.is_grad_enabled():
            return None
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._fused_dtype(x)
        if dtype is None:
            return torch.relu(self.conv(x))
        c = self.conv
        weight, bias = self._cast(dtype)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), weight, bias, list(c.padding), list(c.stride), list(c.dilation),
            c.groups, "relu", [None], "")


class ConcatConvReLU(ConvReLU):
    """ReLU(conv(cat([a, b], dim=1))), where `a` has `split` channels. On the CPU's fused path
    `forward_pair(a, b)` convolves b with its part of the weights, then a with the other part,
    the bias, the first result added in place and the ReLU, all in oneDNN: no concatenated copy.
    Against the plain layer, the part sum is rounded once more to the compute dtype (about one
    bfloat16 unit in the last place). Elsewhere it concatenates and runs the plain layer."""

    def __init__(self, conv: nn.Conv2d, split: int) -> None:
        super().__init__(conv)
        if not 0 < split < conv.in_channels or conv.groups != 1:
            raise ValueError(f"cannot split {conv.in_channels} input channels at {split}")
        self.split = split
        self._parts: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast_parts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._parts:
            w = self._cast(dtype)[0]
            self._parts[dtype] = tuple(p.contiguous(memory_format=torch.channels_last)
                                       for p in (w[:, :self.split], w[:, self.split:]))
        return self._parts[dtype]

    def forward_pair(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = self._fused_dtype(a)
        if dtype is None:
            return self.forward(torch.cat([a, b], dim=1))
        c = self.conv
        wa, wb = self._cast_parts(dtype)
        geometry = (list(c.padding), list(c.stride), list(c.dilation), c.groups)
        acc = torch.ops.mkldnn._convolution_pointwise(b.to(dtype), wb, None, *geometry, "none",
                                                       [None], "")
        return torch.ops.mkldnn._convolution_pointwise_(acc, a.to(dtype), wa, self._cast(dtype)[1],
                                                        *geometry, "add", 1.0, "relu", [None], "")


# Weights of 2x bilinear up-sampling (align_corners=False) seen by a 3x3 convolution: row a of
# a phase's matrix is the small map's offset a - 1, column b the kernel tap b - 1. An even output
# row 2i reads up-sampled rows 2i-1, 2i, 2i+1 = (3x[i-1] + x[i]) / 4, (x[i-1] + 3x[i]) / 4,
# (3x[i] + x[i+1]) / 4; an odd row 2i+1 reads rows 2i, 2i+1, 2i+2.
_PHASES = (((0.75, 0.25, 0.0), (0.25, 0.75, 0.75), (0.0, 0.0, 0.25)),
           ((0.25, 0.0, 0.0), (0.75, 0.75, 0.25), (0.0, 0.25, 0.75)))


PHASE_MIN_PX = 64 * 64   # small-map pixels from which the phase convolution is used


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """(4 * out, in, 3, 3) weights, phase-major (row phase, column phase, output channel): the
    3x3 convolution of a small map with them gives the four phases of `weight`'s 3x3
    convolution of the map up-sampled 2x, away from the borders. In float64."""
    m = torch.tensor(_PHASES, dtype=torch.float64)
    k = torch.einsum("pya,qxb,oiab->pqoiyx", m, m, weight.detach().double())
    return k.reshape(4 * weight.shape[0], *weight.shape[1:])


def upsample2(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear up-sampling to `size`, as the networks do it."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UpConcatConvReLU(ConcatConvReLU):
    """A ConcatConvReLU whose block is fed the concatenation of a map up-sampled 2x and a skip
    map. `forward_up(small, skip)` never makes the up-sampled map where the phase convolution
    applies (see the module's docstring); elsewhere it up-samples and concatenates."""

    def __init__(self, conv: nn.Conv2d, split: int, up_first: bool) -> None:
        super().__init__(conv, split)
        self.up_first = up_first
        self._phase: dict[torch.dtype, torch.Tensor] = {}

    def _up_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(phase weights of the up-sampled part, its plain weights, the skip part's weights)."""
        wa, wb = self._cast_parts(dtype)
        w_up, w_skip = (wa, wb) if self.up_first else (wb, wa)
        if dtype not in self._phase:
            w = self.conv.weight
            part = w[:, :self.split] if self.up_first else w[:, self.split:]
            self._phase[dtype] = phase_weights(part).to(dtype).contiguous(
                memory_format=torch.channels_last)
        return self._phase[dtype], w_up, w_skip

    def _phase_applies(self, small: torch.Tensor, skip: torch.Tensor) -> bool:
        """An exact 2x up-sampling of a 3x3 convolution's input, on a map large enough for the
        saving to outweigh the border strips (not the refiner's 24 px map)."""
        c = self.conv
        h, w = small.shape[-2:]
        return (min(h, w) >= 2 and h * w >= PHASE_MIN_PX
                and tuple(skip.shape[-2:]) == (2 * h, 2 * w)
                and (tuple(c.kernel_size), tuple(c.padding)) == ((3, 3), (1, 1))
                and (tuple(c.stride), tuple(c.dilation)) == ((1, 1), (1, 1)))

    def forward_up(self, small: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        dtype = self._fused_dtype(small)
        if dtype is None or not self._phase_applies(small, skip):
            up = upsample2(small, skip.shape[-2:])
            return self.forward_pair(up, skip) if self.up_first else self.forward_pair(skip, up)
        phase, w_up, w_skip = self._up_weights(dtype)
        small = small.to(dtype)
        geometry = ([1, 1], [1, 1], [1, 1], 1)
        four = torch.ops.mkldnn._convolution_pointwise(small, phase, None, *geometry, "none",
                                                        [None], "")
        acc = _interleave(four)
        for dim in (2, 3):
            for last in (False, True):
                edge = _edge_of_up_conv(small, w_up, dim, last)
                acc.narrow(dim, acc.shape[dim] - 2 if last else 0, 2).copy_(edge)
        return torch.ops.mkldnn._convolution_pointwise_(
            acc, skip.to(dtype), w_skip, self._cast(dtype)[1], *geometry, "add", 1.0, "relu",
            [None], "")


def _interleave(four: torch.Tensor) -> torch.Tensor:
    """(N, 4C, H, W) phase-major -> (N, C, 2H, 2W) channels-last, phase (py, px) of pixel
    (i, j) at (2i + py, 2j + px)."""
    n, c4, h, w = four.shape
    c = c4 // 4
    nhwc = four.permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return nhwc.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def _edge_of_up_conv(small: torch.Tensor, weight: torch.Tensor, dim: int,
                     last: bool) -> torch.Tensor:
    """The first (or last) two rows (dim 2) or columns (dim 3) of conv3x3(up2(small)), computed
    on the strip of the up-sampled map they read: up-sampled rows 0-2 depend on small rows 0-1
    only (and the last three on the last two)."""
    n = small.shape[dim]
    part = small.narrow(dim, n - 2 if last else 0, 2)
    size = [2 * s for s in small.shape[-2:]]
    size[dim - 2] = 4
    strip = upsample2(part, size).narrow(dim, 1 if last else 0, 3)
    out = torch.ops.mkldnn._convolution_pointwise(
        strip.contiguous(memory_format=torch.channels_last), weight, None, [1, 1], [1, 1],
        [1, 1], 1, "none", [None], "")
    return out.narrow(dim, 1 if last else 0, 2)


def up_concat_conv(block: nn.Sequential, small: torch.Tensor, skip: torch.Tensor,
                   up_first: bool = True) -> torch.Tensor:
    """block(cat([up2(small), skip])) (or cat([skip, up2(small)]) when not `up_first`), up2 the
    bilinear up-sampling to skip's size; an `UpConcatConvReLU` at the block's head takes the
    two maps as they are."""
    head = block[0]
    if not isinstance(head, UpConcatConvReLU):
        up = upsample2(small, skip.shape[-2:])
        return block(torch.cat([up, skip] if up_first else [skip, up], dim=1))
    x = head.forward_up(small, skip)
    for layer in list(block)[1:]:
        x = layer(x)
    return x


def split_concat_convs(model: nn.Module) -> nn.Module:
    """Replace the first layer of every block that a model's `concat_blocks()` names (a block
    fed the concatenation of an up-sampled map and a skip map: the block, the first part's
    channels, whether the up-sampled map comes first) by an UpConcatConvReLU, where that layer
    is a ConvReLU; in place, returns the model."""
    for module in list(model.modules()):
        for block, split, up_first in getattr(module, "concat_blocks", lambda: [])():
            if type(block[0]) is ConvReLU:
                block[0] = UpConcatConvReLU(block[0].conv, split, up_first)
    return model


def fuse_conv_relu(module: nn.Module) -> nn.Module:
    """Replace every Conv2d directly followed by a ReLU (in a Sequential) with a ConvReLU
    (in place; returns the module)."""
    return _fuse_pairs(module, nn.Conv2d, nn.ReLU, lambda conv, _relu: ConvReLU(conv))


def inference_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` for inference on `device`: evaluation mode, batch norm folded,
    channels-last layout, and conv + ReLU fused (concatenations split) where the CPU kernels
    allow it."""
    out = fold_batch_norm(copy.deepcopy(model)).to(device).eval()
    if device.type == "cpu" and fused_relu_available():
        split_concat_convs(fuse_conv_relu(out))
    return out.to(memory_format=torch.channels_last)
