"""The inference copy of a model: folded batch norm, conv + ReLU fused on the CPU, same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.tiny import tiny_model
from usnet_wsi.model import inference
from usnet_wsi.model.inference import (ConcatConvReLU, ConvReLU, UpConcatConvReLU,
                                       fold_batch_norm, fuse_conv_relu, fused_relu_available,
                                       inference_copy, phase_weights, up_concat_conv, upsample2)

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
    layer = ConcatConvReLU(copy.deepcopy(conv), c_a)
    with torch.inference_mode(), _autocast(dtype):
        want = torch.relu(conv(torch.cat([a, b], dim=1)))
        got = layer.forward_pair(a, b)
        pair = layer.forward_pair(a[:2], b[:2])
    assert got.dtype == (dtype or torch.float32) and (got >= 0).all() and (got > 0).any()
    assert got.shape == want.shape and _close(got, want, dtype)
    assert torch.equal(pair, got[:2])                               # batch-size independent
    with torch.enable_grad():                                       # training: the plain layer
        assert torch.equal(layer.forward_pair(a, b), torch.relu(conv(torch.cat([a, b], dim=1))))
    with pytest.raises(ValueError):
        ConcatConvReLU(conv, c_a + c_b)


def test_phase_weights_are_the_convolution_after_2x_upsampling_in_float64() -> None:
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    small = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    want = torch.nn.functional.conv2d(upsample2(small, (18, 22)), weight, padding=1)
    four = torch.nn.functional.conv2d(small, phase_weights(weight), padding=1)
    got = four.view(2, 2, 2, 5, 9, 11).permute(0, 3, 4, 1, 5, 2).reshape(2, 5, 18, 22)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert torch.allclose(got[inner], want[inner], rtol=0, atol=1e-12)   # the borders differ
    assert not torch.allclose(got, want, rtol=0, atol=1e-6)


@needs_fused
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("up_first", [True, False])
@pytest.mark.parametrize("hw", [(9, 8), (2, 2), (24, 24), (1, 3)])
def test_the_upsampled_concatenation_conv_is_the_conv_of_the_concatenation(
        dtype, up_first: bool, hw: tuple[int, int], monkeypatch) -> None:
    monkeypatch.setattr(inference, "PHASE_MIN_PX", 4)     # the phase path on small maps too
    phased, interleave = [], inference._interleave
    monkeypatch.setattr(inference, "_interleave", lambda four: phased.append(1) or interleave(four))
    torch.manual_seed(hw[0] + 7 * up_first)
    c_up, c_skip = 6, 4
    split = c_up if up_first else c_skip
    conv = nn.Conv2d(c_up + c_skip, 5, 3, padding=1).eval()
    small = torch.randn(3, c_up, *hw).contiguous(memory_format=CL)
    skip = torch.randn(3, c_skip, 2 * hw[0], 2 * hw[1]).contiguous(memory_format=CL)
    block = nn.Sequential(UpConcatConvReLU(copy.deepcopy(conv), split, up_first),
                          nn.Conv2d(5, 2, 1).eval())
    with torch.inference_mode(), _autocast(dtype):
        up = upsample2(small, skip.shape[-2:])
        want = block[1](torch.relu(conv(torch.cat([up, skip] if up_first else [skip, up], 1))))
        got = up_concat_conv(block, small, skip, up_first)
        pair = up_concat_conv(block, small[:2], skip[:2], up_first)
    assert got.dtype == (dtype or torch.float32) and got.shape == want.shape
    assert _close(got, want, dtype)                                   # borders included
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(pair, got[:2])                                 # batch-size independent
    assert bool(phased) == (min(hw) >= 2)                   # the phase path where it applies
    with torch.enable_grad():                                         # training: the plain block
        plain = up_concat_conv(block, small, skip, up_first)
        assert torch.equal(plain, block(torch.cat([up, skip] if up_first else [skip, up], 1)))


@needs_fused
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("phase_min_px", [inference.PHASE_MIN_PX, 4])
def test_the_inference_copy_computes_what_the_folded_model_computes(dtype, phase_min_px,
                                                                     monkeypatch) -> None:
    monkeypatch.setattr(inference, "PHASE_MIN_PX", phase_min_px)   # 4: phases on every level
    model = tiny_model(seed=3)
    plain = fold_batch_norm(copy.deepcopy(model)).eval().to(memory_format=CL)
    fast = inference_copy(model, torch.device("cpu"))
    n_fused = sum(isinstance(m, ConvReLU) for m in fast.modules())
    assert n_fused == sum(isinstance(m, nn.ReLU) for m in plain.modules()) > 10
    n_split = sum(isinstance(m, UpConcatConvReLU) for m in fast.modules())
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
