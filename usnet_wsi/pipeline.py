"""Per-slide orchestration of `segment`: open the slide, find tissue, plan tiles, run the
engine, stream the writers, record run.json; skip complete outputs unless asked to redo them.

`segment_slide` is the one entry point (the CLI loops over slides with it); it raises a
`UsnetError` when a slide cannot be processed and then leaves no output of that slide behind.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from usnet_wsi.config import SegmentConfig, SlideOptions
from usnet_wsi.console import Reporter
from usnet_wsi.engine import (EngineCounts, EngineSettings, MergedStep, StageTimes,
                              merged_nuclei)
from usnet_wsi.errors import OutputError
from usnet_wsi.measure import nucleus_measurements
from usnet_wsi.nuclei import Nucleus
from usnet_wsi.slide import Slide, open_slide
from usnet_wsi.tiling import TilePlan, plan_tiles, roi_from_xywh
from usnet_wsi.tissue import tissue_mask
from usnet_wsi.writers.atomic import outputs_complete
from usnet_wsi.writers.background import BackgroundWriter
from usnet_wsi.writers.geojson import GeoJSONWriter
from usnet_wsi.writers.overview import write_overview
from usnet_wsi.writers.runjson import provenance, utc_now, write_run_json
from usnet_wsi.writers.zarr import LabelZarrWriter

if TYPE_CHECKING:  # pragma: no cover - predict.py imports torch
    from usnet_wsi.predict import Predictor

PredictorSource = Union["Predictor", Callable[[], "Predictor"]]
THUMBNAIL_MAX_SIDE = 2048
THUMBNAIL_MIN_UM_PER_PX = 4.0     # tissue detection needs no finer thumbnail than 2.5x


@dataclass(frozen=True)
class OutputPaths:
    """The outputs of one slide in OUTDIR, named after the slide."""

    geojson: Path
    zarr: Path
    overview: Path
    run_json: Path

    def all(self) -> tuple[Path, ...]:
        return (self.geojson, self.zarr, self.overview, self.run_json)


def output_paths(out_dir: Path, name: str, geojson_gz: bool) -> OutputPaths:
    """OUTDIR/NAME.geojson[.gz], NAME.zarr, NAME.overview.png, NAME.run.json."""
    d = Path(out_dir)
    return OutputPaths(geojson=d / f"{name}.geojson{'.gz' if geojson_gz else ''}",
                       zarr=d / f"{name}.zarr", overview=d / f"{name}.overview.png",
                       run_json=d / f"{name}.run.json")


@dataclass
class SlideResult:
    """What happened to one slide (one row of the CLI's summary)."""

    path: str
    name: str
    status: str                      # "done" | "skipped" | "failed"
    nuclei: int = 0
    tiles: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    message: str = ""
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Tissue:
    """Thumbnail, its scale (thumbnail px per level-0 px) and tissue mask."""

    thumb: np.ndarray
    scale: float
    mask: np.ndarray

    def area_mm2(self, mpp_x: float, mpp_y: float) -> float:
        """Tissue area in mm^2 (each thumbnail pixel covers 1/scale^2 level-0 pixels)."""
        return float(self.mask.sum()) / self.scale**2 * mpp_x * mpp_y * 1e-6


def prepare_out_dir(out_dir: Path) -> bool:
    """Create OUTDIR if needed and check it is a writable folder; True if it was created."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is a file",
                          "give -o a folder (new or existing), not a file")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".usnet-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write to output folder {out}: {err.strerror or err}",
                          "choose a folder you can write to with -o") from None
    return created


def thumbnail_side(width_l0: int, height_l0: int, mpp: float) -> int:
    """Longer side of the tissue thumbnail: at most THUMBNAIL_MAX_SIDE pixels and no finer than
    THUMBNAIL_MIN_UM_PER_PX (small slides and regions get a small, cheap thumbnail)."""
    side_um = max(width_l0, height_l0) * mpp
    return max(64, min(THUMBNAIL_MAX_SIDE, math.ceil(side_um / THUMBNAIL_MIN_UM_PER_PX)))


def find_tissue(slide: Slide) -> Tissue:
    """Thumbnail of the slide and its tissue mask."""
    info = slide.info
    side = thumbnail_side(info.width, info.height, min(info.mpp_x, info.mpp_y))
    thumb, scale = slide.thumbnail(side)
    return Tissue(thumb=thumb, scale=scale, mask=tissue_mask(thumb))


def plan_slide(slide: Slide, opts: SlideOptions, tissue: Tissue, tile_px: int, halo_px: int,
               mpp_model: float) -> TilePlan:
    """Tiles over the ROI (whole slide by default), tissue tiles only unless disabled."""
    info = slide.info
    roi_l0 = roi_from_xywh(opts.roi_xywh, info.width, info.height)
    mpp_l0 = (info.mpp_x + info.mpp_y) / 2
    mask = tissue.mask if opts.tissue_mask else None
    return plan_tiles(roi_l0, mpp_l0, mpp_model, tile_px, halo_px, tissue=mask,
                      tissue_scale=tissue.scale)


def slide_summary(slide: Slide, opts: SlideOptions, tile_px: int, halo_px: int,
                  mpp_model: float) -> dict[str, Any]:
    """What `info` reports: slide description, tissue area and the tiles `segment` would run."""
    info = slide.info
    tissue = find_tissue(slide)
    plan = plan_slide(slide, opts, tissue, tile_px, halo_px, mpp_model)
    d = info.to_dict()
    d.pop("properties")
    d.update({
        "tissue_area_mm2": round(tissue.area_mm2(info.mpp_x, info.mpp_y), 4),
        "roi_l0": list(plan.roi_l0),
        "tissue_mask": opts.tissue_mask,
        "tiles": len(plan.tiles),
        "tiles_in_grid": plan.n_grid,
        "model_tile_px": tile_px, "model_halo_px": halo_px, "model_mpp": mpp_model,
    })
    return d


def previous_fingerprint(paths: OutputPaths) -> str | None:
    """The slide fingerprint recorded in an existing run.json (None if unreadable)."""
    try:
        return json.loads(paths.run_json.read_text(encoding="utf-8"))["slide"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_skip(slide: Slide, paths: OutputPaths, cfg: SegmentConfig) -> bool:
    """True when complete outputs of this very slide exist and --overwrite is off."""
    if cfg.overwrite or not outputs_complete(paths.all()):
        return False
    if previous_fingerprint(paths) != slide.info.fingerprint:
        raise OutputError(f"{paths.run_json} belongs to another slide named "
                          f"{slide.info.name!r} (different fingerprint)",
                          "write to another folder with -o, or replace them with --overwrite")
    return True


def _resolve(predictor: PredictorSource) -> "Predictor":
    return predictor if hasattr(predictor, "predict") else predictor()  # type: ignore[operator]


def segment_slide(path: str | Path, cfg: SegmentConfig, predictor: PredictorSource,
                  reporter: Reporter) -> SlideResult:
    """Segment one slide into OUTDIR (which must exist). `predictor` may be a zero-argument
    callable: it is only called when the slide is opened and not skipped."""
    t_start, started = time.perf_counter(), utc_now()
    with open_slide(path, cfg.slide.mpp, reporter) as slide:
        info = slide.info
        paths = output_paths(cfg.out_dir, info.name, cfg.geojson_gz)
        if _check_skip(slide, paths, cfg):
            reporter.info(f"{info.name}: skipped, complete outputs exist in {cfg.out_dir} "
                          "(use --overwrite to redo)")
            return SlideResult(str(path), info.name, "skipped", message="outputs exist",
                               outputs=[str(p) for p in paths.all()])
        model = _resolve(predictor)
        times = StageTimes()
        t0 = time.perf_counter()
        tissue = find_tissue(slide)
        plan = plan_slide(slide, cfg.slide, tissue, model.tile_px, model.halo_px, model.mpp)
        times.add("tissue_and_plan", time.perf_counter() - t0)
        _warn_if_empty(plan, tissue, cfg, info.name, reporter)
        reporter.debug(f"{info.name}: {len(plan.tiles)} of {plan.n_grid} tiles, read box "
                       f"{plan.read_size_l0} l0 px, core {plan.core_size_l0} l0 px")
        counts = _write_outputs(slide, plan, model, cfg, paths, tissue, reporter, times,
                                started, t_start)
    seconds = time.perf_counter() - t_start
    reporter.info(f"{info.name}: {counts.nuclei} nuclei from {counts.tiles} tiles in "
                  f"{seconds:.1f} s")
    return SlideResult(str(path), info.name, "done", nuclei=counts.nuclei, tiles=counts.tiles,
                       seconds=round(seconds, 3), outputs=[str(p) for p in paths.all()])


def _warn_if_empty(plan: TilePlan, tissue: Tissue, cfg: SegmentConfig, name: str,
                   reporter: Reporter) -> None:
    if not plan.tiles:
        where = "in the region of interest" if cfg.slide.roi_xywh else "on the slide"
        reporter.warn(f"{name}: no tissue found {where}; writing empty outputs "
                      "(use --no-tissue-mask to process every tile)")


def _record(label: int, nucleus: Nucleus, mpp_x: float, mpp_y: float) -> dict[str, Any]:
    return {"id": label, "polygon_l0": nucleus.polygon_l0, "score": nucleus.score,
            "measurements": nucleus_measurements(nucleus.polygon_l0, nucleus.score,
                                                 nucleus.hematoxylin_od, mpp_x, mpp_y)}


class _NucleiSink:
    """Numbers the final nuclei and writes them (GeoJSON, zarr labels); runs in the writer
    thread, so serialising overlaps with the model and the CPU stage."""

    def __init__(self, mpp_xy: tuple[float, float], geo: GeoJSONWriter, labels: LabelZarrWriter,
                 times: StageTimes) -> None:
        self.mpp_x, self.mpp_y = mpp_xy
        self.geo, self.labels, self.times = geo, labels, times
        self.label = 0
        self.centroids = array("d")

    def consume(self, step: MergedStep) -> None:
        t0 = time.perf_counter()
        for nucleus in step.nuclei:
            self.label += 1
            self.geo.write([_record(self.label, nucleus, self.mpp_x, self.mpp_y)])
            self.labels.add(self.label, nucleus.polygon_l0, nucleus.score)
            self.centroids.extend(nucleus.centroid_l0)
        if math.isfinite(step.horizon_y_l0):   # after the last step, close() finishes
            self.labels.complete_above(step.horizon_y_l0)
        self.times.add("write", time.perf_counter() - t0)


def _stream(slide: Slide, plan: TilePlan, model: "Predictor", cfg: SegmentConfig,
            geo: GeoJSONWriter, labels: LabelZarrWriter, reporter: Reporter,
            times: StageTimes, counts: EngineCounts) -> np.ndarray:
    """Run the engine into the writers; returns the (N, 2) level-0 centroids."""
    info = slide.info
    settings = EngineSettings(batch_size=cfg.batch_size, workers=cfg.workers,
                              prefetch_tiles=cfg.prefetch_tiles, iou_threshold=cfg.iou_threshold)
    sink = _NucleiSink((info.mpp_x, info.mpp_y), geo, labels, times)
    with reporter.task(info.name, total=len(plan.tiles)) as task, \
            closing(merged_nuclei(slide, plan, model, settings, task, times, counts)) as steps, \
            BackgroundWriter(sink.consume) as writer:
        for step in steps:   # closing(): on an error the reader threads stop at once
            writer.put(step)
    return np.frombuffer(sink.centroids, dtype=np.float64).reshape(-1, 2)


def _write_outputs(slide: Slide, plan: TilePlan, model: "Predictor", cfg: SegmentConfig,
                   paths: OutputPaths, tissue: Tissue, reporter: Reporter, times: StageTimes,
                   started: str, t_start: float) -> EngineCounts:
    """All outputs, each to a temporary name renamed when complete; run.json last.
    On failure nothing of this slide is left in OUTDIR."""
    info = slide.info
    counts, committed = EngineCounts(), []
    geo = GeoJSONWriter(paths.geojson, cfg.geojson_gz, info.fingerprint)
    labels = None
    try:
        labels = LabelZarrWriter(paths.zarr, info.width, info.height, info.mpp_x, info.mpp_y,
                                 source={"slide": info.name, "fingerprint": info.fingerprint})
        centroids = _stream(slide, plan, model, cfg, geo, labels, reporter, times, counts)
        t0 = time.perf_counter()
        labels.close()
        committed.append(paths.zarr)
        geo.close()
        committed.append(paths.geojson)
        write_overview(paths.overview, tissue.thumb, tissue.scale, centroids,
                       mpp=(info.mpp_x + info.mpp_y) / 2)
        committed.append(paths.overview)
        times.add("finish", time.perf_counter() - t0)
        times.add("total", time.perf_counter() - t_start)
        write_run_json(paths.run_json, _run_record(slide, plan, model, cfg, tissue, times,
                                                   counts, geo, paths, started))
    except BaseException:
        geo.abort()
        if labels is not None:
            labels.abort()
        for p in committed:
            _remove(p)
        raise
    return counts


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _run_record(slide: Slide, plan: TilePlan, model: "Predictor", cfg: SegmentConfig,
                tissue: Tissue, times: StageTimes, counts: EngineCounts,
                geo: GeoJSONWriter, paths: OutputPaths, started: str) -> dict[str, Any]:
    info = slide.info
    argv = list(cfg.argv) or None
    record = provenance(argv=argv, started_utc=started, finished_utc=utc_now())
    record.update({
        "command": shlex.join(record["argv"]),
        "weights": {"name": model.name, "sha256": model.sha256},
        "model": {"tile_px": model.tile_px, "halo_px": model.halo_px, "mpp": model.mpp},
        "device": model.device,
        "settings": cfg.to_dict(),
        "slide": info.to_dict(),
        "tissue": {"mask_used": cfg.slide.tissue_mask, "thumbnail_scale": tissue.scale,
                   "area_mm2": round(tissue.area_mm2(info.mpp_x, info.mpp_y), 4)},
        "plan": {"roi_l0": list(plan.roi_l0), "tile_px": plan.tile_px, "halo_px": plan.halo_px,
                 "read_size_l0": plan.read_size_l0, "halo_l0": plan.halo_l0,
                 "core_size_l0": plan.core_size_l0, "n_rows": plan.n_rows,
                 "n_cols": plan.n_cols, "tiles_in_grid": plan.n_grid,
                 "tiles_planned": len(plan.tiles)},
        "timings_s": times.as_dict(),
        "counts": {"tiles": counts.tiles, "detections": counts.detected,
                   "owned": counts.owned, "nuclei": counts.nuclei,
                   "geojson_features": geo.n_written, "geojson_skipped": geo.n_skipped,
                   "merge": counts.merge},
        "outputs": {"geojson": paths.geojson.name, "zarr": paths.zarr.name,
                    "overview": paths.overview.name, "run_json": paths.run_json.name},
    })
    return record
