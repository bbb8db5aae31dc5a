"""Annotated images -> training samples.

Accepted layouts for each DATA folder:
- MoNuSeg style: `images/NAME.(tif|png|jpg)` with `labels/NAME.(png|tif)` instance maps and/or
  `annotations/NAME.xml` (Aperio ImageScope polygons); labels win when both exist.
- flat: `NAME.(tif|png|jpg)` beside `NAME.xml` or `NAME_label(s).(png|tif)`.
Sampling follows the paper: 400x400 crops with stride 200, a random 300x300 inside each, with
flips, 90-degree rotations, H&E stain jitter (colour-deconvolved), brightness/contrast and a
mild scale change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed
from skimage.transform import resize

from usnet_wsi.errors import DataError

IMAGE_EXT = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = ("_label", "_labels", "")


@dataclass
class Annotated:
    name: str
    rgb: np.ndarray       # uint8 (H, W, 3)
    labels: np.ndarray    # int32 (H, W) instance map, 0 = background
    dataset: str = ""     # the DATA folder it came from
    group: str = ""       # source image (tiles of one image share it); "" = the image itself

    @property
    def source(self) -> str:
        return self.group or self.name


def source_groups(folder: Path) -> dict[str, str]:
    """{image name: source image} from a dataset's manifest.json ("source_image" per entry),
    so that tiles cut from one image are never split between training and validation."""
    import json
    path = Path(folder) / "manifest.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, list):
        return {}
    return {str(e["name"]): str(e["source_image"]) for e in entries
            if isinstance(e, dict) and "name" in e and e.get("source_image")}


def rescale(a: Annotated, mpp: float, model_mpp: float) -> Annotated:
    """The image and labels resampled from `mpp` to the model's resolution (unchanged within
    0.5%)."""
    scale = mpp / model_mpp
    if abs(scale - 1) < 0.005:
        return a
    h, w = a.labels.shape
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    rgb = resize(a.rgb, shape, order=1, preserve_range=True, anti_aliasing=scale < 1)
    labels = resize(a.labels, shape, order=0, preserve_range=True, anti_aliasing=False)
    return Annotated(a.name, rgb.astype(np.uint8), labels.astype(np.int32), a.dataset, a.group)


def pad_to(rgb: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Pad an image smaller than `size` on a side with white glass (no nuclei), at a random
    offset, so that small tiles train at their true scale."""
    h, w = labels.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return rgb, labels
    top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
    pads = ((top, ph - top), (left, pw - left))
    return (np.pad(rgb, pads + ((0, 0),), constant_values=255),
            np.pad(labels, pads, constant_values=0))


def _read_image(path: Path) -> np.ndarray:
    import tifffile
    from PIL import Image
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            arr = np.asarray(Image.open(path))
    except Exception as err:  # noqa: BLE001 - any decoder error means unreadable
        raise DataError(f"cannot read {path}: {err}", "check that the file is a valid image") from None
    return arr


def _as_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"{path} has shape {arr.shape}, not an RGB image", "give RGB H&E images")
    if arr.dtype != np.uint8:
        arr = np.clip(arr / max(float(arr.max()), 1.0) * 255, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _as_instances(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path} is not an instance label map (shape {arr.shape}, {arr.dtype})",
                        "labels must be single-channel integer images: 0 background, 1..N nuclei")
    labels = arr.astype(np.int32)
    if labels.max() <= 1 and labels.size and (labels > 0).mean() > 0.02:
        lab, _ = ndimage.label(labels > 0)
        if lab.max() > 1:
            raise DataError(f"{path} looks binary (0/1), not an instance map",
                            "give one id per nucleus (0 background, 1..N nuclei)")
    return labels


def _find_label(image: Path) -> Path | None:
    root, stem = image.parent, image.stem
    cands = []
    if root.name == "images":
        cands += [root.parent / "labels" / f"{stem}{e}" for e in (".png", ".tif", ".tiff")]
        cands += [root.parent / "annotations" / f"{stem}.xml"]
    cands += [root / f"{stem}{s}{e}" for s in LABEL_SUFFIXES[:2] for e in (".png", ".tif", ".tiff")]
    cands += [root / f"{stem}.xml"]
    return next((c for c in cands if c.is_file() and c != image), None)


