"""The model side of inference: a Predictor turns a batch of RGB tiles into nuclei label maps.

The engine talks only to the `Predictor` protocol; `BundlePredictor` runs US-Net from a weights
bundle (CUDA with AMP when available, CPU otherwise) followed by the batched instance step
(`usnet_wsi.instances`). `predict_image` segments an in-memory image through the same engine,
instance step, ownership and merge as slides (training validation and threshold tuning use it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from usnet_wsi.anchors import make_anchors
from usnet_wsi.config import PRECISIONS
from usnet_wsi.errors import UsageError
from usnet_wsi.instances import InstanceBatch, batch_instances
from usnet_wsi.model.bundle import Bundle, Thresholds, load_bundle
from usnet_wsi.model.inference import inference_copy
from usnet_wsi.model.usnet import USNet
from usnet_wsi.painting import UnpaintedBatch
from usnet_wsi.tta import FlipTTA

__all__ = ["InstanceBatch", "Predictor", "BundlePredictor", "ModelPredictor", "load_predictor",
           "resolve_device", "predict_image", "ImageReader", "batch_parts"]

# On a CPU a batch goes through the network and the instance step in parts of at most about
# this many pixels. The largest tensors of a part (the full-resolution activations, the
# refiner's float32 source) then stay below glibc's mmap threshold (32 MB): their memory is
# reused from the heap, not mapped and page-faulted afresh for every batch.
CPU_PART_PX = 4 * 556 * 556

# On a GPU every call of the network has one shape: a batch runs in parts of this many tiles,
# the last one padded with copies of its last tile (and the refiner's crops go in chunks of
# one size: `usnet_wsi.instances`). The GPU's convolution algorithms are chosen by shape, so
# a tile's result then depends neither on `--batch-size` nor on the tiles beside it.
CUDA_PART_TILES = 8


def batch_parts(n: int, tile_px: int, device_type: str) -> list[slice]:
    """The parts of a batch of n tiles that run together. On a CPU (see CPU_PART_PX): nearly
    equal, and none of a single tile where n > 1 (a lone tile costs a batch of two); on a GPU
    (see CUDA_PART_TILES): CUDA_PART_TILES tiles each, the last one fewer."""
    if device_type != "cpu":
        return [slice(a, min(a + CUDA_PART_TILES, n)) for a in range(0, n, CUDA_PART_TILES)]
    per = max(2, CPU_PART_PX // (tile_px * tile_px))
    k = max(1, math.ceil(n / per))
    if k > 1 and n // k < 2:
        k -= 1
    sizes = [n // k + (i < n % k) for i in range(k)]
    starts = np.cumsum([0] + sizes)
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


class Predictor(Protocol):
    name: str
    sha256: str
    device: str
    tile_px: int
    halo_px: int
    mpp: float

    def predict(self, tiles: np.ndarray, meta: Sequence[Any] | None = None,
                regions: np.ndarray | None = None) -> InstanceBatch:
        """(B, S, S, 3) uint8 tiles -> label maps and scores. `meta`: the engine's Tile of each
        (where it lies; None outside the engine). `regions` (B, 4) xyxy tile pixels: where the
        centre of a nucleus the engine will keep can lie (None: anywhere); a predictor may skip
        work on nuclei outside it. A predictor whose `defers_painting` is True also takes
        `paint=False` and then returns an UnpaintedBatch (each tile's masks, painted in the
        engine's CPU stage)."""
        ...


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': fp16 autocast on CUDA, bf16 on CPUs with native bf16 matrix units (AMX or
    AVX512-BF16, where it is about twice as fast), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not a precision",
                         f"use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if device.type == "cpu" and precision == "fp16":
            raise UsageError("--precision fp16 needs a CUDA device", "use bf16 or fp32 on CPU")
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX), not the slow emulation of older CPUs."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


