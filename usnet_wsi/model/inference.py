"""The inference copy of a model: batch norm folded into the convolutions and, on the CPU, each
convolution fused with the ReLU after it.

A 3x3 convolution followed by a separate ReLU reads and writes every activation twice; on a CPU
the network's full-resolution layers are bound by memory, not arithmetic, so the second pass is
a large share of the forward pass. oneDNN applies the ReLU to each output while it is still in
registers (a "post-op"); the numbers are the same bits as convolution then ReLU, since rounding
to bfloat16 never changes a value's sign.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                 else x.dtype)
        if x.device.type != "cpu" or dtype not in self._FUSED_DTYPES or torch.is_grad_enabled():
            return torch.relu(self.conv(x))
        c = self.conv
        weight, bias = self._cast(dtype)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), weight, bias, list(c.padding), list(c.stride), list(c.dilation),
            c.groups, "relu", [None], "")


def fuse_conv_relu(module: nn.Module) -> nn.Module:
    """Replace every Conv2d directly followed by a ReLU (in a Sequential) with a ConvReLU
    (in place; returns the module)."""
    return _fuse_pairs(module, nn.Conv2d, nn.ReLU, lambda conv, _relu: ConvReLU(conv))


def inference_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` for inference on `device`: evaluation mode, batch norm folded,
    channels-last layout, and conv + ReLU fused where the CPU kernels allow it."""
    out = fold_batch_norm(copy.deepcopy(model)).to(device).eval()
    if device.type == "cpu" and fused_relu_available():
        fuse_conv_relu(out)
    return out.to(memory_format=torch.channels_last)
