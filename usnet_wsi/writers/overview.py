"""Overview PNG: the slide thumbnail with a nuclei-density heatmap blended on top.

Density = nuclei centroids counted per thumbnail pixel (a 2-D histogram), smoothed with a
Gaussian, mapped through a dark-purple -> orange -> yellow colour ramp and alpha-blended
(opacity grows with density, so empty areas show the plain thumbnail). A legend strip below
the image gives the ramp, the nuclei count and the peak density.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

from usnet_wsi.writers.atomic import atomic_path, output_error

# (position, r, g, b) stops of the colour ramp (inferno-like)
_RAMP = np.array(
    [
        (0.00, 0, 0, 4),
        (0.25, 87, 16, 110),
        (0.50, 188, 55, 84),
        (0.75, 249, 142, 9),
        (1.00, 252, 255, 164),
    ],
    dtype=np.float64,
)
_LEGEND_PX = 24


def colormap(values: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) of values in [0, 1] (clipped) on the density colour ramp."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.interp(v, _RAMP[:, 0], _RAMP[:, i]) for i in (1, 2, 3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def density_map(shape: tuple[int, int], scale: float, centroids_l0: np.ndarray,
                sigma_px: float) -> np.ndarray:
    """Smoothed count of centroids per thumbnail pixel (float64, `shape`)."""
    h, w = shape
    pts = np.asarray(centroids_l0, dtype=np.float64).reshape(-1, 2) * scale
    counts, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=(h, w), range=((0, h), (0, w)))
    return gaussian_filter(counts, sigma=sigma_px, mode="constant") if sigma_px > 0 else counts


def blend_heatmap(thumb_rgb: np.ndarray, density: np.ndarray, alpha: float) -> np.ndarray:
    """Thumbnail with the colour-mapped density on top; opacity = alpha * sqrt(density/peak)."""
    peak = float(density.max())
    norm = density / peak if peak > 0 else np.zeros_like(density)
    opacity = (alpha * np.sqrt(norm))[..., None]
    mixed = thumb_rgb.astype(np.float64) * (1.0 - opacity) + colormap(norm) * opacity
    return np.rint(mixed).astype(np.uint8)


def _legend(width: int, text: str) -> Image.Image:
    """A strip with the colour ramp on the left and `text` on the right."""
    strip = Image.new("RGB", (width, _LEGEND_PX), (255, 255, 255))
    ramp_w = max(1, min(width // 3, 160))
    ramp = colormap(np.linspace(0.0, 1.0, ramp_w))[None, :, :].repeat(_LEGEND_PX - 8, axis=0)
    strip.paste(Image.fromarray(ramp), (4, 4))
    ImageDraw.Draw(strip).text((ramp_w + 10, 6), text, fill=(0, 0, 0),
                               font=ImageFont.load_default())
    return strip


def _legend_text(n: int, peak: float, scale: float, mpp: float | None) -> str:
    if mpp:
        cell_mm = mpp / scale / 1000.0
        return f"{n} nuclei; peak {peak / cell_mm**2:.0f} nuclei/mm^2"
    return f"{n} nuclei; peak {peak:.2f} per thumbnail px"


def write_overview(
    path: str | Path,
    thumb_rgb: np.ndarray,
    scale: float,
    centroids_l0: np.ndarray,
    *,
    mpp: float | None = None,
    sigma_px: float | None = None,
    alpha: float = 0.6,
    legend: bool = True,
) -> None:
    """Write a PNG of the thumbnail with a nuclei-density heatmap (atomically).

    thumb_rgb: uint8 (h, w, 3); scale: thumbnail px per level-0 px; centroids_l0: (N, 2)
    x, y in level-0 px; mpp: level-0 micrometres per px (for a density per mm^2 in the
    legend); sigma_px: Gaussian sigma in thumbnail px (default: max(h, w) / 128, >= 1).
    """
    thumb = np.asarray(thumb_rgb)
    if thumb.dtype != np.uint8 or thumb.ndim != 3 or thumb.shape[2] != 3:
        raise ValueError(f"thumbnail must be uint8 (h, w, 3), got {thumb.dtype} {thumb.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    h, w = thumb.shape[:2]
    sigma = max(1.0, max(h, w) / 128.0) if sigma_px is None else float(sigma_px)
    pts = np.asarray(centroids_l0, dtype=np.float64).reshape(-1, 2)
    density = density_map((h, w), scale, pts, sigma)
    image = Image.fromarray(blend_heatmap(thumb, density, alpha))
    if legend:
        canvas = Image.new("RGB", (w, h + _LEGEND_PX), (255, 255, 255))
        canvas.paste(image, (0, 0))
        text = _legend_text(len(pts), float(density.max()), scale, mpp)
        canvas.paste(_legend(w, text), (0, h))
        image = canvas
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    except OSError as exc:
        raise output_error(Path(path), exc) from exc