class ModelPredictor:
    """Runs an in-memory US-Net model (training validation and bundles alike).

    Inference runs on a copy of the model with batch norm folded into the convolutions (and on
    the CPU, fused with their ReLU: `usnet_wsi.model.inference`), in channels-last layout,
    whose CPU kernels are both faster and independent of the batch size
    for batches of two or more: a batch of one tile is run as two copies, so results never
    depend on `--batch-size`. `precision` (see `resolve_precision`) is the autocast dtype of the
    network and the refiner; the instance step computes in float32. `predict(..., paint=False)`
    leaves the painting of each tile's masks to the caller (the engine's CPU stage)."""

    defers_painting = True

    def __init__(self, model: USNet, thresholds: Thresholds, device: torch.device,
                 name: str = "in-memory", sha256: str = "", tile_px: int | None = None,
                 precision: str = "auto", tta: str = "none") -> None:
        self.model = inference_copy(model, device)
        self.thresholds = thresholds
        self.torch_device = device
        self.device = str(device)
        self.precision = resolve_precision(precision, device)
        self.amp = self.precision != "fp32"
        self.name, self.sha256 = name, sha256
        spec = model.spec
        self.tile_px = int(tile_px or spec.input_size)
        if self.tile_px <= 2 * spec.halo_px or self.tile_px % 4:
            raise UsageError(f"an inference tile of {self.tile_px} px does not fit this model",
                             f"use a multiple of 4 above {2 * spec.halo_px} px")
        self.halo_px, self.mpp = spec.halo_px, spec.mpp
        # fully convolutional: the anchor grid follows the feature maps of the tile side
        self.anchors = make_anchors(replace(spec, input_size=self.tile_px)).to(device)
        self.tta = tta
        self._forward = FlipTTA(spec, self.tile_px, tta, device) if tta != "none" else None

    def autocast(self) -> torch.autocast:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.torch_device.type, dtype=dtype, enabled=dtype is not None)

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray, meta: Sequence[Any] | None = None,
                regions: np.ndarray | None = None,
                paint: bool = True) -> InstanceBatch | UnpaintedBatch:
        if len(tiles) == 0:
            return InstanceBatch.empty(self.tile_px) if paint else UnpaintedBatch([])
        parts = batch_parts(len(tiles), self.tile_px, self.torch_device.type)
        found = [self._predict(tiles[p], None if regions is None else regions[p], paint)
                 for p in parts]
        if len(found) == 1:
            return found[0]
        if paint:
            return InstanceBatch.concat(found)
        return UnpaintedBatch([t for part in found for t in part.tiles])

    def _predict(self, tiles: np.ndarray, regions: np.ndarray | None,
                 paint: bool) -> InstanceBatch | UnpaintedBatch:
        """One part of a batch: the network, then the instance step, on a batch of the
        part's fixed size (see `part_tiles`)."""
        n = len(tiles)
        size = self.part_tiles(n)
        if size > n:
            tiles = _pad_with_last(tiles, size)
            regions = None if regions is None else _pad_with_last(regions, size)
        rgb = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.torch_device)
        x = self.model.normalise(rgb)
        x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.model(x) if self._forward is None else self._forward(self.model, x)
        reg = None if regions is None else torch.as_tensor(regions, device=self.torch_device)
        found = batch_instances(self.model, x, out, self.anchors, self.thresholds, reg,
                                self.autocast, paint)
        return found if size == n else _head(found, n)

    def part_tiles(self, n: int) -> int:
        """The batch size a part of n tiles runs at: on a CPU n, but two for a lone tile (the
        channels-last CPU kernels give the same numbers for any batch of two or more); on a
        GPU always CUDA_PART_TILES (one shape for every call)."""
        return max(n, 2) if self.torch_device.type == "cpu" else CUDA_PART_TILES


def _pad_with_last(a: np.ndarray, size: int) -> np.ndarray:
    """`a` followed by copies of its last row, `size` rows in all."""
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)])


def _head(batch: InstanceBatch | UnpaintedBatch, n: int) -> InstanceBatch | UnpaintedBatch:
    """The results of the first n tiles (the rest were padding)."""
    if isinstance(batch, UnpaintedBatch):
        return UnpaintedBatch(batch.tiles[:n])
    return InstanceBatch(batch.labels[:n], batch.scores[:n], batch.counts[:n],
                         batch.detected[:n])


class BundlePredictor(ModelPredictor):
    """A ModelPredictor built from a verified weights bundle. The inference tile side is the
    bundle's `inference_tile_px` (config.json) unless `tile_px` is given, else the training
    input size."""

    def __init__(self, bundle: Bundle, device: torch.device, tile_px: int | None = None,
                 precision: str = "auto", tta: str = "none") -> None:
        tile = tile_px or bundle.config.get("inference_tile_px")
        super().__init__(bundle.build_model(), bundle.thresholds, device, bundle.name,
                         bundle.sha256, tile_px=int(tile) if tile else None, precision=precision,
                         tta=tta)
        self.bundle = bundle


def load_predictor(weights: str | Path | None = None, device: str = "auto",
                   tile_px: int | None = None, precision: str = "auto",
                   tta: str = "none") -> BundlePredictor:
    """The default bundle (weights=None) or the bundle at `weights`, on the chosen device."""
    dev = resolve_device(device)
    return BundlePredictor(load_bundle(weights), dev, tile_px, precision, tta)


class ImageReader:
    """An in-memory RGB image as a slide at the model's resolution (white outside it)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = np.ascontiguousarray(rgb[..., :3])

    def read_region(self, box_l0: tuple[int, int, int, int],
                    out_size: tuple[int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box_l0
        if (x1 - x0, y1 - y0) != tuple(out_size):
            raise ValueError(f"ImageReader reads at scale 1, got {box_l0} -> {out_size}")
        h, w = self.rgb.shape[:2]
        out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = self.rgb[sy0:sy1, sx0:sx1]
        return out


def predict_image(predictor: Predictor, rgb: np.ndarray, batch_size: int = 8,
                  workers: int = 0) -> tuple[np.ndarray, dict[int, float]]:
    """Segment an in-memory RGB image at the model's resolution, exactly as `segment` does a
    slide (same tile plan, instance step, ownership and merge; the outlines are rasterised
    the way the OME-Zarr label image is). Returns (uint32 labels, {label: score})."""
    from usnet_wsi.engine import EngineSettings, segment_nuclei
    from usnet_wsi.tiling import plan_tiles
    from usnet_wsi.geometry import fill_polygons
    h, w = rgb.shape[:2]
    plan = plan_tiles((0, 0, w, h), predictor.mpp, predictor.mpp, predictor.tile_px,
                      predictor.halo_px)
    settings = EngineSettings(batch_size=batch_size, workers=workers,
                              prefetch_tiles=2 * batch_size)
    nuclei = list(segment_nuclei(ImageReader(rgb), plan, predictor, settings))
    labels = np.zeros((h, w), np.uint32)
    fill_polygons(labels, [n.polygon_l0 for n in nuclei], range(1, len(nuclei) + 1))
    return labels, {k: n.score for k, n in enumerate(nuclei, start=1)}
