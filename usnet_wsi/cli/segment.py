"""`usnet-wsi segment SLIDE... -o OUTDIR`: nuclei outlines, label pyramid and provenance."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from usnet_wsi.cli.common import guarded, make_reporter, parse_box, verbosity_options
from usnet_wsi.config import SegmentConfig, SlideOptions, check_scheduler
from usnet_wsi.console import Reporter, console
from usnet_wsi.errors import OutputError, UsageError
from usnet_wsi.runner import LazyPredictor, PlannedSlide, failed_result, run_one


def unique_slides(slides: tuple[str, ...], reporter: Reporter) -> list[str]:
    """The slides in order, each file once (the same path twice, or a link to one given)."""
    seen: dict[Any, str] = {}
    out = []
    for path in slides:
        try:
            st = os.stat(path)
            key: Any = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.realpath(path)
        if key in seen:
            reporter.info(f"{path}: the same file as {seen[key]}; processed once")
            continue
        seen[key] = path
        out.append(path)
    return out


def plan_slides(slides: tuple[str, ...], cfg: SegmentConfig,
                reporter: Reporter) -> list[PlannedSlide]:
    """The slides of the run in order, each file once; a slide whose output names another
    slide of the run already takes is refused."""
    from usnet_wsi.slide import slide_name

    planned, names = [], {}
    for path in unique_slides(slides, reporter):
        name = slide_name(path)
        refused = None
        if name in names:
            refused = OutputError(f"{path} and {names[name]} would both write {name}.* in "
                                  f"{cfg.out_dir}", "segment them into different -o folders")
        else:
            names[name] = path
        planned.append(PlannedSlide(path, name, refused))
    return planned


def _run_local(planned: list[PlannedSlide], cfg: SegmentConfig, reporter: Reporter,
               verbose: int) -> list[Any]:
    """Segment each slide here, one after the other; a failing slide does not stop the rest."""
    model = LazyPredictor(cfg, reporter)
    return [failed_result(p.path, p.name, p.refused, reporter, verbose) if p.refused else
            run_one(p.path, cfg, model, reporter, verbose) for p in planned]


def _scheduler(address: str | None, scheduler_file: Path | None) -> str | None:
    """The dask scheduler address of --scheduler or --scheduler-file (None: run here)."""
    if address is not None and scheduler_file is not None:
        raise UsageError("--scheduler and --scheduler-file both name a scheduler",
                         "give one of them: the address (tcp://HOST:8786) or the file the "
                         "scheduler wrote")
    if scheduler_file is None:
        return check_scheduler(address)
    from usnet_wsi.cluster import read_scheduler_file

    return read_scheduler_file(scheduler_file)


def _summary_table(results: list[Any]) -> Table:
    table = Table(title="usnet-wsi segment", title_justify="left")
    for col, just in (("slide", "left"), ("status", "left"), ("nuclei", "right"),
                      ("tiles", "right"), ("time (s)", "right"), ("note", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    style = {"done": "green", "skipped": "yellow", "failed": "bold red"}
    for r in results:
        table.add_row(Text(r.name), Text(r.status, style=style[r.status]), str(r.nuclei),
                      str(r.tiles), f"{r.seconds:.1f}", Text(r.message))
    return table


def _exit_code(results: list[Any]) -> int:
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return 0
    return 2 if all(r.exit_code == 2 for r in failed) else 1


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()   # only succeeds when empty
    except OSError:
        pass


@click.command("segment")
@click.argument("slides", nargs=-1, required=True, metavar="SLIDE...")
@click.option("-o", "--out-dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the outputs (created if missing).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights bundle: a folder, or the name of a bundle shipped with usnet-wsi "
                   "(default: usnet-v2-w10; usnet-v2-ft1 and usnet-monuseg-v1 also ship).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (auto: CUDA if present).")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Tiles per model batch (a CPU runs it in parts of about 1.2 megapixels, "
                   "e.g. 4 tiles of 556 px; the output does not depend on it).")
@click.option("--workers", type=int, default=None,
              help="Worker processes for the CPU stage (painting the refined masks, nucleus "
                   "outlines, stain measurements) "
                   "while the model runs, plus one process that merges and writes the "
                   "outputs; 0 = all in the main process (merging and writing in a thread). "
                   "Default: 0 on machines of 2 cores or fewer, else cores - 2 (at most 4). "
                   "Two threads read tiles.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True,
              help="Network arithmetic. auto: fp16 on CUDA, bf16 on CPUs with native bf16 "
                   "(AVX512-BF16 / AMX; about twice as fast), else fp32.")
@click.option("--tta", type=click.Choice(["none", "flip", "flips"]), default="none",
              show_default=True,
              help="Test-time augmentation: also run the network on mirror images of each tile "
                   "and average (flip: left-right, 2x the network's time; flips: left-right, "
                   "up-down and both, 4x).")
@click.option("--tile-px", type=int, default=None,
              help="Side of the model's input tiles (default: the weights bundle's choice).")
@click.option("--mpp", type=float, default=None,
              help="Microns per level-0 pixel; overrides the slide's own value.")
@click.option("--roi", default=None, metavar="X,Y,W,H",
              help="Only this level-0 box (nuclei centred inside it).")
@click.option("--no-tissue-mask", is_flag=True, help="Process every tile, not only tissue.")
@click.option("--geojson-gz", is_flag=True, help="Write NAME.geojson.gz instead of .geojson.")
@click.option("--overwrite", is_flag=True,
              help="Replace outputs that exist (made with the same or other settings).")
@click.option("--no-resume", is_flag=True,
              help="Start each slide from scratch, discarding what an interrupted run left in "
                   "its journal (by default a re-run continues where the last run stopped).")
@click.option("--strict", is_flag=True,
              help="Fail a slide with an unreadable tile (default: skip the tile, warn).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run each slide as one task on this running dask.distributed scheduler, "
                   "e.g. tcp://10.0.0.5:8786. OUTDIR, the slides and --weights must be "
                   "reachable under the same path from every worker (a shared folder); a "
                   "slide whose worker cannot reach them fails with that message.")
@click.option("--scheduler-file", type=click.Path(path_type=Path), default=None,
              help="Like --scheduler, with the address read from the scheduler file that "
                   "`dask scheduler --scheduler-file PATH` or a cluster manager "
                   "(dask-jobqueue, ...) wrote.")
@verbosity_options
@guarded
def segment(slides: tuple[str, ...], out_dir: Path, weights: Path | None, device: str,
            batch_size: int, workers: int | None, precision: str, tta: str,
            tile_px: int | None,
            mpp: float | None, roi: str | None,
            no_tissue_mask: bool, geojson_gz: bool, overwrite: bool, no_resume: bool,
            strict: bool, as_json: bool, scheduler: str | None, scheduler_file: Path | None,
            verbose: int) -> None:
    """Find and outline every nucleus in each SLIDE; write NAME.geojson, NAME.zarr,
    NAME.run.json and NAME.overview.png into OUTDIR.

    With --scheduler or --scheduler-file the slides run on an existing dask cluster, one task
    per slide; OUTDIR must then be a folder every worker can reach (e.g. on a shared file
    system)."""
    opts = SlideOptions(mpp=mpp, roi_xywh=parse_box(roi, "--roi"),
                        tissue_mask=not no_tissue_mask)
    cfg = SegmentConfig(out_dir=out_dir, slide=opts, weights=weights, device=device,
                        batch_size=batch_size, workers=workers, geojson_gz=geojson_gz,
                        overwrite=overwrite, strict=strict, precision=precision,
                        tile_px=tile_px, tta=tta, resume=not no_resume, argv=tuple(sys.argv),
                        scheduler=_scheduler(scheduler, scheduler_file))
    reporter = make_reporter(verbose)
    from usnet_wsi.outputs import clean_stale
    from usnet_wsi.pipeline import prepare_out_dir  # lazy: pulls in openslide, zarr

    created = prepare_out_dir(cfg.out_dir)
    removed = clean_stale(cfg.out_dir)
    if removed:
        reporter.info(f"removed {len(removed)} temporary file(s) left in {cfg.out_dir} by "
                      "runs that were killed")
    try:
        planned = plan_slides(slides, cfg, reporter)
        if cfg.scheduler is None:
            results = _run_local(planned, cfg, reporter, verbose)
        else:
            from usnet_wsi.cluster import run_on_cluster  # lazy: imports dask.distributed

            results = run_on_cluster(planned, cfg, reporter, verbose, cpu_workers=workers)
    finally:
        if created:
            _remove_if_empty(cfg.out_dir)
    if verbose >= 1:
        console().print(_summary_table(results))
    if as_json:
        summary = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
        click.echo(json.dumps({"slides": [r.to_dict() for r in results], **summary,
                               "exit_code": _exit_code(results)}, indent=2))
    code = _exit_code(results)
    if code:
        raise click.exceptions.Exit(code)

