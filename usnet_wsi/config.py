"""Settings as frozen dataclasses, validated in one place.

Every bad value raises `UsageError` (exit 2) naming the offending value, the rule and the fix,
before any slide is opened or any file is written.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from usnet_wsi.errors import UsageError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SCHEDULER_RE = re.compile(r"^(?:(?:tcp|tls|ucx|ws|wss)://)?"
                           r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?)"
                           r":(\d{1,5})$")
Box = tuple[int, int, int, int]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTA_CHOICES = ("none", "flip", "flips")   # usnet_wsi.tta.TTA_MODES


def check_device(device: str) -> str:
    """Validate a device spec: auto, cpu, cuda or cuda:N (lower case, no spaces)."""
    spec = str(device).strip().lower()
    if not _DEVICE_RE.match(spec):
        raise UsageError(f"--device {device!r} is not a device",
                         "use --device auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    return spec


def check_scheduler(address: Any) -> str | None:
    """None, or a dask scheduler address: [tcp|tls|ucx|ws|wss://]HOST:PORT (tcp by default)."""
    if address is None:
        return None
    text = str(address).strip()
    m = _SCHEDULER_RE.match(text)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise UsageError(f"--scheduler {address!r} is not a dask scheduler address",
                         "give it as tcp://HOST:PORT, e.g. --scheduler tcp://10.0.0.5:8786 "
                         "(the address `dask scheduler` prints)")
    return text


def check_positive_int(value: Any, option: str, example: int, maximum: int = 1 << 16,
                       minimum: int = 1) -> int:
    """An int in [minimum, maximum] (bools refused), else UsageError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise UsageError(f"{option} {value!r} must be a whole number from {minimum} to "
                         f"{maximum}", f"e.g. {option} {example}")
    return value


MPP_RANGE = (0.05, 5.0)   # microns per pixel that a slide can plausibly have


def check_mpp(mpp: Any) -> float | None:
    """None, or a number within MPP_RANGE (microns per level-0 pixel)."""
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    lo, hi = MPP_RANGE
    if not math.isfinite(value) or not lo <= value <= hi:
        raise UsageError(f"--mpp {mpp!r} is outside the plausible range {lo:g}-{hi:g} microns "
                         "per pixel", "e.g. --mpp 0.25 for a 40x scan, --mpp 0.5 for 20x")
    return value


def check_roi(roi: Any) -> Box | None:
    """None, or (x, y, w, h) level-0 integers with x, y >= 0 and w, h > 0."""
    if roi is None:
        return None
    try:
        x, y, w, h = (v for v in roi)
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (x, y, w, h))
    except (TypeError, ValueError):
        ok = False
    if not ok or x < 0 or y < 0 or w <= 0 or h <= 0:
        raise UsageError(f"--roi {roi!r}: needs X,Y,W,H integers with X,Y >= 0 and W,H > 0",
                         "e.g. --roi 0,0,2000,2000 (level-0 pixels)")
    return (x, y, w, h)


def check_iou(value: Any) -> float:
    """A float in (0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not 0 < v <= 1:
        raise UsageError(f"IoU threshold {value!r} must be in (0, 1]", "e.g. 0.3")
    return v


def default_workers() -> int:
    """CPU-stage processes by default: none on machines of 2 cores or fewer (the model already
    uses every core, and extra processes only compete with it), else up to 4."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores - 2)


@dataclass(frozen=True)
class SlideOptions:
    """How to read a slide: resolution override, region of interest, tissue detection."""

    mpp: float | None = None
    roi_xywh: Box | None = None          # level-0 x, y, w, h; None = whole slide
    tissue_mask: bool = True              # False: process every tile of the ROI

    def __post_init__(self) -> None:
        object.__setattr__(self, "mpp", check_mpp(self.mpp))
        object.__setattr__(self, "roi_xywh", check_roi(self.roi_xywh))
        object.__setattr__(self, "tissue_mask", bool(self.tissue_mask))


@dataclass(frozen=True)
class SegmentConfig:
    """Everything `segment` needs besides the slide paths. Validated on construction."""

    out_dir: Path
    slide: SlideOptions = SlideOptions()
    weights: Path | None = None           # None: the default bundle
    device: str = "auto"
    batch_size: int = 8
    workers: int | None = None            # CPU-stage worker processes; 0 = in the main process
    geojson_gz: bool = False
    overwrite: bool = False
    strict: bool = False                  # an unreadable tile fails the slide (else skipped)
    iou_threshold: float = 0.3            # cross-tile duplicate rule (polygon IoU)
    precision: str = "auto"               # network precision: auto, fp32, bf16, fp16 (CUDA)
    tile_px: int | None = None            # inference tile side; None: the bundle's
    tta: str = "none"                     # test-time flips: none, flip (2 passes), flips (4)
    resume: bool = True                   # continue an interrupted run from its journal
    argv: tuple[str, ...] = ()            # the command line, recorded in run.json
    scheduler: str | None = None          # dask scheduler the slides ran through; None: locally
    worker: str | None = None             # address of the dask worker that ran the slide

    def __post_init__(self) -> None:
        if not isinstance(self.slide, SlideOptions):
            raise TypeError("slide must be SlideOptions")
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights))
        object.__setattr__(self, "device", check_device(self.device))
        check_positive_int(self.batch_size, "--batch-size", 8)
        if self.workers is None:
            object.__setattr__(self, "workers", default_workers())
        check_positive_int(self.workers, "--workers", 2, maximum=256, minimum=0)
        object.__setattr__(self, "iou_threshold", check_iou(self.iou_threshold))
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not a precision",
                             f"use one of {', '.join(PRECISIONS)}")
        if self.tta not in TTA_CHOICES:
            raise UsageError(f"--tta {self.tta!r} is not a test-time augmentation",
                             f"use one of {', '.join(TTA_CHOICES)}")
        if self.tile_px is not None:
            check_positive_int(self.tile_px, "--tile-px", 556, maximum=4096, minimum=128)
            if self.tile_px % 4:
                raise UsageError(f"--tile-px {self.tile_px} must be a multiple of 4",
                                 "e.g. --tile-px 556")
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        object.__setattr__(self, "scheduler", check_scheduler(self.scheduler))
        if self.worker is not None:
            object.__setattr__(self, "worker", str(self.worker))

    @property
    def prefetch_tiles(self) -> int:
        """Tiles read ahead of the model: enough to fill two batches and keep readers busy."""
        return 2 * self.batch_size + 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings), as recorded in run.json."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["weights"] = None if self.weights is None else str(self.weights)
        roi = self.slide.roi_xywh
        d["slide"]["roi_xywh"] = None if roi is None else list(roi)
        d["argv"] = list(self.argv)
        return d
