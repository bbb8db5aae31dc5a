"""Per-slide orchestration of `segment`: open the slide, find tissue, plan tiles, run the
engine, stream the writers, record run.json; skip complete outputs unless asked to redo them.

`segment_slide` is the one entry point (the CLI loops over slides with it); it raises a
`UsnetError` when a slide cannot be processed and then leaves no output of that slide behind.
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from usnet_wsi.config import SegmentConfig, SlideOptions
from usnet_wsi.console import Reporter
from usnet_wsi.engine import EngineCounts, EngineSettings, StageTimes, journaled_results
from usnet_wsi.errors import OutputError
from usnet_wsi.journal import Journal, JournalRequest, journal_dir, open_journal
from usnet_wsi import __version__
from usnet_wsi.outputs import (OutputPaths, Stage, check_name_length, fingerprint_file,
                               identity_changes, manifest_problem, output_paths, read_record,
                               remove_tree)
from usnet_wsi.slide import IsotropicView, Slide, TolerantReader, open_slide
from usnet_wsi.tiling import TilePlan, plan_tiles, roi_from_xywh
from usnet_wsi.tissue import tissue_mask
from usnet_wsi.writers.overview import write_overview
from usnet_wsi.writers.runjson import provenance, utc_now, write_run_json
from usnet_wsi.writers.sink import (ProcessSink, SinkSpec, SinkSummary, ThreadedSink,
                                     open_sink)

if TYPE_CHECKING:  # pragma: no cover - predict.py imports torch
    from usnet_wsi.predict import Predictor

PredictorSource = Union["Predictor", Callable[[], "Predictor"]]
THUMBNAIL_MAX_SIDE = 2048
THUMBNAIL_MIN_SIDE = 1024        # the tissue mask's clean-up works in thumbnail pixels
THUMBNAIL_MIN_UM_PER_PX = 4.0     # above that side, no finer than 2.5x


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
    unreadable_tiles: int = 0

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
    """Longer side of the tissue thumbnail: THUMBNAIL_MIN_SIDE to THUMBNAIL_MAX_SIDE pixels, and
    within that no finer than THUMBNAIL_MIN_UM_PER_PX (never finer than the slide itself)."""
    side_um = max(width_l0, height_l0) * mpp
    return max(THUMBNAIL_MIN_SIDE,
               min(THUMBNAIL_MAX_SIDE, math.ceil(side_um / THUMBNAIL_MIN_UM_PER_PX)))


def find_tissue(slide: Slide, reader: TolerantReader | None = None) -> Tissue:
    """Thumbnail of the slide and its tissue mask; with a `reader`, unreadable parts of the
    thumbnail are retried, then white, and recorded in `reader.failures`."""
    info = slide.info
    side = thumbnail_side(info.width, info.height, min(info.mpp_x, info.mpp_y))
    thumb, scale = (reader or slide).thumbnail(side)
    return Tissue(thumb=thumb, scale=scale, mask=tissue_mask(thumb))


def slide_view(slide: Slide) -> IsotropicView | None:
    """The square-pixel view of a slide whose pixels are not square (None when they are)."""
    info = slide.info
    return None if math.isclose(info.mpp_x, info.mpp_y, rel_tol=1e-3) else \
        IsotropicView(info.mpp_x, info.mpp_y)


def region_reader(slide: Slide, strict: bool = False) -> TolerantReader:
    """What the engine reads tiles through: retries and skips unreadable regions, and reads
    in the square-pixel frame of `plan_slide`."""
    return TolerantReader(slide, strict=strict, view=slide_view(slide))


def plan_slide(slide: Slide, opts: SlideOptions, tissue: Tissue, tile_px: int, halo_px: int,
               mpp_model: float) -> TilePlan:
    """Tiles over the ROI (whole slide by default), tissue tiles only unless disabled.
    For non-square pixels the plan is in the frame of `slide_view` (square pixels)."""
    info = slide.info
    roi_l0 = roi_from_xywh(opts.roi_xywh, info.width, info.height)
    view, mask = slide_view(slide), tissue.mask
    mpp_plan = (info.mpp_x + info.mpp_y) / 2
    if view is not None:
        x0, y0, x1, y1 = roi_l0
        roi_l0 = (math.floor(x0 * view.fx), math.floor(y0 * view.fy),
                  math.ceil(x1 * view.fx), math.ceil(y1 * view.fy))
        mpp_plan, mask = view.mpp, _stretch(mask, view)
    return plan_tiles(roi_l0, mpp_plan, mpp_model, tile_px, halo_px,
                      tissue=mask if opts.tissue_mask else None, tissue_scale=tissue.scale)


def _stretch(mask: np.ndarray, view: IsotropicView) -> np.ndarray:
    """The tissue mask resampled (nearest) into the view's frame, same scale."""
    from PIL import Image

    h, w = mask.shape
    size = (max(1, round(w * view.fx)), max(1, round(h * view.fy)))
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(img) > 0


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
        "roi_l0": list(roi_from_xywh(opts.roi_xywh, info.width, info.height)),
        "tissue_mask": opts.tissue_mask,
        "tiles": len(plan.tiles),
        "tiles_in_grid": plan.n_grid,
        "model_tile_px": tile_px, "model_halo_px": halo_px, "model_mpp": mpp_model,
    })
    return d


