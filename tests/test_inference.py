"""The inference copy of a model: folded batch norm, conv + ReLU fused on the CPU, same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.tiny import tiny_model
from usnet_wsi.model.inference import (ConvReLU, fold_batch_norm, fuse_conv_relu,
                                       fused_relu_available, inference_copy)

CL = torch.channels_last
needs_fused = pytest.mark.skipif(not fused_relu_available(),
                                 reason="this torch build has no oneDNN fused convolutions")


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)


@needs_fused
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("c_in,c_out,bias", [(3, 8, True), (12, 5, False), (16, 16, True)])
def test_fused_conv_relu_is_bitwise_conv_then_relu(dtype, c_in: int, c_out: int,
                                                   bias: bool) -> None:
    torch.manual_seed(c_in)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias).eval()
    x = torch.randn(3, c_in, 37, 41).contiguous(memory_format=CL)
    fused = ConvReLU(copy.deepcopy(conv))
    with torch.inference_mode(), _autocast(dtype):
        want = torch.relu(conv(x))
        got = fused(x)
    assert got.dtype == want.dtype == (dtype or torch.float32)
    assert torch.equal(got, want)
    assert (got >= 0).all() and (got > 0).any()


@needs_fused
def test_only_conv_relu_pairs_are_fused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 1),                       # no ReLU after it
                        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)),
                        nn.ReLU())                                # a ReLU after no conv
    fused = fuse_conv_relu(nn.Sequential(copy.deepcopy(net)))[0]     # inside a model
    kinds = [type(m).__name__ for m in fused]
    assert kinds == ["ConvReLU", "Conv2d", "Sequential", "ReLU"]
    assert [type(m).__name__ for m in fused[2]] == ["ConvReLU"]
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=CL)
    with torch.inference_mode():
        assert torch.equal(fused(x), net(x))


@needs_fused
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_inference_copy_computes_what_the_folded_model_computes(dtype) -> None:
    model = tiny_model(seed=3)
    plain = fold_batch_norm(copy.deepcopy(model)).eval().to(memory_format=CL)
    fast = inference_copy(model, torch.device("cpu"))
    n_fused = sum(isinstance(m, ConvReLU) for m in fast.modules())
    assert n_fused == sum(isinstance(m, nn.ReLU) for m in plain.modules()) > 10
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in fast.modules())
    x = torch.randn(4, 3, 96, 96).contiguous(memory_format=CL)
    with torch.inference_mode(), _autocast(dtype):
        want, got = plain(x), fast(x)
        pair = fast(x[:2])
        crops = torch.randn(5, 6, 48, 48).contiguous(memory_format=CL)
        assert torch.equal(fast.refiner(crops), plain.refiner(crops))
    for w, g, p in zip(want, got, pair):
        assert torch.equal(g, w)
        assert torch.equal(p, g[:2])          # independent of the batch size


def test_with_gradients_the_fused_layer_runs_conv_then_relu() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    fused = ConvReLU(conv)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    out = fused(x)
    out.sum().backward()
    assert x.grad is not None and torch.equal(out, torch.relu(conv(x)))


@pytest.mark.parametrize("dtype,layout", [(torch.float32, torch.contiguous_format),
                                          (torch.bfloat16, CL)])
@pytest.mark.parametrize("hw", [(48, 48), (556, 278), (139, 140)])
def test_inference_max_pooling_equals_max_pool2d(dtype, layout, hw) -> None:
    import torch.nn.functional as F
    from usnet_wsi.model.unet import max_pool2
    torch.manual_seed(hw[0])
    x = torch.randn(2, 5, *hw).to(dtype).contiguous(memory_format=layout)
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 2:6, 2:6] = 0.0                                  # ties
    want = F.max_pool2d(x, 2, ceil_mode=True)
    with torch.inference_mode():
        got = max_pool2(x)
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and got.isnan().sum() == 1
    assert got.is_contiguous(memory_format=layout)
