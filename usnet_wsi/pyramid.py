"""Write an RGB image as a tiled pyramidal TIFF that OpenSlide reads (Aperio SVS or generic).

Used to turn annotated images into slides (accuracy report, example slide). Atomic: written to a
temporary name beside the target, then renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from usnet_wsi.writers.atomic import atomic_path


def pyramid_levels(rgb: np.ndarray, min_side: int = 512, factor: int = 4) -> list[np.ndarray]:
    """Level 0 and box-filtered downsamples by `factor` until the image is under `min_side`."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) // factor >= min_side:
        h, w = levels[-1].shape[:2]
        img = Image.fromarray(levels[-1]).resize((w // factor, h // factor), Image.Resampling.BOX)
        levels.append(np.asarray(img))
    return levels


def _description(kind: str, w: int, h: int, tile: int, mpp: float, level: int) -> dict:
    if kind == "svs":
        if level:
            return {"description": "Aperio Image Library v12.0.0\r\nlevel"}
        desc = (f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB"
                f"|AppMag = {round(10 / mpp)}|MPP = {mpp}")
        return {"description": desc}
    return {}


def write_pyramidal_tiff(path: str | Path, rgb: np.ndarray, mpp: float, kind: str = "svs",
                         tile: int = 256, compression: str = "jpeg", quality: int = 90) -> Path:
    """Write `rgb` (uint8 H x W x 3) at `mpp` um/px as an Aperio SVS (kind="svs") or a generic
    tiled TIFF with resolution tags (kind="tiff")."""
    if kind not in ("svs", "tiff"):
        raise ValueError(f"kind must be 'svs' or 'tiff', not {kind!r}")
    path = Path(path)
    levels = pyramid_levels(np.ascontiguousarray(rgb[..., :3]))
    h, w = rgb.shape[:2]
    cargs = {"compressionargs": {"level": quality}} if compression == "jpeg" else {}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=w * h > 2**31) as tw:
        for i, lvl in enumerate(levels):
            scale = w / lvl.shape[1]
            res = {"resolution": (1e4 / (mpp * scale),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(lvl, tile=(tile, tile), photometric="rgb", compression=compression,
                     subfiletype=0 if i == 0 else 1, metadata=None,
                     **cargs, **_description(kind, w, h, tile, mpp, i), **res)
    return path
