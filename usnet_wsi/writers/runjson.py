"""`<slide>.run.json`: provenance of a run, written atomically with sorted keys.

`provenance()` gathers the basics (package versions without importing torch, Python,
platform, command line, UTC times); the caller adds settings, weights, slide and counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any, Sequence

import numpy as np

from usnet_wsi import __version__
from usnet_wsi.writers.atomic import atomic_path, output_error

_PACKAGES = ("torch", "numpy", "shapely", "zarr", "openslide-python", "openslide-bin",
             "scikit-image", "tifffile")


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a 'Z' suffix, to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_versions(names: Sequence[str] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions of the given distributions (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(argv: Sequence[str] | None = None, started_utc: str | None = None,
               finished_utc: str | None = None) -> dict[str, Any]:
    """Basic provenance: versions, Python, platform, command line and start/end UTC times.

    `argv` defaults to sys.argv; `started_utc` defaults to now; `finished_utc` stays None
    until given (set it with `utc_now()` when the run ends).
    """
    return {
        "usnet_wsi_version": __version__,
        "python": platform.python_version(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "argv": list(sys.argv if argv is None else argv),
        "started_utc": started_utc or utc_now(),
        "finished_utc": finished_utc,
    }


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for numpy scalars/arrays, paths, dataclasses, tuples and sets.

    Non-finite floats become None (JSON has no NaN or Infinity); dict keys become strings.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} to run.json: {value!r}")


def write_run_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON (sorted keys, indent 2, trailing newline) atomically."""
    text = json.dumps(to_jsonable(data), sort_keys=True, indent=2, ensure_ascii=False,
                      allow_nan=False) + "\n"
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise output_error(Path(path), exc) from exc
