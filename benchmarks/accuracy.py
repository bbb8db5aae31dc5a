"""Accuracy report: segment the validation images as slides, exactly as a user would, and score them.

For each validation image NAME of MoNuSeg (default: the `validation_images` of the weights
bundle's config.json):

1. write images/NAME.tif as a pyramidal tiled slide (Aperio-style SVS, lossless deflate tiles,
   levels 1 and 1/4) with its true resolution: the MicronsPerPixel of annotations/NAME.xml
   when present, else 0.2527 um/px (the dataset README);
2. run `python -m usnet_wsi segment SLIDE -o OUT` in a subprocess (plus --weights/--device
   when given here);
3. evaluate OUT/NAME.geojson against labels/NAME.png (and against annotations/NAME.xml where it
   exists) with usnet_wsi.metrics at the image's mpp;
4. print a table and write benchmarks/results/accuracy.md and accuracy.json: per image, the
   per-image mean and the pooled values, the commands, the weights SHA-256 and the date.

    python benchmarks/accuracy.py [NAME ...] [--data DIR] [--weights BUNDLE] [--device cpu]

Exit status 1 with a message when `segment` fails or the inputs are missing (nothing written).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from usnet_wsi.annotations import load_imagescope_xml, read_pair  # noqa: E402
from usnet_wsi.errors import UsnetError  # noqa: E402
from usnet_wsi.metrics import DEFINITIONS, METRIC_KEYS, image_counts, summarise_dataset  # noqa: E402
from usnet_wsi.writers.atomic import atomic_path  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "monuseg-train"
DEFAULT_MPP = 0.2527          # MoNuSeg README: 40x, 0.2527 um/px
DEFAULT_BUNDLE = "usnet-monuseg-v1"
RESULTS = REPO / "benchmarks" / "results"
HEADERS = ("AJI", "AJI+", "PQ", "DQ", "SQ", "Dice", "Det F1", "AP50", "Pixel acc")


class BenchmarkError(Exception):
    """A failure that ends the benchmark with a message (and nothing written)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="validation image names (default: from the bundle)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MoNuSeg training folder")
    p.add_argument("--weights", help="weights bundle passed to segment (default: its default)")
    p.add_argument("--device", help="device passed to segment (default: segment's default)")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "accuracy",
                   help="folder for the slides and segment outputs (not committed)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where accuracy.md/.json go")
    p.add_argument("--reuse", action="store_true",
                   help="evaluate existing segment outputs in WORK instead of running segment")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs

def bundle_config(weights: str | None) -> tuple[dict, Path | None]:
    """config.json of the bundle segment will use ({} when none is found)."""
    if weights:
        candidates = [Path(weights) / "config.json"]
    else:
        roots = [REPO / "weights", REPO / "usnet_wsi" / "weights"]
        candidates = [r / DEFAULT_BUNDLE / "config.json" for r in roots]
        candidates += sorted(c for r in roots for c in r.glob("*/config.json"))
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")), path
    return {}, None


def validation_names(args: argparse.Namespace, config: dict, config_path: Path | None) -> list[str]:
    names = list(args.names) or list(config.get("validation_images") or [])
    if not names:
        where = f"in {config_path}" if config_path else "(no weights bundle config.json found)"
        raise BenchmarkError(f"no validation image names given and no 'validation_images' {where}; "
                             "name them: python benchmarks/accuracy.py NAME [NAME ...]")
    missing = [n for n in names if not (args.data / "images" / f"{n}.tif").is_file()
               or not (args.data / "labels" / f"{n}.png").is_file()]
    if missing:
        raise BenchmarkError(f"not found in {args.data}/images|labels: {', '.join(missing)}")
    return names


def true_mpp(data: Path, name: str) -> tuple[float, str]:
    """(um/px, where it came from): the XML's MicronsPerPixel, else the dataset's 0.2527."""
    xml = data / "annotations" / f"{name}.xml"
    if xml.is_file():
        mpp = load_imagescope_xml(xml).mpp
        if mpp:
            return mpp, "annotations XML MicronsPerPixel"
    return DEFAULT_MPP, "dataset README (0.2527 um/px)"


# ----------------------------------------------------------------------------- slide + segment

