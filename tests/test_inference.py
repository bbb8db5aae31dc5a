"""The inference copy of a model: folded batch norm, conv + ReLU fused on the CPU, same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.tiny import tiny_model
from usnet_wsi.model.inference import (ConcatConvReLU, ConvReLU, concat_conv, fold_batch_norm,
                                       fuse_conv_relu, fused_relu_available, inference_copy)

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


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> bool:
    """Equal up to the other summation order and extra rounding of a split concatenation: a few
    bfloat16 units in the last place, or 1e-5 in float32, relative to the output's scale."""
    tol = 4 * 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    scale = want.float().abs().max().clamp_min(1.0)
    return bool(((got.float() - want.float()).abs() <= tol * scale).all())


@needs_fused
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("c_a,c_b", [(20, 10), (16, 32), (3, 1)])
def test_a_split_concatenation_conv_is_the_conv_of_the_concatenation(dtype, c_a: int,
                                                                     c_b: int) -> None:
    torch.manual_seed(c_a + c_b)
    conv = nn.Conv2d(c_a + c_b, 7, 3, padding=1).eval()
    a = torch.randn(4, c_a, 33, 30).contiguous(memory_format=CL)
    b = torch.randn(4, c_b, 33, 30).contiguous(memory_format=CL)
    block = nn.Sequential(ConcatConvReLU(copy.deepcopy(conv), c_a), nn.Conv2d(7, 2, 1).eval())
    with torch.inference_mode(), _autocast(dtype):
        want = block[1](torch.relu(conv(torch.cat([a, b], dim=1))))
        first = block[0].forward_pair(a, b)
        got = concat_conv(block, a, b)
        pair = concat_conv(block, a[:2], b[:2])
    assert first.dtype == (dtype or torch.float32) and (first >= 0).all() and (first > 0).any()
    assert got.shape == want.shape and _close(got, want, dtype)
    assert torch.equal(pair, got[:2])                               # batch-size independent
    with torch.enable_grad():                                       # training: the plain layer
        plain = concat_conv(block, a, b)
        assert torch.equal(plain, block(torch.cat([a, b], dim=1)))
    with pytest.raises(ValueError):
        ConcatConvReLU(conv, c_a + c_b)


@needs_fused
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_inference_copy_computes_what_the_folded_model_computes(dtype) -> None:
    model = tiny_model(seed=3)
    plain = fold_batch_norm(copy.deepcopy(model)).eval().to(memory_format=CL)
    fast = inference_copy(model, torch.device("cpu"))
    n_fused = sum(isinstance(m, ConvReLU) for m in fast.modules())
    assert n_fused == sum(isinstance(m, nn.ReLU) for m in plain.modules()) > 10
    n_split = sum(isinstance(m, ConcatConvReLU) for m in fast.modules())
    assert n_split == model.spec.depth + 1                # every decoder block and the refiner
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in fast.modules())
    x = torch.randn(4, 3, 96, 96).contiguous(memory_format=CL)
    with torch.inference_mode(), _autocast(dtype):
        want, got = plain(x), fast(x)
        pair = fast(x[:2])
        crops = torch.randn(5, 6, 48, 48).contiguous(memory_format=CL)
        assert _close(fast.refiner(crops), plain.refiner(crops), dtype)
    for w, g, p in zip(want, got, pair):
        assert _close(g, w, dtype)
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
