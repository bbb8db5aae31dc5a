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
inside the polygon (`usnet_wsi.geometry.fill_polygons`, the rasteriser shared with
`polygon_to_mask`); polygons added later overwrite earlier ones where they overlap.

Streaming: nuclei arrive roughly in row-major order through `add`. The caller promises with
`complete_above(y_l0)` that no later nucleus reaches a pixel row above `y_l0`; every band of
rows (`band_chunks` chunk rows) lying wholly above is then written, one chunk column at a time:

- level 0: only the chunks that some pending nucleus touches are rasterised (one chunk-sized
  array at a time) and written whole; every other chunk is never written and reads as the
  fill value 0;
- level k >= 1: each written level-0 chunk hands its stride-2**k samples to the level-k chunk
  it falls in; the samples of a band that land in one level-k chunk are gathered in a buffer
  no larger than that chunk and written, as a partial-chunk region that zarr merges into the
  stored chunk, once the band moves on to the next level-k chunk column.

The regions are encoded and stored by one writer thread of the label writer, in the order they
are handed over (a level-k chunk written from two bands is merged in order), while the caller
goes on rasterising, merging and writing GeoJSON; `close()` waits for them.

Memory: one level-0 chunk, at most one band-high buffer of a chunk's width per level, up to
`_QUEUED_REGIONS` regions waiting for the writer thread, the chunks zarr holds while encoding,
and the pending nuclei (those of the current band, about 1.3 KiB each). No array grows with the slide's width or height; an empty region costs nothing.
A level-k chunk is written once per band it overlaps, so with one chunk row per band the
pyramid adds 50-100 % to the CPU time of level 0 on a densely covered slide;
`band_chunks=2` writes level-1 chunks whole and saves 10-25 % of the writer's CPU time, but
holds twice as many pending nuclei (benchmarks/zarr_writer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import shapely
import zarr
from zarr.codecs import BloscCodec

from usnet_wsi.geometry import fill_polygons, pixel_spans
from usnet_wsi.writers.atomic import AbortOnError, AtomicTarget, call_or_abort
from usnet_wsi.writers.background import BackgroundWriter

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


def _spans(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (start, end) each polygon's bounds lo..hi can cover, clipped to [0, size)."""
    start, end = pixel_spans(lo, hi)
    return np.maximum(start, 0), np.minimum(end, size)


@dataclass
class _Pending:
    label: int
    polygon: Any
    row_start: int  # first pixel row the polygon can cover
    row_end: int  # exclusive: no pixel row at or below this one is covered
    col_start: int
    col_end: int


_QUEUED_REGIONS = 4   # label regions waiting for the writer thread (each at most one chunk)


def _store_region(item: tuple[Any, int, int, np.ndarray]) -> None:
    """Write one region of a label array (run by the writer thread)."""
    array, top, left, data = item
    array[top : top + data.shape[0], left : left + data.shape[1]] = data


class _LevelSink:
    """Builds pyramid level k (k >= 1) from the level-0 chunks of a band, column by column.

    Each level-0 chunk holds the stride-2**k samples of a block of one level-k chunk. The
    blocks of one band that fall in the same level-k chunk are gathered in a buffer no larger
    than that chunk, written once the band moves on to the next level-k chunk column (zarr
    merges a partial region into the stored chunk). Buffers: the level-k chunks one column of
    the band overlaps, never the level's width.
    """

    def __init__(self, array: Any, stride: int,
                 store: Callable[[tuple[Any, int, int, np.ndarray]], None]) -> None:
        self.array = array
        self.stride = stride
        self.store = store            # hands a region (array, top, left, data) to the writer
        self.rows = (0, 0)  # level-k rows sampled from the current band
        self.buffers: dict[tuple[int, int], tuple[int, int, np.ndarray]] = {}

    def start_band(self, y0_l0: int, y1_l0: int) -> None:
        """Begin the band of level-0 rows [y0, y1) (writing whatever is still buffered)."""
        self.flush()
        self.rows = (-(-y0_l0 // self.stride), -(-y1_l0 // self.stride))

    def push(self, raster: np.ndarray, y0_l0: int, x0_l0: int) -> None:
        """Take the samples of one level-0 chunk of the band whose top-left pixel is (x0, y0)."""
        s = self.stride
        r0, c0 = -(-y0_l0 // s), -(-x0_l0 // s)  # first level-k row / column sampled here
        part = raster[r0 * s - y0_l0 :: s, c0 * s - x0_l0 :: s]
        if not part.any():
            return  # nothing but the fill value 0
        ch, cw = self.array.chunks
        key = (r0 // ch, c0 // cw)
        self.flush(before_column=key[1])
        if key not in self.buffers:
            top, bottom = max(self.rows[0], key[0] * ch), min(self.rows[1], key[0] * ch + ch)
            width = min(cw, self.array.shape[1] - key[1] * cw)
            self.buffers[key] = (top, key[1] * cw, np.zeros((bottom - top, width), np.uint32))
        top, left, buffer = self.buffers[key]
        buffer[r0 - top : r0 - top + part.shape[0], c0 - left : c0 - left + part.shape[1]] = part

    def flush(self, before_column: int | None = None) -> None:
        """Write the buffered regions (only those left of `before_column`, when given)."""
        for key in sorted(self.buffers):
            if before_column is None or key[1] < before_column:
                top, left, buffer = self.buffers.pop(key)
                self.store((self.array, top, left, buffer))


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

    def append(self, labels: np.ndarray, polygons: np.ndarray, bounds: np.ndarray,
               scores: np.ndarray) -> None:
        """Rows of many nuclei: ids, shapely polygons (object array), their (n, 4) bounds."""
        xy = shapely.get_coordinates(shapely.centroid(polygons))
        columns = {"id": labels, "centroid_x": xy[:, 0], "centroid_y": xy[:, 1], "bbox": bounds,
                   "area_px": shapely.area(polygons), "score": scores}
        for name, values in columns.items():
            self.rows[name].extend(values.tolist())
        self.n_rows += len(labels)
        if len(self.rows["id"]) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows["id"]:
            return
        for name, dtype in self.COLUMNS.items():
            self.arrays[name].append(np.asarray(self.rows[name], dtype=dtype))
            self.rows[name] = []


class LabelZarrWriter(AbortOnError):
    """Chunk-by-chunk, atomic writer of the nuclei label pyramid and table (see module doc).

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
        self._regions: BackgroundWriter | None = None    # started once the store exists
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
        self._chunk = chunk_px
        self._level0 = self._level_array(labels, 0, self.shapes[0], chunk_px)
        table_attrs = {"usnet_wsi": {"label_image": f"labels/{LABEL_NAME}",
                                     "frame": "level-0 pixels", "rows": "one per nucleus"}}
        self._table = _Table(root.create_group(TABLE_PATH, attributes=table_attrs), table_chunk)
        levels = [self._level_array(labels, k, shape, chunk_px)
                  for k, shape in enumerate(self.shapes) if k > 0]
        self._regions = BackgroundWriter(_store_region, _QUEUED_REGIONS, name="usnet-zarr")
        self._sinks = [_LevelSink(array, 2**(k + 1), self._regions.put)
                       for k, array in enumerate(levels)]

    @staticmethod
    def _level_array(group: Any, k: int, shape: tuple[int, int], chunk_px: int) -> Any:
        chunks = (min(chunk_px, shape[0]), min(chunk_px, shape[1]))
        return group.create_array(
            str(k), shape=shape, chunks=chunks, dtype="uint32", fill_value=0,
            # zstd level 1: 3.4x less CPU than level 5 on label chunks, files about 1.3x larger
            compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
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
        self.add_many([label], [polygon_l0], [score])

    def add_many(self, labels: Sequence[int], polygons: Sequence[Any],
                 scores: Sequence[float]) -> None:
        """Queue many nuclei at once, in order: `add` of each, with the geometry of all of
        them computed in a few vectorised calls."""
        if not self._open:
            raise ValueError(f"the label writer for {self.path} is closed")
        ids = np.asarray(labels, dtype=np.int64).reshape(-1)
        geoms = np.asarray(list(polygons), dtype=object).reshape(-1)
        bad = np.flatnonzero((ids < 1) | (ids > _MAX_LABEL))
        if len(bad):
            raise ValueError(f"label must be in 1..{_MAX_LABEL}, got {ids[bad[0]]}")
        empty = np.flatnonzero(shapely.is_missing(geoms) | shapely.is_empty(geoms))
        if len(empty):
            raise ValueError(f"nucleus {ids[empty[0]]} has an empty polygon")
        bounds = shapely.bounds(geoms)
        rows = _spans(bounds[:, 1], bounds[:, 3], self.height_l0)
        cols = _spans(bounds[:, 0], bounds[:, 2], self.width_l0)
        covers = (rows[0] < rows[1]) & (cols[0] < cols[1])
        early = np.flatnonzero((rows[0] < rows[1]) & (rows[0] < self.rows_done))
        if len(early):
            k = early[0]
            raise ValueError(
                f"nucleus {ids[k]} reaches pixel row {rows[0][k]}, but rows above "
                f"{self.rows_done} were already declared complete and written"
            )
        for k in np.flatnonzero(covers).tolist():
            self._pending.append(_Pending(int(ids[k]), geoms[k], int(rows[0][k]),
                                          int(rows[1][k]), int(cols[0][k]), int(cols[1][k])))
        self._guard(self._table.append, ids, geoms, bounds,
                    np.asarray(scores, dtype=np.float64).reshape(-1))
        self.n_added += len(ids)

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
            self._write_band(y0, y1)
            self._pending = [item for item in self._pending if item.row_end > y1]
            self.rows_done = y1

    def _write_band(self, y0: int, y1: int) -> None:
        """Rasterise and write the level-0 chunks of rows [y0, y1) that pending nuclei touch,
        column by column, and pass each one's stride samples on to the pyramid levels."""
        c = self._chunk
        by_column: dict[int, list[_Pending]] = {}
        for item in self._pending:  # in `add` order: later nuclei overwrite earlier ones
            if item.row_start < y1:
                for j in range(item.col_start // c, (item.col_end - 1) // c + 1):
                    by_column.setdefault(j, []).append(item)
        for sink in self._sinks:
            sink.start_band(y0, y1)
        for j in sorted(by_column):
            for top in range(y0, y1, c):
                bottom = min(top + c, y1)
                items = [it for it in by_column[j] if it.row_start < bottom and it.row_end > top]
                if items:
                    self._write_chunk(items, top, bottom, j * c)
        for sink in self._sinks:
            sink.flush()

    def _write_chunk(self, items: list[_Pending], y0: int, y1: int, x0: int) -> None:
        raster = np.zeros((y1 - y0, min(self._chunk, self.width_l0 - x0)), dtype=np.uint32)
        fill_polygons(raster, [it.polygon for it in items], [it.label for it in items],
                      origin_xy=(x0, y0))
        if raster.any():  # else zarr's fill value 0 already says so
            self._regions.put((self._level0, y0, x0, raster))
            for sink in self._sinks:
                sink.push(raster, y0, x0)

    def close(self) -> None:
        """Write all remaining bands, pyramid rows and table rows; rename into place."""
        if not self._open:
            return
        self._guard(self._finish)

    def _finish(self) -> None:
        self._flush_bands(self.height_l0)
        self._regions.close()             # every region stored (or the writer's error raised)
        self._table.flush()
        self._pending = []
        self._open = False
        self._target.commit()

    def abort(self) -> None:
        """Remove the temporary store; the final path is untouched."""
        self._open = False
        self._pending = []
        if self._regions is not None:
            self._regions.abort()         # stops after the region in progress
        self._target.abort()

