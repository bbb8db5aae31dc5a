"""`usnet-wsi export --format onnx|torchscript [--weights BUNDLE] -o FILE`: a deployable model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from usnet_wsi.cli.common import guarded, make_reporter, verbosity_options
from usnet_wsi.errors import OutputError, UsageError

# Exported outputs are float32; the exporters' kernels differ in rounding only (boxes are in
# model pixels, up to 300, hence their looser bound).
TOLERANCE = {"seg_probs": 1e-4, "det_probs": 1e-4, "boxes_xyxy": 1e-2, "refine_input": 1e-4,
             "mask_logits": 1e-3}


@click.command()
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript"]),
              help="torchscript: one file with forward + refine; onnx: FILE plus "
                   "NAME.refine.onnx beside it (needs the 'export' extra).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights bundle: a folder, or the name of a bundle shipped with usnet-wsi "
                   "(default: usnet-v2-w10; usnet-v2-ft1 and usnet-monuseg-v1 also ship).")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="File to write, e.g. usnet.onnx or usnet.pt.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare the export with the PyTorch model on random tiles.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@verbosity_options
@guarded
def export(fmt: str, weights: Path | None, output: Path, overwrite: bool, check: bool,
           as_json: bool, verbose: int) -> None:
    """Export US-Net and its 48x48 refiner for deployment without usnet-wsi.

    The model takes uint8 (B, S, S, 3) RGB tiles (S = 300 in the shipped bundles) at the
    bundle's microns per pixel and returns segmentation probabilities, detection
    probabilities, decoded xyxy boxes (one per anchor) and the refiner's input map; `refine`
    turns (N, R, 48, 48) crops into mask logits.
    Thresholds, NMS and cropping are left to the caller; the bundle's settings are stored in
    the export's metadata (key usnet_wsi). See usnet_wsi/export.py for the full contract.
    """
    from usnet_wsi.export import export_bundle, output_paths, require_onnx
    from usnet_wsi.model.bundle import load_bundle
    reporter = make_reporter(verbose)
    if fmt == "onnx":
        require_onnx()
    paths = output_paths(fmt, output)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"output exists: {', '.join(existing)}",
                         "choose another -o, or replace it with --overwrite")
    bundle = load_bundle(weights)
    reporter.info(f"exporting bundle {bundle.name} ({bundle.sha256[:12]}) as {fmt}")
    written = export_bundle(bundle, fmt, output)
    diffs = _check(bundle, fmt, written, reporter) if check else None
    for p in written:
        reporter.info(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    if as_json:
        click.echo(json.dumps({"format": fmt, "files": [str(p) for p in written],
                               "bundle": bundle.name, "weights_sha256": bundle.sha256,
                               "max_abs_diff": diffs}, indent=2))


def _check(bundle, fmt: str, paths: list[Path], reporter) -> dict[str, float] | None:
    """Numerical check against PyTorch; OutputError (files removed) when it disagrees."""
    from usnet_wsi.export import check_export
    diffs = check_export(bundle, fmt, paths)
    if not diffs:
        reporter.warn("onnxruntime is not installed: the ONNX graphs were validated with "
                      "onnx.checker but their numbers were not compared (pip install onnxruntime)")
        return None
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE[k]}
    if bad:
        for p in paths:
            p.unlink(missing_ok=True)
        raise OutputError(f"the export differs from the PyTorch model: {bad} (tolerances "
                          f"{ {k: TOLERANCE[k] for k in bad} }); its files were removed",
                          "report this; use the other --format meanwhile")
    reporter.info("check: export matches PyTorch (max abs diff "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ")")
    return diffs
