"""Make examples/example.svs: a small synthetic H&E slide (about 2000 x 1500 px at 0.25 um/px).

Everything is generated here (no patient data): an irregular tissue section on white glass,
eosin-stained stroma with fibres, and hematoxylin-stained nuclei of varied size, shape and
chromatin texture, some in dense nests, some touching. Colours are built in the
colour-deconvolved H&E space (skimage.color.hed2rgb), as real stains mix.

    python examples/make_example_slide.py            # writes examples/example.svs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.color import hed2rgb
from skimage.draw import ellipse

from usnet_wsi.pyramid import write_pyramidal_tiff


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (n - n.mean()) / (n.std() + 1e-9)


def tissue_region(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    blob = 1 - (((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2)
    return (blob + 0.35 * smooth_noise(rng, (h, w), 60)) > 0.15


def nucleus_centres(rng: np.random.Generator, tissue: np.ndarray, n: int) -> list[tuple]:
    """Half scattered, half in nests around a few seeds (like epithelium / infiltrates)."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    out = []
    seeds = rng.integers(0, len(ys), 12)
    for i in range(n):
        if i % 2 == 0:
            j = rng.integers(0, len(ys))
            out.append((ys[j], xs[j]))
        else:
            s = seeds[rng.integers(0, len(seeds))]
            out.append((ys[s] + rng.normal(0, 70), xs[s] + rng.normal(0, 70)))
    return [(y, x) for y, x in out if 0 <= y < h and 0 <= x < w and tissue[int(y), int(x)]]


def stain_maps(rng: np.random.Generator, tissue: np.ndarray, n_nuclei: int) -> tuple:
    h, w = tissue.shape
    fibres = np.abs(smooth_noise(rng, (h, w), (2, 14)))
    eosin = tissue * (0.026 + 0.012 * fibres + 0.004 * smooth_noise(rng, (h, w), 8))
    hema = tissue * (0.016 + 0.006 * smooth_noise(rng, (h, w), 10))
    resid = tissue * (0.035 + 0.004 * smooth_noise(rng, (h, w), 12))
    chromatin = smooth_noise(rng, (h, w), 1.5)
    taken = np.zeros((h, w), bool)
    kept = []
    for y, x in nucleus_centres(rng, tissue, n_nuclei):
        ry, rx = rng.uniform(8, 17), rng.uniform(8, 17)
        rr, cc = ellipse(y, x, ry, rx, shape=(h, w), rotation=rng.uniform(0, np.pi))
        if taken[rr, cc].mean() > 0.3:
            continue
        taken[rr, cc] = True
        kept.append((float(x), float(y)))
        dark = rng.uniform(0.06, 0.13)
        hema[rr, cc] = dark * (1 + 0.25 * chromatin[rr, cc])
        resid[rr, cc] = 0.055
    hema = ndimage.gaussian_filter(hema, 0.8)
    return (np.clip(hema, 0, None), np.clip(eosin, 0, None), ndimage.gaussian_filter(resid, 0.8),
            np.array(kept).reshape(-1, 2))


def make_example(width: int = 2000, height: int = 1500, seed: int = 7) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """(uint8 RGB image, (N, 2) x, y centres of the painted nuclei)."""
    rng = np.random.default_rng(seed)
    tissue = tissue_region(rng, height, width)
    hema, eosin, resid, centres = stain_maps(rng, tissue, n_nuclei=int(tissue.sum() / 2000))
    hed = np.stack([hema, eosin, resid], axis=-1)
    rgb = hed2rgb(hed)
    return np.clip(rgb * 255 + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8), centres


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).with_name("example.svs"))
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rgb, _ = make_example(args.width, args.height, args.seed)
    write_pyramidal_tiff(args.out, rgb, mpp=0.25, kind="svs", quality=90)


if __name__ == "__main__":
    main()
