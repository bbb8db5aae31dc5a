"""US-Net losses (paper eq. 1-6) as pure functions.

L = L_conf + alpha * L_loc + beta * L_seg with alpha = 1, beta = 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_l1(x: torch.Tensor) -> torch.Tensor:
    """Eq. 6: 0.5 x^2 where |x| < 1, |x| - 0.5 elsewhere (element-wise)."""
    ax = x.abs()
    return torch.where(ax < 1, 0.5 * x * x, ax - 0.5)


def seg_l1(seg_probs: torch.Tensor, target_onehot: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean absolute error between segmentation output and ground truth, averaged over
    the M pixels (and the batch); for several classes the per-pixel error is summed over them."""
    return (seg_probs - target_onehot).abs().sum(dim=1).mean()


def eta_weights(pred_foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: eta_c = sqrt(S_all / S_hat_c) per image, from the (detached) segmentation output.

    pred_foreground: bool (B, H, W). Returns (eta_background, eta_nucleus), each (B,). A class the
    output never predicts counts as one pixel, so eta stays finite."""
    s_all = pred_foreground[0].numel()
    s_fg = pred_foreground.flatten(1).sum(dim=1).float().clamp(min=1)
    s_bg = (s_all - pred_foreground.flatten(1).sum(dim=1)).float().clamp(min=1)
    return torch.sqrt(s_all / s_bg), torch.sqrt(s_all / s_fg)


def focal_conf(logits: torch.Tensor, labels: torch.Tensor, eta_bg: torch.Tensor,
               eta_fg: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Eq. 3: -eta_c (1 - c_hat)^gamma log(c_hat), c_hat = probability of the true class.

    logits (B, A); labels (B, A) with 1 nucleus, 0 background, -1 ignored. Summed over anchors,
    divided by the number of positive anchors (at least 1), averaged over the batch."""
    target = labels.clamp(min=0).float()
    log_p = F.logsigmoid(logits)
    log_q = F.logsigmoid(-logits)
    log_pt = torch.where(target > 0, log_p, log_q)
    pt = log_pt.exp()
    eta = torch.where(target > 0, eta_fg[:, None], eta_bg[:, None])
    loss = -eta * (1 - pt) ** gamma * log_pt * (labels >= 0).float()
    n_pos = (labels > 0).sum(dim=1).clamp(min=1).float()
    return (loss.sum(dim=1) / n_pos).mean()


def loc_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5: smooth-L1 over (x, y, w, h) offsets of positive anchors, averaged over positives
    (N = number of positives in the batch); zero when there is none."""
    pos = labels > 0
    if not pos.any():
        return pred.sum() * 0.0
    return smooth_l1(pred[pos] - target[pos]).sum() / pos.sum()


def refine_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Refinement masks: binary cross-entropy plus soft Dice (mean over crops)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def usnet_loss(l_conf: torch.Tensor, l_loc: torch.Tensor, l_seg: torch.Tensor,
               alpha: float = 1.0, beta: float = 0.1) -> torch.Tensor:
    """Eq. 1."""
    return l_conf + alpha * l_loc + beta * l_seg