def weights_id(weights: Path | None) -> str:
    """sha256 of the bundle's config.json (which holds the weights' SHA-256) and thresholds."""
    from usnet_wsi.model.bundle import bundle_location   # lazy: imports torch

    folder = bundle_location(weights)
    folder = folder.parent if folder.is_file() else folder
    h = hashlib.sha256()
    for name in ("config.json", "thresholds.json"):
        try:
            h.update((folder / name).read_bytes())
        except OSError:
            h.update(f"missing:{folder / name}".encode())
    return h.hexdigest()


def output_identity(slide: Slide, cfg: SegmentConfig) -> dict[str, Any]:
    """Everything that changes a slide's outputs; a set made with another identity is not
    skipped."""
    info, roi = slide.info, cfg.slide.roi_xywh
    return {"usnet_wsi_version": __version__, "slide_fingerprint": info.fingerprint,
            "mpp_x": info.mpp_x, "mpp_y": info.mpp_y,
            "roi_xywh": None if roi is None else list(roi), "tissue_mask": cfg.slide.tissue_mask,
            "weights": weights_id(cfg.weights), "iou_threshold": cfg.iou_threshold,
            "geojson_gz": cfg.geojson_gz, "precision": cfg.precision, "tile_px": cfg.tile_px,
            "tta": cfg.tta}


def _previous(slide: Slide, paths: OutputPaths, cfg: SegmentConfig, identity: dict[str, Any],
              reporter: Reporter) -> SlideResult | None:
    """A 'skipped' result when the outputs of this very run already exist and match their
    run.json; None when the slide is to be (re)done; OutputError when complete outputs made
    otherwise exist and --overwrite is off."""
    name, record = slide.info.name, read_record(paths.run_json)
    if record is None:
        if any(os.path.lexists(p) for p in paths.all() + (paths.other_geojson(),)):
            reporter.info(f"{name}: earlier outputs in {cfg.out_dir} are incomplete (no readable "
                          "run.json); redoing them")
        return None
    problem = manifest_problem(record, paths.run_json.parent)
    if problem:
        reporter.info(f"{name}: earlier outputs do not match their run.json ({problem}); "
                      "redoing them")
        return None
    if cfg.overwrite:
        return None
    fp = (record.get("slide") or {}).get("fingerprint")
    if fp != slide.info.fingerprint:
        raise OutputError(f"{paths.run_json} belongs to another slide named {name!r} "
                          "(different fingerprint)",
                          "write to another folder with -o, or replace them with --overwrite")
    changes = identity_changes(record.get("identity"), identity)
    if changes:
        raise OutputError(f"outputs of {name} in {cfg.out_dir} were made with other settings "
                          f"({'; '.join(changes)}); they are kept",
                          "add --overwrite to replace them, or write to another folder with -o")
    counts = record.get("counts") or {}
    remove_tree(journal_dir(cfg.out_dir, name))   # left by a run killed after its swap
    reporter.info(f"{name}: skipped, complete outputs with the same settings exist in "
                  f"{cfg.out_dir} (use --overwrite to redo)")
    return SlideResult(str(slide.info.path), name, "skipped", nuclei=int(counts.get("nuclei", 0)),
                       tiles=int(counts.get("tiles", 0)), message="outputs exist",
                       outputs=[str(p) for p in paths.all()],
                       unreadable_tiles=len(record.get("unreadable_tiles") or []))


