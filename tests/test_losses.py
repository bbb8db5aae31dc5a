"""US-Net losses against hand-computed values (paper eq. 1-6)."""

import math

import pytest
import torch

from usnet_wsi import losses


def test_smooth_l1_piecewise():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    assert torch.allclose(losses.smooth_l1(x), torch.tensor([1.5, 0.125, 0.0, 0.125, 0.5, 2.5]))


def test_seg_l1_is_mean_absolute_error():
    pred = torch.tensor([[[[0.2, 0.9], [0.0, 1.0]]]])
    gt = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert math.isclose(float(losses.seg_l1(pred, gt)), (0.2 + 0.1 + 1.0 + 0.0) / 4, rel_tol=1e-6)


def test_eta_from_segmentation_output():
    fg = torch.zeros(1, 4, 4, dtype=torch.bool)
    fg[0, :1, :] = True                              # 4 of 16 pixels predicted nucleus
    eta_bg, eta_fg = losses.eta_weights(fg)
    assert math.isclose(float(eta_fg), math.sqrt(16 / 4), rel_tol=1e-6)
    assert math.isclose(float(eta_bg), math.sqrt(16 / 12), rel_tol=1e-6)
    eta_bg, eta_fg = losses.eta_weights(torch.zeros(1, 4, 4, dtype=torch.bool))
    assert math.isfinite(float(eta_fg)) and math.isclose(float(eta_fg), 4.0)


def test_focal_conf_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0), -1.0]])   # p = 0.5, 0.75, sigmoid(-1)
    labels = torch.tensor([[1, 0, -1]])                    # positive, negative, ignored
    eta_bg, eta_fg = torch.tensor([2.0]), torch.tensor([3.0])
    # positive: -3 * (1-0.5)^2 * log(0.5); negative: pt = 0.25 -> -2 * 0.75^2 * log(0.25)
    want = -3 * 0.25 * math.log(0.5) - 2 * 0.5625 * math.log(0.25)
    got = losses.focal_conf(logits, labels, eta_bg, eta_fg)
    assert math.isclose(float(got), want / 1, rel_tol=1e-5)


def test_image_without_nuclei_zero_loc_finite_conf():
    logits = torch.randn(2, 50)
    labels = torch.zeros(2, 50, dtype=torch.long)
    eta_bg, eta_fg = losses.eta_weights(torch.zeros(2, 8, 8, dtype=torch.bool))
    conf = losses.focal_conf(logits, labels, eta_bg, eta_fg)
    assert torch.isfinite(conf) and conf > 0
    loc = losses.loc_loss(torch.randn(2, 50, 4, requires_grad=True), torch.zeros(2, 50, 4), labels)
    assert loc.item() == 0.0
    loc.backward()   # still differentiable


def test_loc_loss_averages_over_positives():
    pred = torch.zeros(1, 3, 4)
    target = torch.tensor([[[0.5, 0, 0, 0], [2.0, 0, 0, 0], [9.0, 9, 9, 9]]])
    labels = torch.tensor([[1, 1, 0]])
    assert math.isclose(float(losses.loc_loss(pred, target, labels)), (0.125 + 1.5) / 2)


def test_total_loss_weights():
    got = losses.usnet_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0))
    assert math.isclose(float(got), 1 + 1 * 2 + 0.1 * 3, rel_tol=1e-6)


def test_refine_loss_prefers_the_right_mask():
    target = torch.zeros(1, 1, 4, 4)
    target[..., 1:3, 1:3] = 1
    good = losses.refine_loss(target * 20 - 10, target)
    bad = losses.refine_loss(-(target * 20 - 10), target)
    assert float(good) < 0.01 < float(bad)
    assert float(losses.refine_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4))) == 0.0


@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_forward_returns_raw_tensors(recipe):
    from usnet_wsi.model import USNet, recipe_spec
    spec = recipe_spec(recipe)
    model = USNet(spec).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 300, 300))
    assert out.seg_logits.shape == (1, spec.seg_classes, 300, 300)
    assert out.conf_logits.shape == (1, 7620) and out.loc.shape == (1, 7620, 4)
