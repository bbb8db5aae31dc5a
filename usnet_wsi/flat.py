"""Flat images: PNG, JPEG, TIFF without tiles and OME-TIFF, for when OpenSlide cannot read a file.

TIFFs are read with tifffile through its Zarr store (`aszarr`), so only the strips or tiles
under a region are decoded: a large flat TIFF streams through the tiling like a slide, never
read whole. A pyramid stored in the file (OME-TIFF SubIFDs) gives the levels. Other formats are
read with Pillow and held in memory, up to Pillow's own size limit (about 89 megapixels);
larger ones are refused with the command that converts them to a tiled TIFF.

`FlatImage.read(level, x, y, w, h)` returns uint8 RGB level pixels, white outside the image.
Resolution: TIFF resolution tags (inch, centimeter, ImageJ micron), OME `PhysicalSizeX/Y`, or
the dpi that Pillow reports; `slide.py` decides which values are plausible.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from usnet_wsi.errors import SlideError

_UM_PER = {"m": 1e6, "mm": 1e3, "cm": 1e4, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0,
           "nm": 1e-3}
_TIFF_UNITS = {2: "inch", 3: "centimeter"}
_MAX_CHUNK_BYTES = 512 << 20      # a strip or tile larger than this is refused (memory)
_TOO_BIG_HINT = ("convert it to a tiled TIFF, which is read in parts: e.g. `vips tiffsave in.png "
                 "out.tif --tile --pyramid --compression jpeg`")


class FlatImage:
    """A flat image; `levels` are (width, height) per level, level 0 first."""

    def __init__(self, path: Path, levels: list[tuple[int, int]], props: dict[str, str],
                 reader: Any, vendor: str) -> None:
        self.path, self.level_dimensions, self.properties = path, levels, props
        self.vendor = vendor
        w0 = levels[0][0]
        self.level_downsamples = [w0 / w for w, _ in levels]
        self._reader = reader
        self._lock = threading.Lock()

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of level pixels [x, x+w) x [y, y+h), white outside the image.
        Only the part inside the image is decoded."""
        out = np.full((h, w, 3), 255, np.uint8)
        lw, lh = self.level_dimensions[level]
        ix0, iy0, ix1, iy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        with self._lock:
            part = self._reader.read(level, ix0, iy0, ix1, iy1)
        out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = part
        return out

    def origin(self, level: int, x: int, y: int) -> tuple[float, float]:
        return float(x), float(y)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def to_rgb8(arr: np.ndarray, path: Path) -> np.ndarray:
    """(h, w[, c]) pixels as uint8 RGB: grey replicated, alpha composited on white,
    16-bit scaled to 8-bit."""
    a = np.asarray(arr)
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise SlideError(f"{path} has {a.dtype} pixels; H&E images are 8- or 16-bit RGB",
                         "export the image as 8-bit RGB (PNG, JPEG or TIFF)")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] in (2, 4):
        alpha = a[..., -1:].astype(np.uint16)
        rgb = a[..., :-1].astype(np.uint16)
        a = ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[2] != 3:
        raise SlideError(f"{path} has {a.shape[2]} channels, not RGB",
                         "export the image as RGB (PNG, JPEG or TIFF)")
    return np.ascontiguousarray(a)


class _TiffLevels:
    """Reads regions of each level of a tifffile series: memory-mapped when the pixels are
    stored uncompressed in one piece, else through tifffile's Zarr store (strip by strip,
    tile by tile)."""

    def __init__(self, tf: tifffile.TiffFile, series: Any, path: Path) -> None:
        self._tf, self.path = tf, path
        self._axes = [lvl.axes for lvl in series.levels]
        self._stores = [_level_store(path, lvl, i) for i, lvl in enumerate(series.levels)]

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        from tifffile.zarr import zarr_selection

        axes = self._axes[level]
        sel = tuple(slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X"
                    else slice(None) if a in "SC" else 0 for a in axes)
        kept = [a for a in axes if a in "YXSC"]
        store = self._stores[level]
        if isinstance(store, _Contiguous):
            part = store[sel]
        else:
            part = np.asarray(zarr_selection(store, sel, close=False))
        if len(kept) == 3 and kept[0] in "SC":       # planar: channels first
            part = np.moveaxis(part, 0, -1)
        return to_rgb8(part, self.path)

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self._stores = []
        self._tf.close()