def discover(folder: Path) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of a DATA folder; DataError when none are found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"training data folder not found: {folder}", "give a folder of images "
                        "with labels/ or annotations/ (see `usnet-wsi train --help`)")
    img_dir = folder / "images" if (folder / "images").is_dir() else folder
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXT
                    and not any(p.stem.endswith(s) for s in LABEL_SUFFIXES[:2]))
    pairs = [(p, lab) for p in images if (lab := _find_label(p)) is not None]
    if not pairs:
        raise DataError(f"no annotated images in {folder}", "put images in images/ and instance "
                        "maps in labels/ (same names), or ImageScope XML in annotations/")
    return pairs


def load_pair(image: Path, annotation: Path) -> Annotated:
    rgb = _as_rgb(_read_image(image), image)
    if annotation.suffix.lower() == ".xml":
        from usnet_wsi.annotations import read_imagescope_xml
        labels = read_imagescope_xml(annotation, shape=rgb.shape[:2]).astype(np.int32)
    else:
        labels = _as_instances(_read_image(annotation), annotation)
    if labels.shape != rgb.shape[:2]:
        raise DataError(f"{annotation} is {labels.shape[1]}x{labels.shape[0]} but {image} is "
                        f"{rgb.shape[1]}x{rgb.shape[0]}", "labels must match their image size")
    return Annotated(image.stem, rgb, labels)


def crop_origins(h: int, w: int, crop: int = 400, stride: int = 200) -> list[tuple[int, int]]:
    """Top-left corners of the paper's 400x400 crops with stride 200 (last ones flush)."""
    ys = sorted(set(list(range(0, max(h - crop, 0) + 1, stride)) + [max(h - crop, 0)]))
    xs = sorted(set(list(range(0, max(w - crop, 0) + 1, stride)) + [max(w - crop, 0)]))
    return [(y, x) for y in ys for x in xs]


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.05,
                 bias: float = 0.02) -> np.ndarray:
    """Perturb the H, E and D channels of the colour-deconvolved image (Tellez et al. style)."""
    hed = rgb2hed(rgb)
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-bias, bias, 3)
    return np.clip(hed2rgb(hed) * 255, 0, 255).astype(np.uint8)


def brightness_contrast(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c, b = rng.uniform(0.85, 1.15), rng.uniform(-15, 15)
    m = rgb.mean()
    return np.clip((rgb.astype(np.float32) - m) * c + m + b, 0, 255).astype(np.uint8)


def rescale_pair(rgb: np.ndarray, labels: np.ndarray, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """An image and its label map resampled to `shape` (rows, cols), pixel centres mapped onto
    pixel centres: the image bilinearly (no anti-aliasing: the scale stays within 0.9-1.1),
    the labels by their nearest pixel."""
    h, w = labels.shape
    t = torch.from_numpy(np.require(rgb, np.uint8, ("C", "W"))).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False)   # uint8, rounded
    rgb = out[0].permute(1, 2, 0).numpy()
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * (h / shape[0])).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * (w / shape[1])).astype(np.int64), w - 1)
    return np.ascontiguousarray(rgb), labels[rows[:, None], cols[None, :]].astype(np.int32)


def augment(rgb: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator,
            strong: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random scale (0.9-1.1), random size x size crop, flips, 90-degree rotation, colour."""
    if strong:
        s = rng.uniform(0.9, 1.1)
        h, w = labels.shape
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        if (nh, nw) != (h, w):
            rgb, labels = rescale_pair(rgb, labels, (nh, nw))
    h, w = labels.shape
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    rgb, labels = rgb[y:y + size, x:x + size], labels[y:y + size, x:x + size]
    k = int(rng.integers(4))
    rgb, labels = np.rot90(rgb, k), np.rot90(labels, k)
    if rng.random() < 0.5:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    if strong:
        rgb = brightness_contrast(stain_jitter(np.ascontiguousarray(rgb), rng), rng)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(labels)


def seg_target(labels: np.ndarray, classes: int) -> np.ndarray:
    """Per-pixel class: 1 class -> nucleus/background; 3 classes -> 0 bg, 1 interior, 2 boundary
    (nucleus pixels with a 4-neighbour of another id, i.e. outlines and contacts)."""
    fg = labels > 0
    if classes == 1:
        return fg.astype(np.int64)
    pad = np.pad(labels, 1, mode="edge")
    edge = np.zeros_like(fg)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] != labels
    out = fg.astype(np.int64)
    out[fg & edge] = 2
    return out


def boxes_of(labels: np.ndarray, min_area: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """xyxy boxes (pixel edges) and ids of every instance with at least `min_area` pixels."""
    boxes, ids = [], []
    counts = np.bincount(labels.ravel())
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or counts[i] < min_area:
            continue
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        ids.append(i)
    return (np.array(boxes, np.float32).reshape(-1, 4), np.array(ids, np.int64))