def write_slide(image_path: Path, slide_path: Path, mpp: float, tile: int = 256) -> tuple[int, int]:
    """Write an RGB image as an Aperio-style pyramidal SVS (levels 1, 1/4) with its mpp."""
    rgb = tifffile.imread(image_path)[..., :3]
    h, w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(rgb).resize((max(1, w // 4), max(1, h // 4)), Image.Resampling.BOX))
    desc = (f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RGB"
            f"|AppMag = {round(10 / mpp)}|MPP = {mpp}|Filename = {image_path.stem}")
    slide_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(slide_path) as tmp, tifffile.TiffWriter(tmp) as tw:
        for i, level in enumerate((rgb, small)):
            scale = level.shape[1] / w
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=0 if i == 0 else 1, metadata=None,
                     description=desc if i == 0 else "Aperio Image Library v12.0.0\r\nlevel",
                     resolution=(1e4 / mpp * scale, 1e4 / mpp * scale), resolutionunit="CENTIMETER")
    return w, h


def segment_command(slide: Path, out_dir: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "usnet_wsi", "segment", str(slide), "-o", str(out_dir)]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.device:
        cmd += ["--device", args.device]
    return cmd


def run_segment(cmd: list[str], name: str) -> float:
    """Run segment; return its wall time; BenchmarkError with its stderr tail on failure."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BenchmarkError(f"segment failed on {name} (exit {proc.returncode}):\n"
                             f"  {shlex.join(cmd)}\n{tail}")
    return time.monotonic() - t0


def find_outputs(out_dir: Path, name: str) -> tuple[Path, dict]:
    """The GeoJSON written for NAME and its run.json record ({} when absent)."""
    run_json = out_dir / f"{name}.run.json"
    record = json.loads(run_json.read_text(encoding="utf-8")) if run_json.is_file() else {}
    listed = (record.get("outputs") or {}).get("geojson")
    candidates = ([out_dir / listed] if listed else []) + [
        out_dir / f"{name}.geojson", out_dir / f"{name}.geojson.gz"]
    for path in candidates:
        if path.is_file():
            return path, record
    raise BenchmarkError(f"segment wrote no {name}.geojson[.gz] in {out_dir}")


def clear_outputs(out_dir: Path, name: str) -> None:
    """Remove this benchmark's earlier outputs for NAME so segment starts afresh."""
    import shutil
    for path in out_dir.glob(f"{name}.*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ----------------------------------------------------------------------------- evaluation

def evaluate_image(geojson: Path, data: Path, name: str, mpp: float, size_wh: tuple[int, int]) -> dict:
    """Counts against labels/NAME.png and, where present, annotations/NAME.xml."""
    out = {}
    pred, gt, notes = read_pair(geojson, data / "labels" / f"{name}.png")
    out["labels_png"] = (image_counts(pred.labels, gt.labels, pred.scores, mpp), notes)
    xml = data / "annotations" / f"{name}.xml"
    if xml.is_file():
        pred, gt, notes = read_pair(geojson, xml, region_l0=(0, 0, *size_wh))
        out["xml"] = (image_counts(pred.labels, gt.labels, pred.scores, mpp), notes)
    return out


def process(name: str, args: argparse.Namespace) -> dict:
    """Slide, segment, evaluate one image; returns its record (counts kept for pooling)."""
    mpp, mpp_source = true_mpp(args.data, name)
    slide = args.work / "slides" / f"{name}.svs"
    out_dir = args.work / "out"
    size_wh = write_slide(args.data / "images" / f"{name}.tif", slide, mpp)
    cmd = segment_command(slide, out_dir, args)
    seconds = None
    if not args.reuse:
        out_dir.mkdir(parents=True, exist_ok=True)
        clear_outputs(out_dir, name)
        print(f"{name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        seconds = run_segment(cmd, name)
    geojson, record = find_outputs(out_dir, name)
    return {"name": name, "mpp": mpp, "mpp_source": mpp_source, "segment_seconds": seconds,
            "segment_command": shlex.join(cmd), "run": record,
            "results": evaluate_image(geojson, args.data, name, mpp, size_wh)}


# ----------------------------------------------------------------------------- report

def summaries(records: list[dict]) -> dict[str, dict]:
    """Per ground-truth kind: summarise_dataset over the images that have it."""
    out = {}
    for gt_kind in ("labels_png", "xml"):
        counts = {r["name"]: r["results"][gt_kind][0] for r in records if gt_kind in r["results"]}
        if counts:
            out[gt_kind] = summarise_dataset(counts)
            for r in records:
                if gt_kind in r["results"]:
                    out[gt_kind]["per_image"][r["name"]]["notes"] += r["results"][gt_kind][1]
    return out


def weights_of(records: list[dict], config: dict) -> dict:
    used = {(r["run"].get("weights") or {}).get("sha256") for r in records} - {None}
    names = {(r["run"].get("weights") or {}).get("name") for r in records} - {None}
    sha = ", ".join(sorted(used)) or config.get("weights_sha256")
    return {"name": ", ".join(sorted(names)) or config.get("name") or "unknown",
            "sha256": sha or "unknown",
            "sha256_source": "segment run.json" if used else
                             ("bundle config.json" if sha else "not found: no run.json, no bundle")}


def report(records: list[dict], config: dict, argv: list[str], args: argparse.Namespace) -> dict:
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([Path(sys.executable).name, "benchmarks/accuracy.py", *argv]),
        "segment_command": "usnet-wsi segment SLIDE -o OUT" + (f" --weights {args.weights}" if args.weights else "")
                           + (f" --device {args.device}" if args.device else ""),
        "reused_outputs": bool(args.reuse),
        "weights": weights_of(records, config),
        "data": str(args.data),
        "images": [{k: r[k] for k in ("name", "mpp", "mpp_source", "segment_seconds")}
                   for r in records],
        "ground_truth": summaries(records),
        "definitions": DEFINITIONS,
    }


def _row(label: str, m: dict) -> str:
    cells = ["n/a" if m[k] is None else f"{m[k]:.4f}" for k in METRIC_KEYS]
    return f"| {label} | " + " | ".join(cells) + " |"


def markdown(rep: dict) -> str:
    w = rep["weights"]
    lines = ["# usnet-wsi accuracy report", "",
             f"- date (UTC): {rep['date_utc']}",
             f"- made by: `{rep['command']}`",
             f"- each image written as a pyramidal SVS slide at its true mpp, then: `{rep['segment_command']}`"
             + (" (outputs reused, segment not rerun)" if rep["reused_outputs"] else ""),
             f"- weights: {w['name']}, sha256 `{w['sha256']}` (source: {w['sha256_source']})",
             "- data: MoNuSeg 2018 training images (CC BY-NC-SA 4.0), validation split below", ""]
    titles = {"labels_png": "Ground truth: labels/NAME.png (instance label maps)",
              "xml": "Ground truth: annotations/NAME.xml (original ImageScope polygons, where present)"}
    for kind, summary in rep["ground_truth"].items():
        lines += [f"## {titles[kind]}", "", "| image | " + " | ".join(HEADERS) + " |",
                  "|---" * (len(HEADERS) + 1) + "|"]
        lines += [_row(name, m) for name, m in summary["per_image"].items()]
        lines += [_row("**mean over images**", summary), _row("**pooled**", summary["pooled"]), ""]
    lines += ["## Definitions", "", "Computed by `usnet_wsi.metrics` (same as `usnet-wsi evaluate`); "
              "mean = mean of per-image values, pooled = from counts summed over images.", ""]
    lines += [f"- **{k}**: {v}" for k, v in rep["definitions"].items()]
    return "\n".join(lines) + "\n"


def write_results(rep: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "accuracy.json") as tmp:
        tmp.write_text(json.dumps(rep, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(folder / "accuracy.md") as tmp:
        tmp.write_text(markdown(rep), encoding="utf-8")


def print_table(rep: dict) -> None:
    for kind, summary in rep["ground_truth"].items():
        print(f"\n{kind}: {summary['n_images']} images")
        print(f"{'image':<26}" + "".join(f"{h:>10}" for h in HEADERS))
        rows = [*summary["per_image"].items(), ("mean", summary), ("pooled", summary["pooled"])]
        for name, m in rows:
            print(f"{name:<26}" + "".join(f"{'n/a' if m[k] is None else format(m[k], '.4f'):>10}"
                                          for k in METRIC_KEYS))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        config, config_path = bundle_config(args.weights)
        names = validation_names(args, config, config_path)
        records = [process(name, args) for name in names]
    except (BenchmarkError, UsnetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rep = report(records, config, argv, args)
    print_table(rep)
    write_results(rep, args.results)
    print(f"\nwrote {args.results / 'accuracy.md'} and accuracy.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
