"""Read nuclei annotations and predictions as instance label images (uint32, 0 = background).

Formats:

- Aperio ImageScope XML (MoNuSeg): Annotations/Annotation/Regions/Region/Vertices/Vertex X,Y.
  Vertices are pixel-centre coordinates; each region is filled (skimage.draw.polygon: the pixels
  whose centre lies inside) in file order, later regions overwriting earlier ones, with id =
  1-based region index. This reproduces the MoNuSeg label maps exactly.
- GeoJSON / .geojson.gz (ours, or any QuPath-style export): a FeatureCollection, a list of
  features or one feature; Polygon (holes respected) and MultiPolygon geometries; for QuPath cell
  objects the `nucleusGeometry`. Coordinates are pixel-edge coordinates (pixel (c, r) spans
  [c, c+1) x [r, r+1), as in QuPath), so a pixel is filled when its centre (c+0.5, r+0.5) lies
  inside. Ids are 1-based feature indices, later features overwriting earlier ones. When a file
  holds QuPath detections or cells, other objects (e.g. an annotated tissue region) are skipped.
  The score is `properties.measurements["Detection probability"]` (dict or QuPath's older
  name/value list), else `properties.score`.
- Instance label image (.png, .tif, .tiff): a 2-D integer image. RGB colour images, binary masks
  and non-integer images are refused (not an instance map).

`read_pair` maps a prediction into the frame of its ground truth: `region_l0 = (X, Y, W, H)` is
the window of the prediction's slide (level-0 px) that the GT covers, and `offset_xy = (DX, DY)`
is added to the prediction's coordinates first. Prediction parts outside the window are cut off.
"""

from __future__ import annotations

import gzip
import json
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from skimage.draw import polygon as fill_polygon

from usnet_wsi.errors import DataError

VECTOR_SUFFIXES = (".geojson.gz", ".geojson", ".xml")
RASTER_SUFFIXES = (".png", ".tif", ".tiff")
SUFFIXES = VECTOR_SUFFIXES + RASTER_SUFFIXES
DETECTION_SCORE_KEY = "Detection probability"

Ring = np.ndarray                      # (N, 2) float x, y
Part = tuple[Ring, list[Ring]]         # exterior, holes
Window = tuple[int, int, int, int]     # x0, y0, w, h


@dataclass(frozen=True)
class Instances:
    """An instance label image plus what came with it."""

    labels: np.ndarray                        # uint32 (H, W), 0 = background
    scores: dict[int, float] | None = None    # id -> detection score, when the file had them
    source: str = ""                          # "imagescope-xml" | "geojson" | "label-image"
    notes: tuple[str, ...] = ()
    mpp: float | None = None                  # resolution stated by the file (XML), if any


@dataclass
class Shapes:
    """Polygons of one vector file, in its own coordinate frame."""

    nuclei: list[list[Part]]                 # one list of parts per nucleus, file order
    scores: list[float | None]
    source: str
    centre_offset: float                     # coordinate of pixel 0's centre (0.0 or 0.5)
    notes: list[str] = field(default_factory=list)
    mpp: float | None = None


