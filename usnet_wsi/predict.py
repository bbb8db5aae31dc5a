"""The model side of inference: a Predictor turns a batch of RGB tiles into nuclei masks.

The engine talks only to the `Predictor` protocol; `BundlePredictor` runs US-Net from a weights
bundle (CUDA with AMP when available, CPU otherwise). `predict_image` segments an in-memory image
(used for validation during training); slides go through `usnet_wsi.engine`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from usnet_wsi.anchors import make_anchors
from usnet_wsi.errors import UsageError
from usnet_wsi.instances import TileNuclei, tile_instances
from usnet_wsi.model.bundle import Bundle, Thresholds, load_bundle
from usnet_wsi.model.usnet import USNet

__all__ = ["TileNuclei", "Predictor", "BundlePredictor", "load_predictor", "resolve_device",
           "predict_image"]


class Predictor(Protocol):
    name: str
    sha256: str
    device: str
    tile_px: int
    halo_px: int
    mpp: float

    def predict(self, tiles: np.ndarray, meta: Sequence[Any]) -> list[TileNuclei]: ...


def resolve_device(device: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device (UsageError when unavailable)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here",
                             "use --device cpu or --device auto")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s)", "pick an index below that, or --device auto")
        return dev
    raise UsageError(f"--device {device!r} is not a device", "use auto, cpu, cuda or cuda:N")


class ModelPredictor:
    """Runs an in-memory US-Net model (training validation and bundles alike)."""

    def __init__(self, model: USNet, thresholds: Thresholds, device: torch.device,
                 name: str = "in-memory", sha256: str = "") -> None:
        self.model = model.to(device).eval()
        self.thresholds = thresholds
        self.torch_device = device
        self.device = str(device)
        self.name, self.sha256 = name, sha256
        spec = model.spec
        self.tile_px, self.halo_px, self.mpp = spec.input_size, spec.halo_px, spec.mpp
        self.anchors = make_anchors(spec).to(device)

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray, meta: Sequence[Any] = ()) -> list[TileNuclei]:
        if len(tiles) == 0:
            return []
        x = self.model.normalise(torch.from_numpy(np.ascontiguousarray(tiles)).to(self.torch_device))
        amp = self.torch_device.type == "cuda"
        with torch.autocast(self.torch_device.type, enabled=amp):
            out = self.model(x)
        return tile_instances(self.model, x, out, self.anchors, self.thresholds)


class BundlePredictor(ModelPredictor):
    """A ModelPredictor built from a verified weights bundle."""

    def __init__(self, bundle: Bundle, device: torch.device) -> None:
        super().__init__(bundle.build_model(), bundle.thresholds, device, bundle.name,
                         bundle.sha256)
        self.bundle = bundle


def load_predictor(weights: str | Path | None = None, device: str = "auto") -> BundlePredictor:
    """The default bundle (weights=None) or the bundle at `weights`, on the chosen device."""
    dev = resolve_device(device)
    return BundlePredictor(load_bundle(weights), dev)


def predict_image(predictor: Predictor, rgb: np.ndarray, batch_size: int = 8) -> tuple[
        np.ndarray, dict[int, float]]:
    """Segment an in-memory RGB image at the model's resolution.

    Uses the same tile plan and ownership rule as slides (usnet_wsi.tiling: cores partition
    the image, a nucleus belongs to the tile whose core holds its centroid; outside the image is
    white) and paints in score order without overlaps. Returns (uint32 labels, {label: score})."""
    from usnet_wsi.tiling import owned, plan_tiles
    h, w = rgb.shape[:2]
    plan = plan_tiles((0, 0, w, h), predictor.mpp, predictor.mpp, predictor.tile_px,
                      predictor.halo_px)
    pad = plan.halo_l0 + plan.read_size_l0
    padded = np.full((h + 2 * pad, w + 2 * pad, 3), 255, np.uint8)
    padded[pad:pad + h, pad:pad + w] = rgb
    found: list[tuple[float, int, int, np.ndarray]] = []
    for i in range(0, len(plan.tiles), batch_size):
        batch = plan.tiles[i:i + batch_size]
        tiles = np.stack([padded[t.read_l0[1] + pad:t.read_l0[3] + pad,
                                 t.read_l0[0] + pad:t.read_l0[2] + pad] for t in batch])
        for tile, nuc in zip(batch, predictor.predict(tiles, batch)):
            x0, y0 = tile.read_l0[:2]
            for m, (mx, my), s in zip(nuc.masks, nuc.origins, nuc.scores):
                ys, xs = np.nonzero(m)
                centre = np.array([[xs.mean() + mx + x0, ys.mean() + my + y0]])
                if owned(tile, centre)[0]:
                    found.append((float(s), int(mx + x0), int(my + y0), m))
    return _paint_labels(found, h, w)


def _paint_labels(found: list, h: int, w: int) -> tuple[np.ndarray, dict[int, float]]:
    labels = np.zeros((h, w), np.uint32)
    scores: dict[int, float] = {}
    for s, x0, y0, m in sorted(found, key=lambda f: -f[0]):
        ys, xs = np.nonzero(m)
        ys, xs = ys + y0, xs + x0
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        ys, xs = ys[ok], xs[ok]
        free = labels[ys, xs] == 0
        if free.sum() < 0.5 * max(len(ys), 1) or free.sum() == 0:
            continue
        lab = len(scores) + 1
        labels[ys[free], xs[free]] = lab
        scores[lab] = s
    return labels, scores
