"""Whole-slide access: open a slide, describe it (SlideInfo), read regions as uint8 RGB.

This is the only module that imports openslide. Every OpenSlide failure is turned into a
`SlideError` carrying the offending file, the reason and a fix; user settings that make no
sense (a non-positive `mpp`) are `UsageError`s.

Resolution (microns per level-0 pixel) is taken, in this order, from: the user's `mpp`;
OpenSlide's `openslide.mpp-x/y`; the TIFF resolution tags (centimeter or inch units); the
objective power (10 um/px divided by the objective, with a warning). Otherwise the slide is
refused with a hint naming `--mpp`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
from PIL import Image

from usnet_wsi.console import Reporter
from usnet_wsi.config import MPP_RANGE  # um/px accepted from the user or the file
from usnet_wsi.errors import SlideError, UsageError
from usnet_wsi.flat import open_flat

# Compound suffixes first: "a.ome.tiff" -> "a".
_SLIDE_SUFFIXES = (
    ".ome.tiff", ".ome.tif", ".ome.btf", ".svs", ".tif", ".tiff", ".btf", ".ndpi", ".vms",
    ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi", ".qptiff",
)
_MIB = 1 << 20
_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0, "micron": 1.0}
_LANCZOS_A = 3                    # PIL's Lanczos support, in source pixels per output pixel
_MAX_READ_PX = 8 * _MIB           # level pixels read at once by thumbnail() (~32 MB RGBA)
_MAX_WINDOW_PX = 64 * _MIB        # no single read is larger (~256 MB RGBA): bounded memory
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_CONVERT_HINT = ("give a whole-slide image (SVS, NDPI, MRXS, SCN, BIF, DICOM, tiled TIFF) or a "
                 "PNG, JPEG or TIFF image; convert other formats with e.g. `vips tiffsave in.xyz "
                 "out.tif --tile --pyramid --compression jpeg`")
_CORRUPT_HINT = ("the file looks truncated or corrupt: copy or export it again and check that "
                 "the transfer completed (compare file sizes or checksums)")


@dataclass(frozen=True)
class SlideInfo:
    """What is known about a slide; `to_dict()` gives a JSON-ready view."""

    path: str
    name: str
    vendor: str | None
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float
    mpp_y: float
    mpp_source: str
    objective_power: float | None
    fingerprint: str
    properties: dict[str, str] = field(repr=False)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["level_dimensions"] = [list(wh) for wh in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["properties"] = dict(self.properties)
        return d


def slide_name(path: str | Path) -> str:
    """File name without its slide suffix: 'a/b.ome.tiff' -> 'b', 'x.svs' -> 'x'."""
    base = Path(path).name
    low = base.lower()
    for suffix in _SLIDE_SUFFIXES:
        if low.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    stem = Path(base).stem
    return stem or base


def check_mpp(mpp: float | None, option: str = "--mpp") -> float | None:
    """Validate a user resolution: None or a number within MPP_RANGE (UsageError otherwise)."""
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {mpp!r} is not a number",
                         f"give microns per pixel, e.g. {option} 0.25 for a 40x scan") from None
    lo, hi = MPP_RANGE
    if not math.isfinite(value) or not lo <= value <= hi:
        raise UsageError(f"{option} {mpp!r} is outside the plausible range {lo:g}-{hi:g} microns "
                         "per pixel", f"e.g. {option} 0.25 for a 40x scan, {option} 0.5 for 20x")
    return value


def plausible_mpp(value: float | None) -> bool:
    lo, hi = MPP_RANGE
    return value is not None and lo <= value <= hi


def _check_path(path: Path) -> None:
    """Refuse paths that cannot be a slide file, with a fix."""
    if not path.exists():
        raise SlideError(f"slide not found: {path}",
                         "check the path and spelling (relative paths start in the current folder)")
    if path.is_dir():
        raise SlideError(f"{path} is a folder, not a slide file",
                         "pass the slide file itself (for MIRAX the .mrxs file, for DICOM one "
                         ".dcm file inside the folder)")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as err:
        raise SlideError(f"cannot read {path}: {err.strerror or err}",
                         "check the file permissions and that the disk is mounted") from None
    if size == 0:
        raise SlideError(f"{path} is empty (0 bytes)",
                         "the copy or export probably failed: copy the slide again")


class _OpenSlideSource:
    """OpenSlide behind the interface Slide reads through (see flat.FlatImage)."""

    def __init__(self, osr: openslide.OpenSlide, path: Path) -> None:
        self._osr, self.path = osr, path
        self.properties = {str(k): str(v) for k, v in osr.properties.items()}
        self.level_dimensions = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in osr.level_downsamples)
        self.vendor = self.properties.get(openslide.PROPERTY_NAME_VENDOR)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (round(x * ds), round(y * ds))
        try:
            rgba = self._osr.read_region(loc, level, (w, h))
        except openslide.OpenSlideError as err:
            raise SlideError(f"cannot read {w}x{h} px at {loc} (level {level}) of {self.path}: "
                             f"{err}", _CORRUPT_HINT) from None
        return _composite_on_white(rgba)

    def origin(self, level: int, x: int, y: int) -> tuple[float, float]:
        """Where OpenSlide places a read at level pixel (x, y): loc / downsample."""
        ds = self.level_downsamples[level]
        return round(x * ds) / ds, round(y * ds) / ds

    def close(self) -> None:
        self._osr.close()


def _open_source(path: Path) -> Any:
    """OpenSlide when it reads the file, else tifffile / Pillow (flat images), else SlideError."""
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        return _open_flat(path)
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        raise SlideError(f"cannot open {path}: {err}", _CORRUPT_HINT) from None
    try:
        return _OpenSlideSource(osr, path)
    except openslide.OpenSlideError as err:
        osr.close()
        raise SlideError(f"cannot read the structure of {path}: {err}", _CORRUPT_HINT) from None


def _open_flat(path: Path) -> Any:
    """A flat image (PNG, JPEG, flat TIFF, OME-TIFF), or the reason it cannot be read."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    is_tiff = magic in _TIFF_MAGIC
    if is_tiff and _tiff_problem(path) in ("truncated", "damaged"):
        raise _unsupported_error(path)
    try:
        flat = open_flat(path, is_tiff)
    except (OSError, ValueError, RuntimeError) as err:
        raise SlideError(f"cannot read {path}: {err}", _CORRUPT_HINT) from None
    if flat is None:
        raise _unsupported_error(path)
    return flat


