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
             mpp: float = 0.25, tile_px: int | None = None, tta: str = "none"
             ) -> dict[str, float]:
    """AJI, PQ, Dice and detection F1 on the validation images, through the same path as
    `segment` (with `tile_px`, the bundle's inference tile side, as `segment` runs it):
    per-image means per dataset, and their mean over datasets (so a dataset of many small
    tiles does not outweigh one of a few large images). With several datasets the per-dataset
    values are also returned, as "DATASET/aji" and so on."""
    from usnet_wsi.metrics import evaluate_pair
    if not data:
        return {}
    pred = ModelPredictor(model, thresholds, dev, tile_px=tile_px, tta=tta)
    rows: dict[str, list[dict]] = {}
    for a in data:
        labels, scores = predict_image(pred, a.rgb)
        rows.setdefault(a.dataset, []).append(evaluate_pair(labels, a.labels, scores, mpp))
    model.train()
    per = {ds: {k: float(np.mean([r[k] or 0.0 for r in rs])) for k in METRIC_KEYS}
           for ds, rs in rows.items()}
    out = {k: float(np.mean([m[k] for m in per.values()])) for k in METRIC_KEYS}
    if len(per) > 1:
        out.update({f"{ds}/{k}": v for ds, m in sorted(per.items()) for k, v in m.items()})
    return out


def tune_thresholds(model: USNet, data: list[Annotated], base: Thresholds, dev: torch.device,
                    report=None, tile_px: int | None = None
                    ) -> tuple[Thresholds, dict[str, float]]:
    """Coordinate search on validation AJI: detection score x NMS IoU, then the smallest
    nucleus area, then the agreement with the segmentation map. Returns the best thresholds
    and their validation metrics."""
    best, best_m = base, validate(model, data, base, dev, tile_px=tile_px)
    grids = [[{"score": s, "nms": n} for s in (0.25, 0.35, 0.45, 0.55) for n in (0.3, 0.45)],
             [{"min_area_px": a} for a in (12, 30, 50)],
             [{"seg_agreement": a} for a in (0.0, 0.3, 0.45)]]
    for grid in grids:
        start = best
        for change in grid:
            thr = replace(start, **change)
            if thr == best:
                continue
            m = validate(model, data, thr, dev, tile_px=tile_px)
            if report:
                report(f"  {change}: AJI {m['aji']:.4f} PQ {m['pq']:.4f}")
            if m["aji"] > best_m["aji"]:
                best, best_m = thr, m
    return best, best_m