def stem_of(path: str | Path) -> str:
    """File name without an annotation suffix (.geojson.gz, .geojson, .xml, .png, .tif, .tiff)."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def kind_of(path: str | Path) -> str:
    """'geojson', 'xml' or 'raster' from the file name; DataError for anything else."""
    name = Path(path).name.lower()
    if name.endswith((".geojson", ".geojson.gz")):
        return "geojson"
    if name.endswith(".xml"):
        return "xml"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    raise DataError(f"{path}: unknown annotation format",
                    "give GeoJSON (.geojson/.geojson.gz), ImageScope XML (.xml) or an instance "
                    "label image (.png/.tif/.tiff)")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path} does not exist", "check the path")
    if not path.is_file():
        raise DataError(f"{path} is not a file", "give a file (or two folders to pair by name)")


# ----------------------------------------------------------------------------- label images

def read_label_image(path: str | Path) -> Instances:
    """Read an instance label PNG/TIFF as uint32; refuse colour, binary and non-integer images."""
    path = Path(path)
    _check_file(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            arr = tifffile.imread(path, key=0)
        else:
            from PIL import Image
            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as err:  # noqa: BLE001 - any decoder failure is unreadable data
        raise DataError(f"{path}: cannot read the image ({err})",
                        "give an instance label image saved as PNG or TIFF") from None
    return Instances(labels=_as_instance_map(arr, path), source="label-image")


def _as_instance_map(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    hint = "save the labels as a single-channel uint16/uint32 image: 0 = background, one id per nucleus"
    if arr.ndim != 2:
        what = "an RGB colour image" if arr.ndim == 3 and arr.shape[-1] in (3, 4) else f"shape {arr.shape}"
        raise DataError(f"{path} is {what}, not an instance map", hint)
    if arr.dtype == bool:
        raise DataError(f"{path} is a binary mask, not an instance map",
                        "label each nucleus with its own id (e.g. skimage.measure.label)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path} has {arr.dtype} pixels, not an instance map (integer ids)", hint)
    if arr.size and (arr.min() < 0 or int(arr.max()) > np.iinfo(np.uint32).max):
        raise DataError(f"{path} has ids outside 0..2^32-1, not an instance map", hint)
    return arr.astype(np.uint32)


def crop_window(labels: np.ndarray, window: Window) -> np.ndarray:
    """labels[y0:y0+h, x0:x0+w] with zeros where the window leaves the image."""
    x0, y0, w, h = window
    out = np.zeros((h, w), labels.dtype)
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + h, labels.shape[0]), min(x0 + w, labels.shape[1])
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = labels[sy0:sy1, sx0:sx1]
    return out


# ----------------------------------------------------------------------------- ImageScope XML

def load_imagescope_xml(path: str | Path) -> Shapes:
    """Polygons of an Aperio ImageScope XML file (one per Region, file order)."""
    path = Path(path)
    _check_file(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{path}: not readable as ImageScope XML ({err})",
                        "give the annotation file as exported by Aperio ImageScope") from None
    if root.tag != "Annotations" and root.find(".//Region") is None:
        raise DataError(f"{path}: no <Annotations>/<Region> elements", "give an ImageScope XML file")
    nuclei, skipped = [], 0
    for region in root.iter("Region"):
        try:
            xy = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        except (TypeError, ValueError):
            raise DataError(f"{path}: region {region.get('Id')} has a vertex without numeric X/Y",
                            "fix or remove that region") from None
        if len(xy) < 3:
            skipped += 1
            continue
        nuclei.append([(np.array(xy, float), [])])
    shapes = Shapes(nuclei, [None] * len(nuclei), "imagescope-xml", centre_offset=0.0,
                    mpp=_float_or_none(root.get("MicronsPerPixel")))
    if skipped:
        shapes.notes.append(f"{path.name}: {skipped} regions with fewer than 3 vertices skipped")
    return shapes


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value and value > 0 else None


# ----------------------------------------------------------------------------- GeoJSON

def load_geojson(path: str | Path) -> Shapes:
    """Polygons and scores of a GeoJSON / .geojson.gz file (ours or QuPath-style)."""
    path = Path(path)
    _check_file(path)
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                doc = json.load(fh)
        else:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable as GeoJSON ({err})",
                        "give a GeoJSON FeatureCollection (.geojson or .geojson.gz)") from None
    features = _features_of(doc, path)
    kept, notes = _keep_detections(features, path)
    nuclei, scores = [], []
    for i, feat in enumerate(kept):
        parts = _parts_of(feat, path, i)
        if parts:
            nuclei.append(parts)
            scores.append(_score_of(feat))
    return Shapes(nuclei, scores, "geojson", centre_offset=0.5, notes=notes)


def _features_of(doc: Any, path: Path) -> list[dict]:
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        doc = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(f, dict) for f in doc):
        raise DataError(f"{path}: not a GeoJSON FeatureCollection or list of features",
                        "give a FeatureCollection of Polygon/MultiPolygon features")
    return doc


def _object_type(feat: dict) -> str:
    props = feat.get("properties") or {}
    kind = props.get("objectType") or props.get("object_type") or ""
    return str(kind).lower()


def _keep_detections(features: list[dict], path: Path) -> tuple[list[dict], list[str]]:
    """QuPath files: when detections/cells are present, skip other objects (annotations)."""
    is_det = [_object_type(f) in ("detection", "cell", "tile") for f in features]
    if not any(is_det) or all(is_det):
        return features, []
    kept = [f for f, d in zip(features, is_det) if d]
    return kept, [f"{path.name}: {len(features) - len(kept)} non-detection objects skipped"]


def _parts_of(feat: dict, path: Path, index: int) -> list[Part]:
    geom = feat.get("nucleusGeometry") or feat.get("geometry") or {}
    kind, coords = geom.get("type"), geom.get("coordinates")
    try:
        if kind == "Polygon":
            polys = [coords]
        elif kind == "MultiPolygon":
            polys = coords
        else:
            return []
        return [(np.asarray(p[0], float)[:, :2], [np.asarray(h, float)[:, :2] for h in p[1:]])
                for p in polys if p and len(p[0]) >= 3]
    except (TypeError, ValueError, IndexError):
        raise DataError(f"{path}: feature {index} has malformed {kind} coordinates",
                        "each ring must be a list of [x, y] positions") from None


def _score_of(feat: dict) -> float | None:
    props = feat.get("properties") or {}
    meas = props.get("measurements")
    value = None
    if isinstance(meas, dict):
        value = meas.get(DETECTION_SCORE_KEY)
    elif isinstance(meas, list):
        value = next((m.get("value") for m in meas
                      if isinstance(m, dict) and m.get("name") == DETECTION_SCORE_KEY), None)
    if value is None:
        value = props.get("score")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def load_shapes(path: str | Path) -> Shapes:
    """Polygons of a vector annotation file (GeoJSON or ImageScope XML)."""
    return load_imagescope_xml(path) if kind_of(path) == "xml" else load_geojson(path)


# ----------------------------------------------------------------------------- rasterising

def _ring_pixels(ring: Ring, shift_xy: tuple[float, float], centre: float,
                 shape_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    x = ring[:, 0] + shift_xy[0] - centre
    y = ring[:, 1] + shift_xy[1] - centre
    return fill_polygon(y, x, shape_hw)


def rasterise(shapes: Shapes, shape_hw: tuple[int, int],
              shift_xy: tuple[float, float] = (0.0, 0.0)) -> Instances:
    """Fill every nucleus (id = 1-based index, file order, later overwrite earlier) into (H, W).

    shift_xy is added to the coordinates first; pixels outside (H, W) are cut off.
    """
    labels = np.zeros(shape_hw, np.uint32)
    for i, parts in enumerate(shapes.nuclei, start=1):
        for exterior, holes in parts:
            rr, cc = _ring_pixels(exterior, shift_xy, shapes.centre_offset, shape_hw)
            if holes:
                keep = np.ones(rr.size, bool)
                flat = rr * shape_hw[1] + cc
                for hole in holes:
                    hr, hc = _ring_pixels(hole, shift_xy, shapes.centre_offset, shape_hw)
                    keep &= ~np.isin(flat, hr * shape_hw[1] + hc)
                rr, cc = rr[keep], cc[keep]
            labels[rr, cc] = i
    present = np.unique(labels[labels > 0])
    notes = list(shapes.notes)
    if present.size < len(shapes.nuclei):
        notes.append(f"{len(shapes.nuclei) - present.size} of {len(shapes.nuclei)} "
                     f"{shapes.source} nuclei fall outside the evaluated area or are fully covered")
    return Instances(labels, _scores_for(shapes, present, notes), shapes.source, tuple(notes), shapes.mpp)


def _scores_for(shapes: Shapes, present: np.ndarray, notes: list[str]) -> dict[int, float] | None:
    scored = [s for s in shapes.scores if s is not None]
    if not scored:
        return None
    if len(scored) < len(shapes.scores):
        notes.append(f"{len(shapes.scores) - len(scored)} of {len(shapes.scores)} nuclei have no "
                     "detection score: scores ignored")
        return None
    return {int(i): float(shapes.scores[int(i) - 1]) for i in present}


def shapes_extent(shapes: Iterable[Shapes], shifts: Iterable[tuple[float, float]]) -> tuple[int, int]:
    """(H, W) just large enough to hold every pixel the shapes fill (at least 1 x 1)."""
    h = w = 1
    for s, (dx, dy) in zip(shapes, shifts):
        for parts in s.nuclei:
            for exterior, _ in parts:
                w = max(w, int(np.floor(exterior[:, 0].max() + dx - s.centre_offset)) + 1)
                h = max(h, int(np.floor(exterior[:, 1].max() + dy - s.centre_offset)) + 1)
    return h, w


# ----------------------------------------------------------------------------- a prediction + its GT

def read_pair(pred_path: str | Path, gt_path: str | Path, region_l0: Window | None = None,
              offset_xy: tuple[float, float] = (0.0, 0.0)) -> tuple[Instances, Instances, list[str]]:
    """Read a prediction and its ground truth as label images of one shape, in the GT frame.

    The shape is, in order: the region's W x H; the GT label image's; the prediction label
    image's; else the extent of all polygons (noted: pixel accuracy then counts background only
    inside that extent). Returns (prediction, ground truth, notes).
    """
    x0, y0 = (region_l0[0], region_l0[1]) if region_l0 else (0, 0)
    shift = (offset_xy[0] - x0, offset_xy[1] - y0)      # prediction frame -> GT frame
    gt_raster, gt_shapes = _load_any(gt_path)
    pred_raster, pred_shapes = _load_any(pred_path)
    notes: list[str] = []
    if region_l0:
        shape_hw = (region_l0[3], region_l0[2])
    elif gt_raster is not None or pred_raster is not None:
        shape_hw = (gt_raster if gt_raster is not None else pred_raster).labels.shape
    else:
        shape_hw = shapes_extent([gt_shapes, pred_shapes], [(0.0, 0.0), shift])
        notes.append(f"image size unknown: evaluated on the annotations' extent {shape_hw[1]}x"
                     f"{shape_hw[0]} px; give --region 0,0,W,H for the true size (pixel accuracy)")
    gt = gt_raster if gt_raster is not None else rasterise(gt_shapes, shape_hw)
    if gt.labels.shape != tuple(shape_hw):
        raise DataError(f"{gt_path} is {gt.labels.shape[1]}x{gt.labels.shape[0]} px but the evaluated "
                        f"area is {shape_hw[1]}x{shape_hw[0]} px",
                        "give --region X,Y,W,H with W,H equal to the ground truth image size")
    if pred_raster is not None:
        pred = _window_raster(pred_raster, pred_path, shift, shape_hw, region_l0 is not None)
    else:
        pred = rasterise(pred_shapes, shape_hw, shift)
    return pred, gt, notes + list(pred.notes) + list(gt.notes)


def _load_any(path: str | Path) -> tuple[Instances | None, Shapes | None]:
    if kind_of(path) == "raster":
        return read_label_image(path), None
    return None, load_shapes(path)


def _window_raster(pred: Instances, path: str | Path, shift: tuple[float, float],
                   shape_hw: tuple[int, int], has_region: bool) -> Instances:
    """Cut a prediction label image to the GT frame (shift must be whole pixels)."""
    if shift[0] != int(shift[0]) or shift[1] != int(shift[1]):
        raise DataError(f"offset {shift} is not a whole number of pixels for label image {path}",
                        "give integer --offset/--region values for label images")
    if not has_region and shift == (0, 0) and pred.labels.shape != tuple(shape_hw):
        raise DataError(f"prediction {path} is {pred.labels.shape[1]}x{pred.labels.shape[0]} px but "
                        f"the ground truth is {shape_hw[1]}x{shape_hw[0]} px",
                        "give --region X,Y,W,H: where the ground truth lies in the prediction")
    window = (-int(shift[0]), -int(shift[1]), shape_hw[1], shape_hw[0])
    return Instances(crop_window(pred.labels, window), None, pred.source, pred.notes, pred.mpp)


# ----------------------------------------------------------------------------- folders

def _by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.lower().endswith(SUFFIXES):
            continue
        stem = stem_of(path)
        if stem in found:
            raise DataError(f"{folder} holds two files for {stem!r}: {found[stem].name}, {path.name}",
                            "keep one annotation file per image name in each folder")
        found[stem] = path
    return found


def pair_folders(pred_dir: str | Path, gt_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[Path]]:
    """Pair files of two folders by name (annotation suffixes stripped).

    Returns ([(name, prediction, ground truth)] sorted by name, unpaired files). DataError when
    nothing pairs.
    """
    preds, gts = _by_stem(Path(pred_dir)), _by_stem(Path(gt_dir))
    names = sorted(set(preds) & set(gts))
    unpaired = sorted([preds[n] for n in set(preds) - set(gts)] + [gts[n] for n in set(gts) - set(preds)])
    if not names:
        raise DataError(f"no file in {pred_dir} has a namesake in {gt_dir} "
                        f"({len(preds)} and {len(gts)} annotation files)",
                        "name predictions and ground truth alike, e.g. NAME.geojson and NAME.png")
    return [(n, preds[n], gts[n]) for n in names], unpaired
