"""OME-Zarr (NGFF 0.5, zarr v3) store with the nuclei instance-label pyramid and a table.

Layout of ``<slide>.zarr`` (the only module that imports zarr)::

    zarr.json                 {"ome": {"version": "0.5"}, "usnet_wsi": {...summary...}}
    labels/zarr.json          {"ome": {"version": "0.5", "labels": ["nuclei"]}}
    labels/nuclei/zarr.json   {"ome": {"version": "0.5", "multiscales": [...],
                                       "image-label": {...}}}
    labels/nuclei/0, 1, ...   uint32 (y, x) label arrays; level k = level 0 sampled every 2**k px
    tables/nuclei/            one row per nucleus, in the order of `add` calls:
        id          uint32 (N,)     the label value in labels/nuclei
        centroid_x  float64 (N,)    polygon centroid, level-0 px (pixel-edge frame)
        centroid_y  float64 (N,)
        bbox        float64 (N, 4)  polygon bounds x0, y0, x1, y1, level-0 px
        area_px     float64 (N,)    polygon area in level-0 px^2 (not the rasterised count)
        score       float32 (N,)    detection probability

The store holds labels only, no image; ``image-label/source`` carries what the caller gives
(e.g. the slide name and fingerprint). Level 0 has the slide's level-0 size; each further
level halves it (nearest neighbour: every other pixel) until both sides are below
`min_level_px`. Scales are mpp * 2**k micrometre per pixel.

Pixel (row r, column c) gets a nucleus' label when its centre (c + 0.5, r + 0.5) lies strictly
inside the polygon; polygons added later overwrite earlier ones where they overlap.

Streaming: nuclei arrive roughly in row-major order through `add`. The caller promises with
`complete_above(y_l0)` that no later nucleus reaches a pixel row above `y_l0`; every band of
rows (a multiple of the chunk height) lying wholly above is then rasterised and written, and
its pyramid rows are buffered until a whole chunk row of each level can be written. Memory:
one band plus less than one band of pyramid rows plus the pending nuclei.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import zarr
from zarr.codecs import BloscCodec

from usnet_wsi.writers.atomic import AbortOnError, AtomicTarget, call_or_abort

NGFF_VERSION = "0.5"
LABEL_NAME = "nuclei"
TABLE_PATH = "tables/nuclei"
_MAX_LABEL = 2**32 - 1


def pyramid_shapes(height: int, width: int, min_level_px: int = 1024) -> list[tuple[int, int]]:
    """(h, w) of each level: level 0, then halved (rounded up) until both sides < min_level_px."""
    if min_level_px < 2:
        raise ValueError(f"min_level_px must be >= 2, got {min_level_px}")
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) >= min_level_px:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def pixel_rows(lo: float, hi: float) -> tuple[int, int]:
    """Half-open range of pixel indices whose centre (i + 0.5) lies strictly in (lo, hi)."""
    return math.floor(lo - 0.5) + 1, math.ceil(hi - 0.5)


def rasterize_into(out: np.ndarray, polygon_l0: Any, label: int, y0_l0: int = 0,
                   x0_l0: int = 0) -> int:
    """Write `label` where pixel centres of `out` lie strictly inside the polygon.

    `out[r, c]` is the level-0 pixel (x0_l0 + c, y0_l0 + r); the polygon is in level-0 px.
    Returns the number of pixels set.
    """
    minx, miny, maxx, maxy = polygon_l0.bounds
    r_lo, r_hi = (v - y0_l0 for v in pixel_rows(miny, maxy))
    c_lo, c_hi = (v - x0_l0 for v in pixel_rows(minx, maxx))
    r_lo, c_lo = max(r_lo, 0), max(c_lo, 0)
    r_hi, c_hi = min(r_hi, out.shape[0]), min(c_hi, out.shape[1])
    if r_lo >= r_hi or c_lo >= c_hi:
        return 0
    xs = np.arange(c_lo, c_hi, dtype=np.float64) + (x0_l0 + 0.5)
    ys = np.arange(r_lo, r_hi, dtype=np.float64) + (y0_l0 + 0.5)
    inside = shapely.contains_xy(polygon_l0, xs[None, :], ys[:, None])
    out[r_lo:r_hi, c_lo:c_hi][inside] = label
    return int(inside.sum())


@dataclass
class _Pending:
    label: int
    polygon: Any
    row_start: int  # first pixel row the polygon can cover
    row_end: int  # exclusive: no pixel row at or below this one is covered


class _LevelSink:
    """Rows of one pyramid level; written to zarr in whole chunk rows."""

    def __init__(self, array: Any, stride: int) -> None:
        self.array = array
        self.stride = stride
        self.parts: list[np.ndarray] = []
        self.n_buffered = 0
        self.next_row = 0

    def push_band(self, band: np.ndarray, y0_l0: int) -> None:
        """Take the rows of this level sampled from a level-0 band that starts at y0_l0."""
        s = self.stride
        first = -(-y0_l0 // s) * s - y0_l0
        part = band[first::s, ::s]
        if part.shape[0]:
            self.parts.append(part if s == 1 else part.copy())
            self.n_buffered += part.shape[0]
        chunk_h = self.array.chunks[0]
        if self.n_buffered >= chunk_h:
            self._write((self.n_buffered // chunk_h) * chunk_h)

    def flush(self) -> None:
        """Write whatever is buffered (the last, partial chunk row)."""
        if self.n_buffered:
            self._write(self.n_buffered)

    def _write(self, n_rows: int) -> None:
        block = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        self.array[self.next_row : self.next_row + n_rows, :] = block[:n_rows]
        self.next_row += n_rows
        rest = block[n_rows:]
        self.parts = [rest] if rest.shape[0] else []
        self.n_buffered = rest.shape[0]


def _multiscales(shapes: list[tuple[int, int]], mpp_x: float, mpp_y: float) -> list[dict]:
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in ("y", "x")]
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [{"type": "scale", "scale": [mpp_y * 2**k, mpp_x * 2**k]}],
        }
        for k in range(len(shapes))
    ]
    method = "level k pixel [r, c] = level 0 pixel [r * 2**k, c * 2**k] (stride sampling)"
    return [
        {"name": LABEL_NAME, "axes": axes, "datasets": datasets, "type": "nearest",
         "metadata": {"method": method}}
    ]


class _Table:
    """Per-nucleus columns, buffered and appended to 1-D (bbox: N x 4) arrays in chunks."""

    COLUMNS = {"id": "uint32", "centroid_x": "float64", "centroid_y": "float64",
               "bbox": "float64", "area_px": "float64", "score": "float32"}

    def __init__(self, group: Any, chunk_rows: int) -> None:
        self.chunk_rows = chunk_rows
        self.arrays = {}
        for name, dtype in self.COLUMNS.items():
            shape, chunks = ((0, 4), (chunk_rows, 4)) if name == "bbox" else ((0,), (chunk_rows,))
            self.arrays[name] = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                                   fill_value=0)
        self.rows: dict[str, list] = {name: [] for name in self.COLUMNS}
        self.n_rows = 0

    def append(self, label: int, polygon_l0: Any, score: float) -> None:
        c = polygon_l0.centroid
        for name, value in (("id", label), ("centroid_x", c.x), ("centroid_y", c.y),
                            ("bbox", polygon_l0.bounds), ("area_px", polygon_l0.area),
                            ("score", score)):
            self.rows[name].append(value)
        self.n_rows += 1
        if len(self.rows["id"]) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows["id"]:
            return
        for name, dtype in self.COLUMNS.items():
            self.arrays[name].append(np.asarray(self.rows[name], dtype=dtype))
            self.rows[name] = []


class LabelZarrWriter(AbortOnError):
    """Band-by-band, atomic writer of the nuclei label pyramid and table (see module doc).

    Use as a context manager, or call `close()` (commit) / `abort()` (remove everything).
    """

    def __init__(
        self,
        path: str | Path,
        width_l0: int,
        height_l0: int,
        mpp_x: float,
        mpp_y: float,
        *,
        chunk_px: int = 1024,
        band_chunks: int = 1,
        min_level_px: int = 1024,
        table_chunk: int = 65536,
        source: dict | None = None,
    ) -> None:
        for name, value in (("width_l0", width_l0), ("height_l0", height_l0),
                            ("chunk_px", chunk_px), ("band_chunks", band_chunks),
                            ("table_chunk", table_chunk)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (mpp_x > 0 and mpp_y > 0):
            raise ValueError(f"mpp must be > 0, got mpp_x={mpp_x}, mpp_y={mpp_y}")
        self.path = Path(path)
        self.width_l0, self.height_l0 = int(width_l0), int(height_l0)
        self.shapes = pyramid_shapes(self.height_l0, self.width_l0, min_level_px)
        self.band_rows = int(chunk_px) * int(band_chunks)
        self.rows_done = 0  # every pixel row above this one is written
        self.n_added = 0
        self._pending: list[_Pending] = []
        self._target = AtomicTarget(self.path)
        self._open = True
        self._guard(self._create, int(chunk_px), int(table_chunk), float(mpp_x), float(mpp_y),
                    dict(source or {}))

    def _create(self, chunk_px: int, table_chunk: int, mpp_x: float, mpp_y: float,
                source: dict) -> None:
        summary = {"labels": f"labels/{LABEL_NAME}", "table": TABLE_PATH,
                   "width_l0": self.width_l0, "height_l0": self.height_l0,
                   "mpp_x": mpp_x, "mpp_y": mpp_y}
        root = zarr.open_group(self._target.temp, mode="w", zarr_format=3,
                               attributes={"ome": {"version": NGFF_VERSION}, "usnet_wsi": summary})
        root.create_group("labels", attributes={"ome": {"version": NGFF_VERSION,
                                                        "labels": [LABEL_NAME]}})
        image_label = {"version": NGFF_VERSION,
                       "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}], "source": source}
        ome = {"version": NGFF_VERSION, "multiscales": _multiscales(self.shapes, mpp_x, mpp_y),
               "image-label": image_label}
        labels = root.create_group(f"labels/{LABEL_NAME}", attributes={"ome": ome})
        self._sinks = [
            _LevelSink(self._level_array(labels, k, shape, chunk_px), 2**k)
            for k, shape in enumerate(self.shapes)
        ]
        table_attrs = {"usnet_wsi": {"label_image": f"labels/{LABEL_NAME}",
                                     "frame": "level-0 pixels", "rows": "one per nucleus"}}
        self._table = _Table(root.create_group(TABLE_PATH, attributes=table_attrs), table_chunk)

    @staticmethod
    def _level_array(group: Any, k: int, shape: tuple[int, int], chunk_px: int) -> Any:
        chunks = (min(chunk_px, shape[0]), min(chunk_px, shape[1]))
        return group.create_array(
            str(k), shape=shape, chunks=chunks, dtype="uint32", fill_value=0,
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
            dimension_names=["y", "x"],
        )

    def _guard(self, fn: Any, *args: Any) -> None:
        call_or_abort(self.path, self.abort, fn, *args)

    @property
    def n_pending(self) -> int:
        """Nuclei added whose rows are not all written yet (held in memory)."""
        return len(self._pending)

    def add(self, label: int, polygon_l0: Any, score: float) -> None:
        """Queue one nucleus (label value >= 1, shapely polygon in level-0 px, score)."""
        if not self._open:
            raise ValueError(f"the label writer for {self.path} is closed")
        if not 1 <= int(label) <= _MAX_LABEL:
            raise ValueError(f"label must be in 1..{_MAX_LABEL}, got {label}")
        if polygon_l0 is None or polygon_l0.is_empty:
            raise ValueError(f"nucleus {label} has an empty polygon")
        _, miny, _, maxy = polygon_l0.bounds
        row_start, row_end = pixel_rows(miny, maxy)
        row_start, row_end = max(row_start, 0), min(row_end, self.height_l0)
        if row_start < row_end:
            if row_start < self.rows_done:
                raise ValueError(
                    f"nucleus {label} reaches pixel row {row_start}, but rows above "
                    f"{self.rows_done} were already declared complete and written"
                )
            shapely.prepare(polygon_l0)
            self._pending.append(_Pending(int(label), polygon_l0, row_start, row_end))
        self._guard(self._table.append, int(label), polygon_l0, float(score))
        self.n_added += 1

    def complete_above(self, y_l0: float) -> None:
        """Promise: no nucleus added later reaches a pixel row above y_l0. Writes done bands."""
        if not self._open:
            raise ValueError(f"the label writer for {self.path} is closed")
        self._guard(self._flush_bands, min(math.floor(y_l0), self.height_l0))

    def _flush_bands(self, limit: int) -> None:
        while self.rows_done < self.height_l0:
            y0, y1 = self.rows_done, min(self.rows_done + self.band_rows, self.height_l0)
            if y1 > limit:
                return
            band = np.zeros((y1 - y0, self.width_l0), dtype=np.uint32)
            keep = []
            for item in self._pending:
                if item.row_start < y1:
                    rasterize_into(band, item.polygon, item.label, y0_l0=y0)
                if item.row_end > y1:
                    keep.append(item)
            self._pending = keep
            for sink in self._sinks:
                sink.push_band(band, y0)
            self.rows_done = y1

    def close(self) -> None:
        """Write all remaining bands, pyramid rows and table rows; rename into place."""
        if not self._open:
            return
        self._guard(self._finish)

    def _finish(self) -> None:
        self._flush_bands(self.height_l0)
        for sink in self._sinks:
            sink.flush()
        self._table.flush()
        self._pending = []
        self._open = False
        self._target.commit()

    def abort(self) -> None:
        """Remove the temporary store; the final path is untouched."""
        self._open = False
        self._pending = []
        self._target.abort()

