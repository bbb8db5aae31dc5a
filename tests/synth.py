"""Synthetic whole-slide images for tests: small pyramidal tiled TIFFs with known nuclei.

`make_slide(path, width, height, ...)` paints an H&E-like image (white glass, pink tissue
rectangle(s), dark purple elliptical nuclei at the given places), writes it with tifffile as

- kind="svs":           Aperio-style SVS (ImageDescription "Aperio Image Library ...|AppMag = 40
                        |MPP = <mpp>"): OpenSlide reports vendor "aperio" and openslide.mpp-x/y;
- kind="svs-objective": Aperio-style SVS with AppMag but no MPP (resolution from the objective);
- kind="svs-tiffres":   Aperio-style SVS with AppMag, no MPP, TIFF resolution tags in cm
                        (OpenSlide's aperio driver ignores those: exercises the TIFF fallback);
- kind="tiff":          generic tiled TIFF with resolution tags in pixels per centimeter;
- kind="tiff-inch":     generic tiled TIFF with resolution tags in pixels per inch;
- kind="no-mpp":        generic tiled TIFF with neither resolution nor objective;

and returns a `SynthSlide` holding the level-0 RGB image, the ground-truth nuclei and their
label image. `grid_nuclei(...)` lays nuclei on a grid, including centres exactly on tile-core
borders and nuclei touching (and cut by) the slide edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tifffile
from PIL import Image
from skimage.draw import ellipse

GLASS_RGB = (243, 241, 245)
TISSUE_RGB = (226, 160, 196)
NUCLEUS_RGB = (82, 42, 128)
KINDS = ("svs", "svs-objective", "svs-tiffres", "tiff", "tiff-inch", "no-mpp")


@dataclass(frozen=True)
class SynthNucleus:
    """Ground-truth nucleus: centre (level-0 px), radii along x and y before rotation, angle."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle_deg: float = 0.0


@dataclass
class SynthSlide:
    path: Path
    width: int
    height: int
    mpp: float | None
    kind: str
    image: np.ndarray                       # uint8 (H, W, 3) level 0, exactly what was written
    labels: np.ndarray                      # uint32 (H, W): 0 background, i+1 = nuclei[i]
    nuclei: list[SynthNucleus] = field(default_factory=list)
    tissue_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    level_downsamples: tuple[int, ...] = (1,)


