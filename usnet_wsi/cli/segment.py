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

from usnet_wsi.cli.common import guarded, make_reporter, parse_box, report_error, verbosity_options
from usnet_wsi.config import SegmentConfig, SlideOptions
from usnet_wsi.console import Reporter, console
from usnet_wsi.errors import OutputError, UsnetError


class LazyPredictor:
    """Loads the model on first use (skipped and unreadable slides never pay for it).

    A failure to load is fatal for the whole run: it is kept in `error` and re-raised.
    """

    def __init__(self, cfg: SegmentConfig, reporter: Reporter) -> None:
        self.cfg, self.reporter = cfg, reporter
        self.predictor: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.predictor is None:
            try:
                from usnet_wsi.predict import load_predictor  # lazy: imports torch

                cfg = self.cfg
                self.predictor = load_predictor(cfg.weights, cfg.device, cfg.tile_px,
                                                cfg.precision)
            except BaseException as err:
                self.error = err
                raise
            p = self.predictor
            precision = getattr(p, "precision", "fp32")
            self.reporter.info(f"model {p.name} ({p.sha256[:12]}) on {p.device}, {precision}, "
                               f"{p.tile_px} px tiles")
        return self.predictor


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


def _run_all(slides: tuple[str, ...], cfg: SegmentConfig, model: LazyPredictor,
             reporter: Reporter, verbose: int) -> list[Any]:
    """Segment each slide; a failing slide is reported and the others go on."""
    from usnet_wsi.pipeline import SlideResult, segment_slide
    from usnet_wsi.slide import slide_name

    results: list[SlideResult] = []
    names: dict[str, str] = {}
    for path in unique_slides(slides, reporter):
        name = slide_name(path)
        try:
            if name in names:
                raise OutputError(f"{path} and {names[name]} would both write {name}.* in "
                                  f"{cfg.out_dir}", "segment them into different -o folders")
            names[name] = path
            results.append(segment_slide(path, cfg, model, reporter))
        except Exception as err:  # noqa: BLE001 - one failing slide does not stop the rest
            if err is model.error:
                raise
            code = report_error(err, verbose >= 2)
            message = err.message if isinstance(err, UsnetError) else f"{type(err).__name__}: {err}"
            results.append(SlideResult(path, name, "failed", message=message, exit_code=code))
    return results


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
              help="Weights bundle folder (default: the bundle shipped with usnet-wsi).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (auto: CUDA if present).")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Tiles per model batch.")
@click.option("--workers", type=int, default=None,
              help="Worker processes for the CPU stage (nucleus outlines, stain measurements) "
                   "while the model runs; 0 = in the main process. Default: 0 on machines of "
                   "2 cores or fewer, else cores - 2 (at most 4). Two threads read tiles.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True,
              help="Network arithmetic. auto: fp16 on CUDA, bf16 on CPUs with native bf16 "
                   "(AVX512-BF16 / AMX; about twice as fast), else fp32.")
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
@verbosity_options
@guarded
def segment(slides: tuple[str, ...], out_dir: Path, weights: Path | None, device: str,
            batch_size: int, workers: int | None, precision: str, tile_px: int | None,
            mpp: float | None, roi: str | None,
            no_tissue_mask: bool, geojson_gz: bool, overwrite: bool, no_resume: bool,
            strict: bool, as_json: bool, verbose: int) -> None:
    """Find and outline every nucleus in each SLIDE; write NAME.geojson, NAME.zarr,
    NAME.run.json and NAME.overview.png into OUTDIR."""
    opts = SlideOptions(mpp=mpp, roi_xywh=parse_box(roi, "--roi"),
                        tissue_mask=not no_tissue_mask)
    cfg = SegmentConfig(out_dir=out_dir, slide=opts, weights=weights, device=device,
                        batch_size=batch_size, workers=workers, geojson_gz=geojson_gz,
                        overwrite=overwrite, strict=strict, precision=precision,
                        tile_px=tile_px, resume=not no_resume, argv=tuple(sys.argv))
    reporter = make_reporter(verbose)
    from usnet_wsi.outputs import clean_stale
    from usnet_wsi.pipeline import prepare_out_dir  # lazy: pulls in openslide, zarr

    created = prepare_out_dir(cfg.out_dir)
    removed = clean_stale(cfg.out_dir)
    if removed:
        reporter.info(f"removed {len(removed)} temporary file(s) left in {cfg.out_dir} by "
                      "runs that were killed")
    try:
        results = _run_all(slides, cfg, LazyPredictor(cfg, reporter),
                           reporter, verbose)
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

