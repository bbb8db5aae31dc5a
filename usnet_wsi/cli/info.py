"""`usnet-wsi info SLIDE`: what the slide is, how much tissue, how many tiles, how long."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from usnet_wsi.cli.common import guarded, make_reporter, parse_box, verbosity_options
from usnet_wsi.config import SlideOptions, check_device, check_positive_int
from usnet_wsi.console import Reporter
from usnet_wsi.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

    from usnet_wsi.slide import Slide


def sample_tiles(slide: "Slide", opts: SlideOptions, model: dict, n: int) -> "np.ndarray":
    """`n` tissue tiles spread over the plan, read as the engine reads them."""
    import numpy as np
    from usnet_wsi.pipeline import find_tissue, plan_slide, region_reader
    plan = plan_slide(slide, opts, find_tissue(slide), model["tile_px"], model["halo_px"],
                      model["mpp"])
    picks = np.linspace(0, len(plan.tiles) - 1, n).round().astype(int)
    size = (plan.tile_px, plan.tile_px)
    reader = region_reader(slide)
    return np.stack([reader.read_region(plan.tiles[i].read_l0, size) for i in picks])


def model_settings(weights: Path | None, device: str, estimate: bool,
                   reporter: Reporter) -> tuple[dict[str, Any], Any]:
    """(tile/halo/mpp/name of the model, predictor or None). Without a loadable default
    bundle the default model settings are used (a given --weights must load)."""
    try:
        if estimate:
            from usnet_wsi.predict import load_predictor   # lazy: imports torch

            p = load_predictor(weights, device)
            return {"name": p.name, "tile_px": p.tile_px, "halo_px": p.halo_px,
                    "mpp": p.mpp, "device": p.device}, p
        from usnet_wsi.model.bundle import load_bundle

        b = load_bundle(weights)
        tile = b.config.get("inference_tile_px") or b.spec.input_size
        return {"name": b.name, "tile_px": tile, "halo_px": b.spec.halo_px,
                "mpp": b.spec.mpp, "device": None}, None
    except WeightsError as err:
        if weights is not None:
            raise
        from usnet_wsi.model.spec import ModelSpec

        spec = ModelSpec()
        reporter.warn(f"default weights unavailable ({err.message}); tile counts use the "
                      "default model settings and there is no time estimate")
        return {"name": None, "tile_px": spec.input_size, "halo_px": spec.halo_px,
                "mpp": spec.mpp, "device": None}, None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _lines(d: dict[str, Any]) -> list[str]:
    levels = ", ".join(f"{w}x{h} (/{ds:g})" for (w, h), ds in
                       zip(d["level_dimensions"], d["level_downsamples"]))
    obj = f"{d['objective_power']:g}x" if d["objective_power"] else "unknown"
    est = d.get("estimate")
    lines = [
        f"slide        {d['path']}",
        f"vendor       {d['vendor'] or 'unknown'}",
        f"dimensions   {d['width']} x {d['height']} px (level 0)",
        f"levels       {levels}",
        f"mpp          {d['mpp_x']:.4g} x {d['mpp_y']:.4g} um/px (from {d['mpp_source']})",
        f"objective    {obj}",
        f"tissue       {d['tissue_area_mm2']:.2f} mm^2",
        f"tiles        {d['tiles']} of {d['tiles_in_grid']} to process "
        f"({d['model_tile_px']} px at {d['model_mpp']:g} um/px, halo {d['model_halo_px']} px"
        f"{'' if d['tissue_mask'] else ', tissue mask off'})",
    ]
    if est:
        lines.append(f"estimate     about {_duration(est['seconds'])} of model time on "
                     f"{est['device']} ({est['seconds_per_tile'] * 1000:.0f} ms per tile, "
                     f"batch {est['batch_size']})")
    return lines


@click.command("info")
@click.argument("slide")
@click.option("--mpp", type=float, default=None,
              help="Microns per level-0 pixel; overrides the slide's own value.")
@click.option("--roi", default=None, metavar="X,Y,W,H", help="Only this level-0 box.")
@click.option("--no-tissue-mask", is_flag=True, help="Count every tile, not only tissue.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights bundle: a folder or a shipped bundle's name (default: the "
                   "shipped default); sets tile size and resolution.")
@click.option("--device", default="auto", show_default=True, help="Device for the estimate.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Batch size for the estimate.")
@click.option("--estimate/--no-estimate", default=True, show_default=True,
              help="Time one model batch to estimate the run time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@verbosity_options
@guarded
def info(slide: str, mpp: float | None, roi: str | None, no_tissue_mask: bool,
         weights: Path | None, device: str, batch_size: int, estimate: bool, as_json: bool,
         verbose: int) -> None:
    """Describe SLIDE: vendor, size, levels, resolution, tissue area, tiles, time estimate."""
    opts = SlideOptions(mpp=mpp, roi_xywh=parse_box(roi, "--roi"),
                        tissue_mask=not no_tissue_mask)
    device = check_device(device)
    check_positive_int(batch_size, "--batch-size", 8)
    reporter = make_reporter(verbose)
    from usnet_wsi.pipeline import slide_summary   # lazy: openslide
    from usnet_wsi.slide import open_slide

    with open_slide(slide, opts.mpp, reporter) as s:
        model, predictor = model_settings(weights, device, estimate, reporter)
        d = slide_summary(s, opts, model["tile_px"], model["halo_px"], model["mpp"])
        if predictor is not None and d["tiles"]:
            from usnet_wsi.engine import seconds_per_tile
            sample = sample_tiles(s, opts, model, min(batch_size, d["tiles"]))
            per_tile = seconds_per_tile(predictor, len(sample), tiles=sample)
            d["estimate"] = {"device": predictor.device, "seconds_per_tile": per_tile,
                             "batch_size": batch_size, "seconds": per_tile * d["tiles"]}
    d["model"] = model
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo("\n".join(_lines(d)))