def _unsupported_error(path: Path) -> SlideError:
    """Explain why neither OpenSlide nor the flat readers take a file."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic[:2] not in (b"II", b"MM"):
        return SlideError(f"{path} is not an image format usnet-wsi can read", _CONVERT_HINT)
    problem = _tiff_problem(path)
    if problem == "truncated":
        return SlideError(f"{path} is truncated: its TIFF directories point past the end of the "
                          f"file ({path.stat().st_size} bytes)", _CORRUPT_HINT)
    if problem == "damaged":
        return SlideError(f"{path} is a damaged TIFF (its structure cannot be parsed)",
                          _CORRUPT_HINT)
    return SlideError(f"{path} is a TIFF that usnet-wsi cannot read (unknown layout or corrupt)",
                      f"{_CORRUPT_HINT}; or {_CONVERT_HINT}")


def _tiff_problem(path: Path) -> str:
    """'truncated', 'damaged', 'flat' or 'unknown', from the TIFF structure (tifffile, quiet)."""
    log = logging.getLogger("tifffile")
    level, log.level = log.level, logging.CRITICAL
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            ends = [int(np.max(np.add(pg.dataoffsets, pg.databytecounts)))
                    for pg in pages if len(pg.dataoffsets)]
            if any(e > size for e in ends) or not pages:
                return "truncated"
            return "flat" if not pages[0].is_tiled else "unknown"
    except Exception:  # noqa: BLE001 - any parse failure means a damaged TIFF
        return "damaged"
    finally:
        log.level = level


def _positive(value: str | None) -> float | None:
    """A finite float > 0 parsed from a property value, else None."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mpp_from_openslide(props: dict[str, str]) -> tuple[float, float] | None:
    mx = _positive(props.get(openslide.PROPERTY_NAME_MPP_X))
    my = _positive(props.get(openslide.PROPERTY_NAME_MPP_Y))
    if mx is None and my is None:
        return None
    return (mx or my, my or mx)  # type: ignore[return-value]


