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
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
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


def concat_conv(block: nn.Sequential, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """block(cat([a, b], dim=1)); when the block starts with a `ConcatConvReLU` the two parts
    go to it as they are."""
    head = block[0]
    if not isinstance(head, ConcatConvReLU):
        return block(torch.cat([a, b], dim=1))
    x = head.forward_pair(a, b)
    for layer in list(block)[1:]:
        x = layer(x)
    return x


def split_concat_convs(model: nn.Module) -> nn.Module:
    """Replace the first layer of every block that a model's `concat_blocks()` names (a block
    fed a channel concatenation, with the first part's channel count) by a ConcatConvReLU, where
    that layer is a ConvReLU; in place, returns the model."""
    for module in list(model.modules()):
        for block, split in getattr(module, "concat_blocks", lambda: [])():
            if type(block[0]) is ConvReLU:
                block[0] = ConcatConvReLU(block[0].conv, split)
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