class _Contiguous:
    """Uncompressed, interleaved pixels stored in one piece: each row's part read with pread
    (neither the image nor a memory map of it is held)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: Any) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.offset, self.shape, self.dtype = offset, shape, np.dtype(dtype)

    def __getitem__(self, sel: tuple) -> np.ndarray:
        ys, xs = sel[0], sel[1]
        h, w, spp = self.shape
        px = spp * self.dtype.itemsize
        rows = [os.pread(self._fd, (xs.stop - xs.start) * px,
                         self.offset + (y * w + xs.start) * px) for y in range(ys.start, ys.stop)]
        return np.frombuffer(b"".join(rows), self.dtype).reshape(len(rows), -1, spp)

    def close(self) -> None:
        os.close(self._fd)


def _level_store(path: Path, level: Any, index: int) -> Any:
    """Where a level's pixels are read from: `_Contiguous` for uncompressed interleaved data in
    one piece, else tifffile's Zarr store; SlideError when one stored piece (strip or tile) is
    too large to decode at once."""
    page = level.keyframe
    if level.dataoffset is not None and level.axes in ("YXS", "YX"):
        shape = tuple(level.shape) + (() if level.axes == "YXS" else (1,))
        return _Contiguous(path, int(level.dataoffset), shape, level.dtype)
    chunk = page.chunks if hasattr(page, "chunks") else page.shape
    if int(np.prod(chunk)) * page.dtype.itemsize > _MAX_CHUNK_BYTES:
        raise SlideError(f"{path} stores its pixels in pieces of {np.prod(chunk) >> 20} MB that "
                         "must each be decoded whole", _TOO_BIG_HINT)
    return level.aszarr()


class _PillowLevels:
    """A Pillow image held in memory (single level)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self._rgb = rgb

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1]

    def close(self) -> None:
        self._rgb = None  # type: ignore[assignment]


def _check_axes(series: Any, path: Path) -> None:
    for lvl in series.levels:
        extra = [(a, n) for a, n in zip(lvl.axes, lvl.shape) if a not in "YXSC" and n != 1]
        chans = [n for a, n in zip(lvl.axes, lvl.shape) if a in "SC"]
        if extra or len(chans) > 1 or "Y" not in lvl.axes or "X" not in lvl.axes:
            raise SlideError(f"{path} holds a {lvl.axes} image of shape {lvl.shape}, not one "
                             "RGB plane", "export a single RGB image (one plane, 3 channels)")


def _tiff_props(tf: tifffile.TiffFile, page: Any) -> dict[str, str]:
    """Resolution as the `tiff.*` properties OpenSlide would give, plus OME sizes (µm)."""
    props: dict[str, str] = {}
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    unit_name = _TIFF_UNITS.get(int(unit.value)) if unit is not None else None
    if tf.is_imagej and str((tf.imagej_metadata or {}).get("unit", "")).lower() in _UM_PER:
        unit_name = "micron"
    for axis in ("X", "Y"):
        tag = tags.get(f"{axis}Resolution")
        if tag is not None and unit_name is not None:
            num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
            if den:
                props[f"tiff.{axis}Resolution"] = repr(num / den)
    if unit_name is not None:
        props["tiff.ResolutionUnit"] = unit_name
    if tf.is_ome:
        props.update(_ome_props(tf.ome_metadata or ""))
    return props


def _ome_props(xml: str) -> dict[str, str]:
    """`ome.mpp-x/y` (µm per pixel) from the first OME Pixels element."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    out = {}
    for axis in ("X", "Y"):
        size = pixels.get(f"PhysicalSize{axis}")
        factor = _UM_PER.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            value = float(size) * factor  # type: ignore[arg-type, operator]
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            out[f"ome.mpp-{axis.lower()}"] = repr(value)
    return out


def _open_tiff(path: Path) -> FlatImage | None:
    log = logging.getLogger("tifffile")
    level, log.level = log.level, logging.CRITICAL
    try:
        tf = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse
        return None
    finally:
        log.level = level
    try:
        series = tf.series[0]
        _check_axes(series, path)
        levels = [(int(lvl.shape[lvl.axes.index("X")]), int(lvl.shape[lvl.axes.index("Y")]))
                  for lvl in series.levels]
        props = _tiff_props(tf, series.levels[0].keyframe)
        return FlatImage(path, levels, props, _TiffLevels(tf, series, path), "tiff (flat)")
    except BaseException:
        tf.close()
        raise


def _open_pillow(path: Path) -> FlatImage | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                dpi = img.info.get("dpi")
                rgb = _pillow_rgb(img, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SlideError(f"{path} is too large to read whole (over "
                         f"{Image.MAX_IMAGE_PIXELS:,} pixels) and is not a tiled TIFF",
                         _TOO_BIG_HINT) from None
    except (OSError, ValueError, SyntaxError):
        return None
    props = {}
    if dpi and len(dpi) == 2 and all(float(d) > 0 for d in dpi):
        props = {"tiff.XResolution": repr(float(dpi[0])), "tiff.YResolution": repr(float(dpi[1])),
                 "tiff.ResolutionUnit": "inch"}
    h, w = rgb.shape[:2]
    return FlatImage(path, [(w, h)], props, _PillowLevels(rgb), "image (flat)")


def _pillow_rgb(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return to_rgb8(np.asarray(img).astype(np.uint16), path)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    return to_rgb8(np.asarray(img.convert("RGBA" if has_alpha else "RGB")), path)


def open_flat(path: Path, is_tiff: bool) -> FlatImage | None:
    """The image read with tifffile (TIFF) or Pillow; None when neither can read it.
    SlideError when it is readable but unusable (too large for Pillow, not RGB)."""
    return _open_tiff(path) if is_tiff else _open_pillow(path)