def _journal_identity(identity: dict[str, Any], model: "Predictor") -> dict[str, Any]:
    """What a resume journal is bound to: the output identity, plus the kind of device, the
    precision and the test-time augmentation actually used (CPU and CUDA, or fp32 and bf16,
    differ in a few pixels)."""
    device = str(getattr(model, "device", "cpu")).split(":")[0]
    return {**identity, "device_kind": device,
            "precision_used": getattr(model, "precision", None),
            "tta_used": getattr(model, "tta", "none")}


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
        check_name_length(paths)
        identity = output_identity(slide, cfg)
        skipped = _previous(slide, paths, cfg, identity, reporter)
        if skipped is not None:
            return skipped
        model = _resolve(predictor)
        times = StageTimes()
        t0 = time.perf_counter()
        reader = region_reader(slide, cfg.strict)
        tissue = find_tissue(slide, reader)
        plan = plan_slide(slide, cfg.slide, tissue, model.tile_px, model.halo_px, model.mpp)
        times.add("tissue_and_plan", time.perf_counter() - t0)
        _warn_if_empty(plan, tissue, cfg, info.name, reporter)
        reporter.debug(f"{info.name}: {len(plan.tiles)} of {plan.n_grid} tiles, read box "
                       f"{plan.read_size_l0} l0 px, core {plan.core_size_l0} l0 px")
        run = _Run(slide, plan, model, cfg, paths, tissue, times, started, identity, reader)
        run.journal = open_journal(JournalRequest(journal_dir(cfg.out_dir, info.name),
                                                  _journal_identity(identity, model), plan,
                                                  cfg.resume, reader.failures_in),
                                   info.name, reporter)
        reader.failures.extend(run.journal.resumed_failures)
        counts = _write_outputs(run, reporter, t_start)
        run.journal.remove()
    seconds = time.perf_counter() - t_start
    reporter.info(f"{info.name}: {counts.nuclei} nuclei from {counts.tiles} tiles in "
                  f"{seconds:.1f} s")
    _warn_unreadable(run.reader, info.name, paths, reporter)
    note = f"{len(run.reader.failures)} unreadable tiles skipped" if run.reader.failures else ""
    return SlideResult(str(path), info.name, "done", nuclei=counts.nuclei, tiles=counts.tiles,
                       seconds=round(seconds, 3), outputs=[str(p) for p in paths.all()],
                       message=note, unreadable_tiles=len(run.reader.failures))


