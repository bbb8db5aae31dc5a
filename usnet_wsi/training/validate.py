"""Validation during training: segment each validation image, score with usnet_wsi.metrics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from usnet_wsi.model.bundle import Thresholds
from usnet_wsi.model.usnet import USNet
from usnet_wsi.predict import ModelPredictor, predict_image
from usnet_wsi.training.data import Annotated

METRIC_KEYS = ("aji", "pq", "dice", "det_f1")


def validate(model: USNet, data: list[Annotated], thresholds: Thresholds, dev: torch.device,
             mpp: float = 0.25) -> dict[str, float]:
    """Mean AJI, PQ, Dice and detection F1 over the validation images (per-image mean)."""
    from usnet_wsi.metrics import evaluate_pair
    if not data:
        return {}
    pred = ModelPredictor(model, thresholds, dev)
    rows = []
    for a in data:
        labels, scores = predict_image(pred, a.rgb)
        rows.append(evaluate_pair(labels, a.labels, scores, mpp))
    model.train()
    return {k: float(np.mean([r[k] or 0.0 for r in rows])) for k in METRIC_KEYS}


def tune_thresholds(model: USNet, data: list[Annotated], base: Thresholds, dev: torch.device,
                    report=None) -> tuple[Thresholds, dict[str, float]]:
    """Coordinate search on validation AJI: detection score x NMS IoU, then the smallest
    nucleus area. Returns the best thresholds and their validation metrics."""
    best, best_m = base, validate(model, data, base, dev)
    grids = [[{"score": s, "nms": n} for s in (0.25, 0.35, 0.45, 0.55) for n in (0.3, 0.45)],
             [{"min_area_px": a} for a in (12, 30, 50)]]
    for grid in grids:
        start = best
        for change in grid:
            thr = replace(start, **change)
            if thr == best:
                continue
            m = validate(model, data, thr, dev)
            if report:
                report(f"  {change}: AJI {m['aji']:.4f} PQ {m['pq']:.4f}")
            if m["aji"] > best_m["aji"]:
                best, best_m = thr, m
    return best, best_m
