"""Tissue mask from a slide thumbnail (no torch).

H&E tissue is coloured (pink eosin, purple hematoxylin) while glass is nearly grey-white. A pixel
is tissue when its HSV saturation exceeds an Otsu threshold held inside [0.05, 0.15] (the floor
keeps blank glass empty, the ceiling keeps a thumbnail that is all tissue from being split in
two), or when it is dark (mean optical density > 0.3: grey, heavily stained or folded tissue).
Not tissue, whatever the above says: black and near-black pixels (brightest channel below
50: slide padding, black ink, scanner faults) and saturated pen colours outside the H&E hues
(yellow, green, cyan and blue ink: hue 0.12-0.65 with saturation above 0.3).
The mask is then cleaned: small specks removed, gaps bridged, small holes filled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

SAT_FLOOR = 0.05
SAT_CEILING = 0.15
OD_DARK = 0.3
BLACK_MAX = 50                 # brightest channel below this: black, not tissue
PEN_HUES = (0.12, 0.65)        # yellow .. blue; H&E is pink (~0.9) to purple (~0.75)
PEN_SATURATION = 0.3


def _saturation_threshold(sat: np.ndarray) -> float:
    if float(sat.max()) - float(sat.min()) < 1e-6:
        return SAT_FLOOR
    return float(np.clip(threshold_otsu(sat), SAT_FLOOR, SAT_CEILING))


def _mean_optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean over channels of -log10(I / 255), I clipped to >= 1."""
    inten = np.maximum(rgb.astype(np.float32), 1.0) / 255.0
    return -np.log10(inten).mean(axis=2)


def tissue_mask(thumb_rgb: np.ndarray, min_area_px: int = 64) -> np.ndarray:
    """bool (H, W) tissue mask of an RGB (or RGBA) uint8 thumbnail.

    `min_area_px`: connected tissue pieces smaller than this (thumbnail pixels) are dropped;
    holes smaller than 4x this are filled. A white or blank thumbnail gives all False.
    """
    rgb = np.asarray(thumb_rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"tissue_mask expects an (H, W, 3) RGB image, got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    hsv = rgb2hsv(rgb)
    sat = hsv[..., 1]
    raw = (sat > _saturation_threshold(sat)) | (_mean_optical_density(rgb) > OD_DARK)
    return _clean(raw & ~_not_tissue(rgb, hsv), max(int(min_area_px), 0))


def _not_tissue(rgb: np.ndarray, hsv: np.ndarray) -> np.ndarray:
    """Black / near-black pixels and saturated pen colours."""
    black = rgb.max(axis=2) < BLACK_MAX
    hue, sat = hsv[..., 0], hsv[..., 1]
    pen = (hue >= PEN_HUES[0]) & (hue <= PEN_HUES[1]) & (sat > PEN_SATURATION)
    return black | pen


def _clean(raw: np.ndarray, min_area_px: int) -> np.ndarray:
    """Remove specks, bridge 1-2 px gaps, fill small holes."""
    pad = 3   # replicate the border so that opening/closing do not eat the image edge
    mask = np.pad(raw, pad, mode="edge")
    mask = ndimage.binary_opening(mask, np.ones((3, 3), bool))
    mask = ndimage.binary_closing(mask, morphology.disk(2))[pad:-pad, pad:-pad]
    if min_area_px > 0:
        mask = _remove_small(morphology.remove_small_objects, mask, min_area_px - 1)
        mask = _remove_small(morphology.remove_small_holes, mask, 4 * min_area_px - 1)
    return mask.astype(bool)


def _remove_small(fn, mask: np.ndarray, max_size: int) -> np.ndarray:
    """Call skimage's remove_small_objects/holes: `max_size` (>= 0.26) or the older
    positional `min_size`/`area_threshold` (strictly-smaller semantics)."""
    try:
        return fn(mask, max_size=max_size)
    except TypeError:
        return fn(mask, max_size + 1)
