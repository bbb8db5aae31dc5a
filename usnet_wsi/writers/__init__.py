"""Output writers: serialise only, each output atomic (temporary name, rename when complete).

- atomic.py:   `atomic_path`, `AtomicTarget`, `outputs_complete`
- geojson.py:  `GeoJSONWriter` (QuPath detections, streaming, optional gzip)
- zarr.py:     `LabelZarrWriter` (OME-Zarr NGFF 0.5 label pyramid + per-nucleus table)
- overview.py: `write_overview` (thumbnail PNG with a nuclei-density heatmap)
- runjson.py:  `write_run_json`, `provenance`, `utc_now`

Names are imported lazily, so `import usnet_wsi.writers` does not import zarr, PIL or scipy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "atomic_path": "atomic",
    "AtomicTarget": "atomic",
    "outputs_complete": "atomic",
    "GeoJSONWriter": "geojson",
    "LabelZarrWriter": "zarr",
    "write_overview": "overview",
    "write_run_json": "runjson",
    "provenance": "runjson",
    "utc_now": "runjson",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'usnet_wsi.writers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"usnet_wsi.writers.{module}"), name)