def default_tissue(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """One tissue rectangle with a glass margin of 15% on each side."""
    mx, my = int(width * 0.15), int(height * 0.15)
    return [(mx, my, width - mx, height - my)]


def paint(width: int, height: int, nuclei: Iterable[SynthNucleus],
          tissue: Sequence[tuple[int, int, int, int]], seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, uint32 label image) of glass + tissue boxes + nuclei (later on top)."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = GLASS_RGB
    for x0, y0, x1, y1 in tissue:
        region = img[y0:y1, x0:x1]
        noise = rng.integers(-8, 9, size=region.shape[:2] + (1,))
        region[:] = np.clip(np.array(TISSUE_RGB) + noise, 0, 255)
    labels = np.zeros((height, width), dtype=np.uint32)
    for i, n in enumerate(nuclei):
        rr, cc = ellipse(n.cy, n.cx, n.ry, n.rx, shape=(height, width),
                         rotation=math.radians(n.angle_deg))
        labels[rr, cc] = i + 1
        shade = rng.integers(-10, 11, size=(len(rr), 1))
        img[rr, cc] = np.clip(np.array(NUCLEUS_RGB) + shade, 0, 255)
    return img, labels


def _pyramid(img: np.ndarray, downsamples: Sequence[int]) -> list[np.ndarray]:
    out = []
    h, w = img.shape[:2]
    for d in downsamples:
        if d == 1:
            out.append(img)
            continue
        size = (max(1, w // d), max(1, h // d))
        out.append(np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX)))
    return out


def _level_downsamples(levels: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(levels, int):
        return tuple(4 ** i for i in range(levels))
    ds = tuple(int(d) for d in levels)
    if not ds or ds[0] != 1 or list(ds) != sorted(set(ds)):
        raise ValueError(f"levels must start at 1 and increase, got {levels}")
    return ds


def _page_args(kind: str, mpp: float, width: int, height: int, tile: int, first: bool) -> dict:
    if kind.startswith("svs"):
        mag = f"|AppMag = {round(10 / mpp)}"
        mpp_part = f"|MPP = {mpp}" if kind == "svs" else ""
        desc = (f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] "
                f"({tile}x{tile}) RGB{mag}{mpp_part}|Filename = synthetic")
        args = {"description": desc if first else "Aperio Image Library v12.0.0\r\nlevel"}
        if kind == "svs-tiffres":
            args.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        return args
    if kind == "tiff":
        return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    if kind == "tiff-inch":
        return {"resolution": (25400 / mpp, 25400 / mpp), "resolutionunit": "INCH"}
    return {"resolutionunit": "NONE"}


def write_tiff(path: Path, levels: list[np.ndarray], kind: str, mpp: float, tile: int,
               compression: str = "zlib") -> None:
    """Write the pyramid as top-level tiled pages (what OpenSlide expects for SVS/generic)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    h, w = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for i, lvl in enumerate(levels):
            lw = lvl.shape[1]
            args = _page_args(kind, mpp, w, h, tile, first=(i == 0))
            if "resolution" in args and i > 0:
                args["resolution"] = tuple(r * lw / w for r in args["resolution"])
            tw.write(lvl, tile=(tile, tile), photometric="rgb", compression=compression,
                     subfiletype=0 if i == 0 else 1, metadata=None, **args)


def make_slide(path: str | Path, width: int, height: int, mpp: float = 0.25,
               kind: str = "svs", nuclei: Sequence[SynthNucleus] | None = None,
               tile: int = 256, levels: int | Sequence[int] = 2,
               tissue: Sequence[tuple[int, int, int, int]] | None = None,
               seed: int = 0) -> SynthSlide:
    """Paint and write a synthetic slide; returns the image, labels and ground truth.

    `levels`: number of pyramid levels (downsample 4 each) or explicit downsamples (1, 4, ...).
    `nuclei`: None -> `grid_nuclei(width, height)`; [] -> none. `tissue`: xyxy boxes, None ->
    one rectangle with a 15% glass margin.
    """
    path = Path(path)
    if nuclei is None:
        nuclei = grid_nuclei(width, height)
    boxes = list(tissue) if tissue is not None else default_tissue(width, height)
    img, labels = paint(width, height, nuclei, boxes, seed=seed)
    ds = _level_downsamples(levels)
    write_tiff(path, _pyramid(img, ds), kind, mpp, tile)
    return SynthSlide(path=path, width=width, height=height,
                      mpp=None if kind == "no-mpp" else mpp, kind=kind, image=img,
                      labels=labels, nuclei=list(nuclei), tissue_boxes=boxes,
                      level_downsamples=ds)


def grid_nuclei(width: int, height: int, spacing: int = 60, radius: float = 9.0,
                core_l0: int | None = None, origin_l0: tuple[int, int] = (0, 0),
                edges: bool = True, seed: int = 0) -> list[SynthNucleus]:
    """Non-overlapping nuclei: a jittered grid, plus (if `core_l0`) centres exactly on the
    tile-core borders x|y = origin + k*core_l0 (and on their crossings), plus (if `edges`)
    nuclei touching each slide edge and ones cut by it.
    """
    rng = np.random.default_rng(seed)
    cand: list[tuple[float, float]] = []
    if core_l0:
        xs = range(origin_l0[0] + core_l0, width, core_l0)
        ys = range(origin_l0[1] + core_l0, height, core_l0)
        cand += [(float(x), float(y)) for x in xs for y in ys]                  # crossings
        cand += [(float(x), float(y)) for x in xs for y in range(spacing // 2, height, spacing)]
        cand += [(float(x), float(y)) for y in ys for x in range(spacing // 2, width, spacing)]
    if edges:
        r = radius
        for t in (0.3, 0.7):
            cand += [(r, t * height), (width - r - 1, t * height),       # touching
                     (t * width + spacing / 2, r), (t * width + spacing / 2, height - r - 1),
                     (r / 2, (t + 0.1) * height), (t * width, height - r / 2)]  # cut by the edge
    for y in range(spacing // 2, height, spacing):
        for x in range(spacing // 2, width, spacing):
            jx, jy = rng.uniform(-spacing / 6, spacing / 6, size=2)
            cand.append((x + jx, y + jy))
    return _spread(cand, radius, rng)


def _spread(cand: list[tuple[float, float]], radius: float,
            rng: np.random.Generator) -> list[SynthNucleus]:
    """Keep candidates (in order) whose ellipse cannot touch an already kept one."""
    kept: list[SynthNucleus] = []
    pts = np.empty((0, 2))
    for cx, cy in cand:
        if len(pts) and np.min(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy)) < 2 * radius + 3:
            continue
        ry = radius * float(rng.uniform(0.65, 1.0))
        kept.append(SynthNucleus(cx, cy, radius, ry, float(rng.uniform(-90, 90))))
        pts = np.vstack([pts, [cx, cy]])
    return kept