def _in_slide_order(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unreadable-tile records by position (top to bottom, left to right): the reader threads
    and a resumed run record them in different orders."""
    return sorted(failures, key=lambda f: (f["box_l0"][1], f["box_l0"][0]))


def _warn_unreadable(reader: TolerantReader, name: str, paths: OutputPaths,
                     reporter: Reporter) -> None:
    failures, thumb = _in_slide_order(reader.failures), reader.thumbnail_failures
    if thumb:
        reporter.warn(f"{name}: {len(thumb)} part(s) of the thumbnail could not be read; the "
                      f"tissue mask treats them as glass (listed in {paths.run_json.name})")
    if not failures:
        return
    where = "; ".join("x={},y={}".format(*(round(v) for v in f["box_l0"][:2]))
                      for f in failures[:5]) + ("; ..." if len(failures) > 5 else "")
    reporter.warn(f"{name}: {len(failures)} tile(s) could not be read (tried twice) and were "
                  f"skipped, so they hold no nuclei: level-0 read boxes at {where}; all are "
                  f"listed in {paths.run_json.name} (use --strict to fail the slide instead)")


@dataclass
class _Run:
    """One slide's run: what the writers and run.json need."""

    slide: Slide
    plan: TilePlan
    model: "Predictor"
    cfg: SegmentConfig
    paths: OutputPaths
    tissue: Tissue
    times: StageTimes
    started: str
    identity: dict[str, Any]
    reader: TolerantReader
    counts: EngineCounts = field(default_factory=EngineCounts)
    journal: Journal | None = None


def _warn_if_empty(plan: TilePlan, tissue: Tissue, cfg: SegmentConfig, name: str,
                   reporter: Reporter) -> None:
    if not plan.tiles:
        where = "in the region of interest" if cfg.slide.roi_xywh else "on the slide"
        reporter.warn(f"{name}: no tissue found {where}; writing empty outputs "
                      "(use --no-tissue-mask to process every tile)")


def _sink_spec(run: _Run, stage: Stage) -> SinkSpec:
    info, view = run.slide.info, run.reader.view
    return SinkSpec(plan=run.plan, iou_threshold=run.cfg.iou_threshold,
                    geojson=stage.paths.geojson, geojson_gz=run.cfg.geojson_gz,
                    fingerprint=info.fingerprint, zarr=stage.paths.zarr, width=info.width,
                    height=info.height, mpp_x=info.mpp_x, mpp_y=info.mpp_y,
                    source={"slide": info.name, "fingerprint": info.fingerprint},
                    view_stretch=None if view is None else (view.fx, view.fy))


def _stream(run: _Run, sink: ThreadedSink | ProcessSink, reporter: Reporter) -> None:
    """Run the engine's tile results into the sink (which merges and writes off the main
    loop). Progress counts the nuclei the tiles own, before the merge."""
    info, cfg, counts = run.slide.info, run.cfg, run.counts
    settings = EngineSettings(batch_size=cfg.batch_size, workers=cfg.workers,
                              prefetch_tiles=cfg.prefetch_tiles, iou_threshold=cfg.iou_threshold)
    counts.resumed = len(run.journal.done) if run.journal is not None else 0
    with reporter.task(info.name, total=len(run.plan.tiles)) as task, \
            closing(journaled_results(run.reader, run.plan, run.model, settings, run.times,
                                      run.journal)) as results:
        for res in results:   # closing(): on an error the reader threads stop at once
            counts.add(res)
            sink.put(res)
            task.advance(1, nuclei=counts.owned)


def _write_outputs(run: _Run, reporter: Reporter, t_start: float) -> EngineCounts:
    """All outputs into a staging folder, then swapped in together (run.json last). On
    failure the staging folder is removed and the earlier outputs stay as they were."""
    info, cfg, tissue, times = run.slide.info, run.cfg, run.tissue, run.times
    stage = Stage(run.paths)
    sink = None
    try:
        # in a process of its own where CPU-stage workers run too (cores to spare)
        sink = open_sink(_sink_spec(run, stage), own_process=cfg.workers > 0)
        _stream(run, sink, reporter)
        t0 = time.perf_counter()
        written, sink = sink.close(), None
        run.counts.nuclei, run.counts.merge = written.nuclei, written.merge
        times.add("merge", written.merge_s)
        times.add("write", written.write_s)
        write_overview(stage.paths.overview, tissue.thumb, tissue.scale, written.centroids,
                       mpp=(info.mpp_x + info.mpp_y) / 2)
        times.add("finish", time.perf_counter() - t0)
        times.add("total", time.perf_counter() - t_start)
        write_run_json(stage.paths.run_json, _run_record(run, written, stage))
        stage.commit()
    except BaseException:
        if sink is not None:
            sink.abort()
        stage.abort()
        _keep_journal(run.journal)
        raise
    return run.counts


def _keep_journal(journal: Journal | None) -> None:
    """On a failure or interrupt, write the finished tiles not yet in the journal (best
    effort: the journal is only ever a head start); a journal without tiles is removed."""
    if journal is None:
        return
    try:
        journal.flush()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass
    if not journal.has_bands():
        journal.remove()


def _manifest(run: _Run, stage: Stage) -> dict[str, Any]:
    """Fingerprints of the staged outputs under their final names."""
    f, s = run.paths, stage.paths
    return {f.geojson.name: fingerprint_file(s.geojson), f.zarr.name: fingerprint_file(s.zarr),
            f.overview.name: fingerprint_file(s.overview)}


def _run_record(run: _Run, written: SinkSummary, stage: Stage) -> dict[str, Any]:
    info, plan, model, cfg, counts = run.slide.info, run.plan, run.model, run.cfg, run.counts
    paths, tissue = run.paths, run.tissue
    argv = list(cfg.argv) or None
    record = provenance(argv=argv, started_utc=run.started, finished_utc=utc_now())
    view = run.reader.view
    record.update({
        "command": shlex.join(record["argv"]),
        "weights": {"name": model.name, "sha256": model.sha256},
        "model": {"tile_px": model.tile_px, "halo_px": model.halo_px, "mpp": model.mpp,
                  "precision": getattr(model, "precision", None),
                  "tta": getattr(model, "tta", "none")},
        "device": model.device,
        "settings": cfg.to_dict(),
        "slide": info.to_dict(),
        "tissue": {"mask_used": cfg.slide.tissue_mask, "thumbnail_scale": tissue.scale,
                   "area_mm2": round(tissue.area_mm2(info.mpp_x, info.mpp_y), 4)},
        "plan": {"roi_l0": list(plan.roi_l0), "tile_px": plan.tile_px, "halo_px": plan.halo_px,
                 "read_size_l0": plan.read_size_l0, "halo_l0": plan.halo_l0,
                 "core_size_l0": plan.core_size_l0, "n_rows": plan.n_rows,
                 "n_cols": plan.n_cols, "tiles_in_grid": plan.n_grid,
                 "tiles_planned": len(plan.tiles),
                 "frame": "level 0" if view is None else
                 f"square-pixel view: level-0 x * {view.fx:.6g}, y * {view.fy:.6g}"},
        "timings_s": run.times.as_dict(),
        "counts": {"tiles": counts.tiles, "detections": counts.detected,
                   "owned": counts.owned, "nuclei": counts.nuclei,
                   "resumed_tiles": counts.resumed,
                   "geojson_features": written.written, "geojson_skipped": written.skipped,
                   "merge": counts.merge},
        "unreadable_tiles": _in_slide_order(run.reader.failures),
        "unreadable_thumbnail_parts": list(run.reader.thumbnail_failures),
        "outputs": {"geojson": paths.geojson.name, "zarr": paths.zarr.name,
                    "overview": paths.overview.name, "run_json": paths.run_json.name},
        "manifest": _manifest(run, stage),
        "identity": run.identity,
    })
    return record
