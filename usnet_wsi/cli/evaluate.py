"""`usnet-wsi evaluate PRED GT`: AJI, AJI+, PQ/DQ/SQ, Dice, detection F1, AP50, pixel accuracy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from usnet_wsi.annotations import pair_folders, read_pair, stem_of
from usnet_wsi.cli.common import guarded, make_reporter, parse_box, verbosity_options
from usnet_wsi.console import Reporter
from usnet_wsi.errors import UsageError
from usnet_wsi.metrics import (
    DEFINITIONS,
    METRIC_KEYS,
    ImageCounts,
    counts_notes,
    detection_radius_px,
    image_counts,
    metrics_from_counts,
    summarise_dataset,
)

_LABELS = {
    "aji": ("AJI", "Kumar 2017: GT -> best-IoU prediction, many-to-one"),
    "aji_plus": ("AJI+", "one-to-one pairing (Hungarian, max IoU)"),
    "pq": ("PQ", "DQ x SQ, match at IoU > 0.5"),
    "dq": ("DQ", "TP / (TP + FP/2 + FN/2)"),
    "sq": ("SQ", "mean IoU of matches"),
    "dice": ("Dice", "binary foreground"),
    "det_f1": ("Det. F1", "centroids, one-to-one within {radius:.1f} px"),
    "ap50": ("AP50", "VOC all-point, mask IoU >= 0.5, by score"),
    "pixel_accuracy": ("Pixel acc.", "foreground/background agreement"),
}


def _parse_offset(text: str | None) -> tuple[float, float]:
    if text is None:
        return 0.0, 0.0
    try:
        dx, dy = (float(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"--offset {text!r} is not DX,DY", "give two numbers, e.g. --offset -1000,-2000") from None
    return dx, dy


def _pairs(pred: Path, gt: Path, reporter: Reporter) -> list[tuple[str, Path, Path]]:
    if pred.is_dir() != gt.is_dir():
        raise UsageError(f"PRED {pred} and GT {gt}: one is a folder, the other is not",
                         "give two files, or two folders whose files are paired by name")
    if not pred.is_dir():
        return [(stem_of(gt), pred, gt)]
    pairs, unpaired = pair_folders(pred, gt)
    if unpaired:
        shown = ", ".join(p.name for p in unpaired[:4]) + (", ..." if len(unpaired) > 4 else "")
        reporter.warn(f"{len(unpaired)} files without a namesake, not evaluated: {shown}")
        for path in unpaired:
            reporter.debug(f"unpaired: {path}")
    return pairs


def _evaluate_all(pairs: list[tuple[str, Path, Path]], region, offset, mpp: float,
                  reporter: Reporter) -> tuple[dict[str, ImageCounts], dict[str, list[str]]]:
    counts: dict[str, ImageCounts] = {}
    notes: dict[str, list[str]] = {}
    with reporter.task("evaluating", total=len(pairs)) as task:
        for name, pred_path, gt_path in pairs:
            reporter.debug(f"{name}: {pred_path} vs {gt_path}")
            pred, gt, read_notes = read_pair(pred_path, gt_path, region, offset)
            counts[name] = image_counts(pred.labels, gt.labels, pred.scores, mpp)
            notes[name] = read_notes
            task.advance(1)
    return counts, notes


def _result(counts: dict[str, ImageCounts], notes: dict[str, list[str]], settings: dict) -> dict:
    if len(counts) == 1:
        (name, c), = counts.items()
        result = {**metrics_from_counts(c), "name": name, "counts": c.scalars(),
                  "notes": notes[name] + counts_notes(c)}
    else:
        result = summarise_dataset(counts)
        for name, extra in notes.items():
            result["per_image"][name]["notes"] = extra + result["per_image"][name]["notes"]
        shared = {n for extra in notes.values() for n in extra if all(n in e for e in notes.values())}
        result["notes"] = sorted(shared) + result["notes"]
    return {**result, "settings": settings, "definitions": DEFINITIONS}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_table(result: dict, per_image: bool, radius: float) -> None:
    out = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 160)
    several = "per_image" in result
    table = Table(title="usnet-wsi evaluate" + (f" ({result['n_images']} images)" if several else ""))
    table.add_column("metric")
    table.add_column("mean over images" if several else "value", justify="right")
    if several:
        table.add_column("pooled", justify="right")
    table.add_column("variant")
    for key in METRIC_KEYS:
        label, variant = _LABELS[key]
        values = [_fmt(result[key])] + ([_fmt(result["pooled"][key])] if several else [])
        table.add_row(label, *values, variant.format(radius=radius))
    out.print(table)
    if several and per_image:
        out.print(_per_image_table(result["per_image"]))
    counts = result["pooled"]["counts"] if several else result["counts"]
    out.print(f"GT nuclei {counts['n_gt']}, predicted {counts['n_pred']}, PQ matches {counts['pq_tp']}, "
              f"detection matches {counts['det_tp']}")
    for note in result["notes"]:
        out.print(f"note: {note}", markup=False)


def _per_image_table(per_image: dict[str, dict]) -> Table:
    table = Table(title="per image")
    table.add_column("image")
    for key in METRIC_KEYS:
        table.add_column(_LABELS[key][0], justify="right")
    for name, m in per_image.items():
        table.add_row(name, *(_fmt(m[key]) for key in METRIC_KEYS))
    return table


@click.command("evaluate")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("gt", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--per-image", is_flag=True, help="Also tabulate each image (several images).")
@click.option("--region", metavar="X,Y,W,H",
              help="Window of the prediction's slide (level-0 px) that the GT covers.")
@click.option("--offset", metavar="DX,DY", help="Added to prediction coordinates first (px).")
@click.option("--mpp", type=float, default=0.25, show_default=True,
              help="Image resolution (um/px); scales the detection-F1 radius (12 px at 0.25).")
@verbosity_options
@guarded
def evaluate(pred: Path, gt: Path, as_json: bool, per_image: bool, region: str | None,
             offset: str | None, mpp: float, verbose: int) -> None:
    """Score predictions PRED against ground truth GT (files, or folders paired by name).

    \b
    PRED: GeoJSON / .geojson.gz (usnet-wsi or QuPath export) or an instance label image.
    GT:   ImageScope/MoNuSeg XML, instance label image (.png/.tif) or GeoJSON.
    \b
    Metrics (exact definitions, 0 = background, ids need not be contiguous):
      AJI    Kumar 2017: each GT takes its highest-IoU prediction (many-to-one);
             sum I / (sum U + area of untaken predictions); unmatched GT add their area.
      AJI+   the same with a one-to-one pairing (Hungarian, max summed IoU).
      PQ     DQ x SQ; TP = pair with IoU > 0.5; DQ = TP/(TP+FP/2+FN/2); SQ = mean TP IoU.
      Dice   binary foreground Dice.
      F1     detection: centroids one-to-one within 12 px at 0.25 um/px (scaled by --mpp).
      AP50   PASCAL VOC all-point interpolated AP, mask IoU >= 0.5, ranked by the
             prediction's "Detection probability" (1.0 for all when absent).
      PA     pixel accuracy: foreground/background agreement (US-Net paper).
    Several images: "mean" = mean of per-image values; "pooled" = from counts summed over
    images (AJI: all intersections / all unions; PQ, F1: summed TP/FP/FN; AP50: all
    predictions ranked together). Undefined values (e.g. no nuclei at all) are null / n/a.
    """
    reporter = make_reporter(verbose)
    region_l0 = parse_box(region, "--region")
    offset_xy = _parse_offset(offset)
    if not mpp > 0:
        raise UsageError(f"--mpp {mpp} must be > 0", "give the resolution in um/px, e.g. --mpp 0.25")
    pairs = _pairs(pred, gt, reporter)
    counts, notes = _evaluate_all(pairs, region_l0, offset_xy, mpp, reporter)
    radius = detection_radius_px(mpp)
    settings = {"pred": str(pred), "gt": str(gt), "mpp": mpp, "detection_radius_px": radius,
                "region_l0": list(region_l0) if region_l0 else None, "offset_xy": list(offset_xy)}
    result = _result(counts, notes, settings)
    if as_json:
        click.echo(json.dumps(result, indent=2, allow_nan=False))
    else:
        _print_table(result, per_image, radius)