def _mpp_from_tiff(props: dict[str, str]) -> tuple[float, float] | None:
    """mpp from tiff.XResolution/YResolution (pixels per unit) and tiff.ResolutionUnit."""
    um = _UM_PER_UNIT.get(props.get("tiff.ResolutionUnit", "").strip().lower())
    rx, ry = _positive(props.get("tiff.XResolution")), _positive(props.get("tiff.YResolution"))
    if um is None or (rx is None and ry is None):
        return None
    mx, my = um / (rx or ry), um / (ry or rx)  # type: ignore[operator]
    return (mx, my) if plausible_mpp(mx) and plausible_mpp(my) else None


def _mpp_from_ome(props: dict[str, str]) -> tuple[float, float] | None:
    mx, my = _positive(props.get("ome.mpp-x")), _positive(props.get("ome.mpp-y"))
    if mx is None and my is None:
        return None
    mx, my = mx or my, my or mx
    return (mx, my) if plausible_mpp(mx) and plausible_mpp(my) else None  # type: ignore


def _stored_mpp(path: Path, props: dict[str, str]) -> tuple[float, float, str] | None:
    """The file's own resolution (mpp_x, mpp_y, source), or None. A value that OpenSlide
    reports outside MPP_RANGE is refused (SlideError naming --mpp)."""
    found = _mpp_from_openslide(props)
    if found and not (plausible_mpp(found[0]) and plausible_mpp(found[1])):
        lo, hi = MPP_RANGE
        raise SlideError(f"{path}: the file says {found[0]:g} x {found[1]:g} microns per pixel, "
                         f"outside the plausible range {lo:g}-{hi:g}",
                         "pass the true resolution with --mpp, e.g. --mpp 0.25 for a 40x scan")
    if found:
        return found[0], found[1], "openslide"
    for source, fn in (("ome", _mpp_from_ome), ("tiff", _mpp_from_tiff)):
        found = fn(props)
        if found:
            return found[0], found[1], source
    return None


def _resolve_mpp(path: Path, props: dict[str, str], user_mpp: float | None,
                 reporter: Reporter | None) -> tuple[float, float, str]:
    """(mpp_x, mpp_y, source) following the documented order."""
    if user_mpp is not None:
        try:
            stored = _stored_mpp(path, props)
        except SlideError:
            stored = None
        if stored and reporter is not None and abs(stored[0] / user_mpp - 1) > 0.05:
            reporter.info(f"{path.name}: using --mpp {user_mpp:g} um/px instead of the "
                          f"{stored[0]:.4g} um/px stored in the file")
        return user_mpp, user_mpp, "user"
    stored = _stored_mpp(path, props)
    if stored:
        return stored
    objective = _positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if objective and plausible_mpp(10.0 / objective):
        mpp = 10.0 / objective
        if reporter is not None:
            reporter.warn(f"{path.name}: no pixel size in the file; assuming {mpp:.4g} um/px from "
                          f"the {objective:g}x objective (pass --mpp to set it exactly)")
        return mpp, mpp, "objective"
    raise SlideError(f"{path}: the pixel size (microns per pixel) is unknown: the file has no "
                     "mpp, TIFF resolution or objective power",
                     "pass it with --mpp, e.g. --mpp 0.25 for a 40x scan or --mpp 0.5 for 20x")


def fingerprint(path: str | Path, level_dimensions: tuple[tuple[int, int], ...]) -> str:
    """sha256 hex over file size, first and last MiB and the level dimensions (fast, stable)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    h.update(f"size={size};levels={list(level_dimensions)};".encode())
    with p.open("rb") as fh:
        h.update(fh.read(_MIB))
        if size > _MIB:
            fh.seek(max(size - _MIB, _MIB))
            h.update(fh.read(_MIB))
    return h.hexdigest()


def open_slide(path: str | Path, mpp: float | None = None,
               reporter: Reporter | None = None) -> "Slide":
    """Open a whole-slide image, or a flat image (PNG, JPEG, flat TIFF, OME-TIFF) that OpenSlide
    does not read. SlideError (with a fix) if it cannot be used.

    `mpp` (microns per level-0 pixel) overrides whatever the file says.
    """
    user_mpp = check_mpp(mpp)
    p = Path(os.fspath(path)).expanduser()
    _check_path(p)
    source = _open_source(p)
    try:
        info = _describe(p, source, user_mpp, reporter)
    except BaseException:
        source.close()
        raise
    return Slide(source, info)


def _describe(p: Path, source: Any, user_mpp: float | None,
              reporter: Reporter | None) -> SlideInfo:
    props = dict(source.properties)
    dims = tuple((int(w), int(h)) for w, h in source.level_dimensions)
    downs = tuple(float(d) for d in source.level_downsamples)
    if not dims or dims[0][0] <= 0 or dims[0][1] <= 0:
        raise SlideError(f"{p} has no image pixels (level dimensions {dims})", _CORRUPT_HINT)
    mpp_x, mpp_y, mpp_source = _resolve_mpp(p, props, user_mpp, reporter)
    return SlideInfo(
        path=str(p), name=slide_name(p), vendor=source.vendor,
        width=dims[0][0], height=dims[0][1], level_dimensions=dims, level_downsamples=downs,
        mpp_x=mpp_x, mpp_y=mpp_y, mpp_source=mpp_source,
        objective_power=_positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        fingerprint=fingerprint(p, dims), properties=props,
    )


def _composite_on_white(rgba: Image.Image) -> np.ndarray:
    """uint8 (h, w, 3): RGBA (OpenSlide, not premultiplied) over a white background."""
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:  # opaque: drop the alpha band
        return np.asarray(rgba.convert("RGB"))
    if not any(alpha.histogram()[1:255]):  # inside (255) or outside the slide (0) only
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)  # its alpha as the mask: exact where that is 0 or 255
        return np.asarray(out)
    a = np.asarray(rgba)
    alpha = a[..., 3:4].astype(np.uint16)
    rgb = a[..., :3].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


class Slide:
    """An open slide. Context manager; `close()` releases the file."""

    def __init__(self, source: Any, info: SlideInfo) -> None:
        self._src = source        # _OpenSlideSource or flat.FlatImage
        self._retired: list[Any] = []
        self._lock = threading.Lock()
        self.info = info

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle (idempotent)."""
        for src in self._retired:
            src.close()
        self._retired = []
        if self._src is not None:
            self._src.close()
            self._src = None

    def reopen(self) -> None:
        """Open the file again for later reads (OpenSlide refuses every read after one error).
        The old handle is closed with the slide: other threads may still be using it."""
        fresh = _open_source(Path(self.info.path))
        with self._lock:
            self._retired.append(self._src)
            self._src = fresh

    def fresh(self) -> "Slide":
        """A second, private handle on the same file (close it after use)."""
        return Slide(_open_source(Path(self.info.path)), self.info)

    def __repr__(self) -> str:
        i = self.info
        return f"Slide({i.path!r}, {i.width}x{i.height}, mpp={i.mpp_x:.4g}, levels={i.level_count})"

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample is <= `downsample` (level 0 if none)."""
        best = 0
        for level, d in enumerate(self.info.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = level
        return best

    def read_region(self, box_l0: tuple[int, int, int, int],
                    out_size: tuple[int, int]) -> np.ndarray:
        """Read box_l0 = (x0, y0, x1, y1) (level-0 px, may cross the slide edge) resized to
        out_size = (w, h); uint8 (h, w, 3) RGB, white outside the slide.

        Reads from the coarsest level that still has at least the output resolution.
        SlideError if the slide data cannot be decoded.
        """
        x0, y0, x1, y1 = (int(v) for v in box_l0)
        w, h = (int(v) for v in out_size)
        if x1 <= x0 or y1 <= y0 or w <= 0 or h <= 0:
            raise ValueError(f"read_region: empty box {box_l0} or output size {out_size}")
        return self._read(float(x0), float(y0), float(x1), float(y1), w, h)

    def read_region_f(self, box_l0: tuple[float, float, float, float],
                      out_size: tuple[int, int]) -> np.ndarray:
        """`read_region` with fractional level-0 box edges."""
        x0, y0, x1, y1 = (float(v) for v in box_l0)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"read_region: empty box {box_l0}")
        return self._read(x0, y0, x1, y1, int(out_size[0]), int(out_size[1]))

    def _read(self, x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> np.ndarray:
        """Core reader; float level-0 box edges (thumbnail bands use fractional edges).

        When resampling, the window read carries a margin for the filter's support, so a read
        equals the matching part of any larger read (tiles and bands join without seams).
        """
        if self._src is None:
            raise SlideError(f"{self.info.path} is closed", "open the slide again")
        level = self.best_level(min((x1 - x0) / w, (y1 - y0) / h))
        ds = self.info.level_downsamples[level]
        fx0, fy0, fx1, fy1 = x0 / ds, y0 / ds, x1 / ds, y1 / ds   # the box in level pixels
        exact = (fx0.is_integer() and fy0.is_integer() and (fx1 - fx0, fy1 - fy0) == (w, h))
        margin = 0 if exact else math.ceil(_LANCZOS_A * max(1.0, (fx1 - fx0) / w,
                                                              (fy1 - fy0) / h)) + 1
        lx0, ly0 = math.floor(fx0) - margin, math.floor(fy0) - margin
        size = (math.ceil(fx1) + margin - lx0, math.ceil(fy1) + margin - ly0)
        if size[0] * size[1] > _MAX_WINDOW_PX:
            raise ValueError(f"read_region: {size[0]}x{size[1]} level-{level} px at once is "
                             f"over the {_MAX_WINDOW_PX} px bound")
        rgb = self._src.read(level, lx0, ly0, size[0], size[1])
        if exact:
            return rgb
        ox, oy = self._src.origin(level, lx0, ly0)   # window origin as the reader places it
        box = (fx0 - ox, fy0 - oy, fx1 - ox, fy1 - oy)
        img = Image.fromarray(rgb).resize((w, h), Image.Resampling.LANCZOS, box=box)
        return np.asarray(img)

    def thumbnail(self, max_side: int = 2048,
                  read: Any = None) -> tuple[np.ndarray, float]:
        """(uint8 RGB image whose longer side is <= max_side, scale = thumbnail px per level-0 px).

        Never upsamples (scale <= 1). Reads in bands so that single-level slides stay in memory;
        `read(box_l0, out_size)`, when given, reads each band (a `TolerantReader`'s).
        """
        if max_side < 1:
            raise ValueError(f"thumbnail: max_side must be >= 1, got {max_side}")
        W, H = self.info.width, self.info.height
        scale = min(1.0, max_side / max(W, H))
        tw, th = max(1, round(W * scale)), max(1, round(H * scale))
        sx, sy = W / tw, H / th   # level-0 px per thumbnail px, per axis
        level_ds = self.info.level_downsamples[self.best_level(min(sx, sy))]
        rows_per_band = max(1, int(_MAX_READ_PX / max(1.0, W / level_ds) / (sy / level_ds)))
        bands = []
        for r0 in range(0, th, rows_per_band):
            r1 = min(th, r0 + rows_per_band)
            box = (0.0, r0 * sy, float(W), r1 * sy)
            bands.append(read(box, (tw, r1 - r0)) if read else self._read(*box, tw, r1 - r0))
        return np.concatenate(bands, axis=0), scale


class IsotropicView:
    """Geometry of a slide with non-square pixels seen on a square grid: x is stretched by
    `fx`, y by `fy`, so that one view pixel is `mpp` microns on both axes (the finer of mpp_x
    and mpp_y). `l0_box` and `to_l0` map view coordinates back to level 0."""

    def __init__(self, mpp_x: float, mpp_y: float) -> None:
        self.mpp = min(mpp_x, mpp_y)
        self.fx, self.fy = mpp_x / self.mpp, mpp_y / self.mpp

    def size(self, width_l0: int, height_l0: int) -> tuple[int, int]:
        return math.ceil(width_l0 * self.fx), math.ceil(height_l0 * self.fy)

    def l0_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        return (x0 / self.fx, y0 / self.fy, x1 / self.fx, y1 / self.fy)

    def to_l0(self, xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy, dtype=np.float64) / (self.fx, self.fy)


class TolerantReader:
    """The region reader `segment` hands to the engine: a read that fails is retried once on a
    fresh handle; if that fails too the tile is white (it holds no nuclei) and the failure is
    recorded in `failures` (level-0 box and reason). With `strict` the error is raised instead.
    With a `view`, boxes are in the view's square-pixel frame.
    """

    def __init__(self, slide: "Slide", strict: bool = False,
                 view: IsotropicView | None = None) -> None:
        self.slide, self.strict, self.view = slide, strict, view
        self.failures: list[dict[str, Any]] = []            # tiles
        self.thumbnail_failures: list[dict[str, Any]] = []  # parts of the thumbnail
        self._lock = threading.Lock()

    def _read(self, slide: "Slide", box: tuple[float, float, float, float],
              out_size: tuple[int, int]) -> np.ndarray:
        if self.view is None and all(float(v).is_integer() for v in box):
            return slide.read_region(tuple(int(v) for v in box), out_size)  # type: ignore
        l0 = box if self.view is None else self.view.l0_box(box)
        return slide.read_region_f(l0, out_size)

    def _twice(self, box: tuple[float, float, float, float],
               out_size: tuple[int, int]) -> np.ndarray:
        """Read; on a SlideError reopen the file and read again on a private handle."""
        try:
            return self._read(self.slide, box, out_size)
        except SlideError:
            pass
        self.slide.reopen()                    # later tiles read from a clean handle
        with self.slide.fresh() as private:    # a second failure cannot spoil it
            return self._read(private, box, out_size)

    def _skip(self, box: tuple[float, float, float, float], out_size: tuple[int, int],
              err: SlideError) -> np.ndarray:
        if self.strict:
            raise err
        with self._lock:
            self.failures.append({"box_l0": self._failure_box(box), "error": err.message})
        w, h = out_size
        return np.full((int(h), int(w), 3), 255, np.uint8)

    def _failure_box(self, box: tuple[float, float, float, float]) -> list[float]:
        """How a failure records a box: level 0, rounded to 0.1 px."""
        l0 = box if self.view is None else self.view.l0_box(box)
        return [round(float(v), 1) for v in l0]

    def failures_in(self, tiles: "list[Any]") -> list[dict[str, Any]]:
        """The recorded failures of these tiles (objects with a `read_l0` box), in tile
        order."""
        with self._lock:
            by_box = {tuple(f["box_l0"]): f for f in self.failures}
        found = (by_box.get(tuple(self._failure_box(t.read_l0))) for t in tiles)
        return [f for f in found if f is not None]

    def read_region(self, box: tuple[float, float, float, float],
                    out_size: tuple[int, int]) -> np.ndarray:
        try:
            return self._twice(box, out_size)
        except SlideError as err:
            return self._skip(box, out_size, err)

    def read_parts(self, box: tuple[float, float, float, float], out_size: tuple[int, int],
                   min_side: int = 32) -> np.ndarray:
        """`read_region` for a large box: an unreadable box is halved (longer side) until the
        readable parts are read and the unreadable ones, at most `min_side` px, are white."""
        try:
            return self._twice(box, out_size)
        except SlideError as err:
            w, h = out_size
            if max(w, h) <= min_side or self.strict:
                return self._skip(box, out_size, err)
        x0, y0, x1, y1 = box
        if w >= h:
            k, xm = w // 2, x0 + (x1 - x0) * (w // 2) / w
            parts = [self.read_parts((x0, y0, xm, y1), (k, h), min_side),
                     self.read_parts((xm, y0, x1, y1), (w - k, h), min_side)]
            return np.concatenate(parts, axis=1)
        k, ym = h // 2, y0 + (y1 - y0) * (h // 2) / h
        parts = [self.read_parts((x0, y0, x1, ym), (w, k), min_side),
                 self.read_parts((x0, ym, x1, y1), (w, h - k), min_side)]
        return np.concatenate(parts, axis=0)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """The slide's thumbnail, its bands read with `read_parts` (level-0 frame); what could
        not be read is in `thumbnail_failures`."""
        plain = TolerantReader(self.slide, self.strict)
        plain.failures = self.thumbnail_failures
        return self.slide.thumbnail(max_side, read=plain.read_parts)
