"""Accuracy report per dataset: segment the validation images as slides, exactly as a user would.

Datasets (`--dataset`, default: every one whose folder exists; a missing one is skipped with a
message):

- monuseg: MoNuSeg 2018 training images (../shared/data/monuseg-train, images/NAME.tif,
  labels/NAME.png, annotations/NAME.xml for some), at the XML's MicronsPerPixel, else 0.2527 um/px;
- consep: CoNSeP training tiles (../shared/data/consep-train, 256x256 images/NAME.jpg,
  labels/NAME.png), at 0.25 um/px.

Images: the `validation_images` of the measured bundle's config.json, each assigned to the
dataset whose folder holds it; for a dataset the bundle lists none of, a fixed split
(`FIXED_VALIDATION`: MoNuSeg's 6 organs of `usnet-wsi train --val monuseg`, and the 80 CoNSeP tiles
of source images 16, 17, 20, 23 and 27 held out by usnet-v2-ft1), so that every bundle is measured
on the same images. Names given on the command line replace both.

For each dataset:

1. write every image as a pyramidal tiled slide (Aperio-style SVS, lossless deflate tiles, levels
   1 and 1/4) with its true resolution;
2. run `python -m usnet_wsi segment SLIDE... -o OUT` once for all of the dataset's slides, in a
   subprocess (plus --weights/--device when given here);
3. evaluate OUT/NAME.geojson against labels/NAME.png (and annotations/NAME.xml where it exists)
   with usnet_wsi.metrics at the image's mpp, and count box-shaped fragments
   (usnet_wsi.fragments) among the predicted nuclei, and among the ground-truth nuclei as the
   definition's floor.

Printed per dataset, and written to benchmarks/results/accuracy-BUNDLE.md and .json: per image,
the per-image mean and the pooled values per dataset (datasets are never mixed), the commands,
the weights SHA-256, the images used, the run times and the date.

    python benchmarks/accuracy.py [NAME ...] [--dataset monuseg|consep ...] [--data DIR]
        [--consep-data DIR] [--weights BUNDLE] [--device cpu] [--reuse]

Exit status 1 with a message when `segment` fails or the inputs are missing (nothing written).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from usnet_wsi.annotations import load_geojson, load_imagescope_xml, read_pair  # noqa: E402
from usnet_wsi.cli.train import DEFAULT_VAL  # noqa: E402
from usnet_wsi.errors import UsnetError  # noqa: E402
from usnet_wsi.fragments import count_box_fragments, label_outlines, min_side_px  # noqa: E402
from usnet_wsi.metrics import DEFINITIONS, METRIC_KEYS, image_counts, summarise_dataset  # noqa: E402
from usnet_wsi.writers.atomic import atomic_path  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEFAULT_BUNDLE = "usnet-v2-w10"
RESULTS = REPO / "benchmarks" / "results"
HEADERS = ("AJI", "AJI+", "PQ", "DQ", "SQ", "Dice", "Det F1", "AP50", "Pixel acc")
CONSEP_VAL_SOURCES = ("train_16", "train_17", "train_20", "train_23", "train_27")
FIXED_VALIDATION = {
    "monuseg": tuple(sorted(DEFAULT_VAL)),
    "consep": tuple(f"{src}_{k:03d}" for src in CONSEP_VAL_SOURCES for k in range(16)),
}
FRAGMENT_DEFINITION = (
    "box fragment: a nucleus whose outline has a straight horizontal or vertical side on its own "
    "bounding box (vertices within 0.5 px of the line), at least 1.5 um (6 px at 0.25 um/px) and "
    "half the outline's extent along it, leaving the line at >= 60 degrees at one end at least, "
    "and not on the image border (usnet_wsi.fragments). Reported per 100 nuclei; the same count "
    "on the ground-truth outlines is the definition's floor (hand-drawn straight stretches)")


class BenchmarkError(Exception):
    """A failure that ends the benchmark with a message (and nothing written)."""


@dataclass(frozen=True)
class Dataset:
    """One annotated dataset: where it is, how its files are named, its resolution."""

    key: str
    title: str
    folder: Path
    image_suffix: str
    default_mpp: float
    mpp_note: str

    def image(self, name: str) -> Path:
        return self.folder / "images" / f"{name}{self.image_suffix}"

    def labels(self, name: str) -> Path:
        return self.folder / "labels" / f"{name}.png"

    def holds(self, name: str) -> bool:
        """True when the dataset has both the image and the label image of NAME."""
        return self.image(name).is_file() and self.labels(name).is_file()


def datasets_from(args: argparse.Namespace) -> dict[str, Dataset]:
    """Every known dataset, at the folders given on the command line."""
    return {
        "monuseg": Dataset("monuseg", "MoNuSeg 2018 training images (CC BY-NC-SA 4.0)",
                           args.data, ".tif", 0.2527, "dataset README"),
        "consep": Dataset("consep", "CoNSeP training tiles, 256x256 (TIA Centre, research use)",
                          args.consep_data, ".jpg", 0.25, "dataset README"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="image names (default: the bundle's validation images)")
    p.add_argument("--dataset", action="append", choices=sorted(FIXED_VALIDATION),
                   help="dataset to measure (repeatable; default: each one whose folder exists)")
    p.add_argument("--data", type=Path, default=SHARED / "monuseg-train", help="MoNuSeg folder")
    p.add_argument("--consep-data", type=Path, default=SHARED / "consep-train", help="CoNSeP folder")
    p.add_argument("--weights", help="weights bundle passed to segment (default: its default)")
    p.add_argument("--device", help="device passed to segment (default: segment's default)")
    p.add_argument("--tta", choices=("none", "flip", "flips"), default="none",
                   help="test-time flips passed to segment (results go to "
                        "accuracy-BUNDLE-tta-MODE.*)")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "accuracy",
                   help="folder for the slides and segment outputs (not committed)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="where accuracy-BUNDLE.md/.json go")
    p.add_argument("--reuse", action="store_true",
                   help="evaluate existing segment outputs in WORK instead of running segment")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs

def bundle_config(weights: str | None) -> tuple[dict, Path | None]:
    """config.json of the bundle segment will use ({} when none is found)."""
    roots = [REPO / "weights", REPO / "usnet_wsi" / "weights"]
    if weights:          # a bundle folder, or the name of a bundle shipped in the package
        candidates = [Path(weights) / "config.json"] + [r / weights / "config.json" for r in roots]
    else:
        candidates = [r / DEFAULT_BUNDLE / "config.json" for r in roots]
        candidates += sorted(c for r in roots for c in r.glob("*/config.json"))
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")), path
    return {}, None


def bundle_name(config: dict, config_path: Path | None, weights: str | None) -> str:
    """The bundle's name (config.json), else its folder's name; used in the results' file names."""
    name = config.get("name") or (config_path.parent.name if config_path else None)
    name = name or (Path(weights).name if weights else DEFAULT_BUNDLE)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def available(args: argparse.Namespace, all_sets: dict[str, Dataset]) -> list[Dataset]:
    """The datasets asked for (default: all) whose folder exists; the others skipped, said so."""
    wanted = args.dataset or list(all_sets)
    found = []
    for key in dict.fromkeys(wanted):
        ds = all_sets[key]
        if (ds.folder / "images").is_dir() and (ds.folder / "labels").is_dir():
            found.append(ds)
        else:
            print(f"skipped {key}: no images/ and labels/ in {ds.folder}", file=sys.stderr)
    if not found:
        raise BenchmarkError("no dataset found; give --data / --consep-data")
    return found


def assign(names: list[str], datasets: list[Dataset]) -> dict[str, list[str]]:
    """Each name to the first dataset whose folder holds it (names held by none are dropped)."""
    out: dict[str, list[str]] = {ds.key: [] for ds in datasets}
    for name in names:
        ds = next((d for d in datasets if d.holds(name)), None)
        if ds is not None:
            out[ds.key].append(name)
    return out


def explicit_images(names: list[str], datasets: list[Dataset]) -> dict[str, tuple[list[str], str]]:
    """Names given on the command line, per dataset; BenchmarkError for names found nowhere."""
    assigned = assign(names, datasets)
    missing = sorted(set(names) - {n for ns in assigned.values() for n in ns})
    if missing:
        where = ", ".join(str(d.folder) for d in datasets)
        raise BenchmarkError(f"not found (images/ + labels/) in {where}: {', '.join(missing)}")
    return {k: (ns, "named on the command line") for k, ns in assigned.items() if ns}


def validation_images(config: dict, datasets: list[Dataset]) -> dict[str, tuple[list[str], str]]:
    """Per dataset: the bundle's validation images held by it, else the fixed split."""
    from_bundle = assign(list(config.get("validation_images") or []), datasets)
    out = {}
    for ds in datasets:
        if from_bundle[ds.key]:
            out[ds.key] = (from_bundle[ds.key], "the bundle's config.json validation_images")
            continue
        names = list(FIXED_VALIDATION[ds.key])
        missing = [n for n in names if not ds.holds(n)]
        if missing:
            raise BenchmarkError(f"{ds.key}: fixed validation images not in {ds.folder}: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        out[ds.key] = (names, "fixed split (the bundle lists no validation image of this dataset)")
    return out


def true_mpp(ds: Dataset, name: str) -> tuple[float, str]:
    """(um/px, where it came from): the XML's MicronsPerPixel, else the dataset's README value."""
    xml = ds.folder / "annotations" / f"{name}.xml"
    if xml.is_file():
        mpp = load_imagescope_xml(xml).mpp
        if mpp:
            return mpp, "annotations XML MicronsPerPixel"
    return ds.default_mpp, ds.mpp_note


# ----------------------------------------------------------------------------- slide + segment

def read_rgb(path: Path) -> np.ndarray:
    """An RGB uint8 image from a TIFF (tifffile) or any format Pillow reads (JPEG, PNG)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return np.ascontiguousarray(tifffile.imread(path)[..., :3])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_slide(image_path: Path, slide_path: Path, mpp: float, tile: int = 256) -> tuple[int, int]:
    """Write an RGB image as an Aperio-style pyramidal SVS (levels 1, 1/4) with its mpp."""
    rgb = read_rgb(image_path)
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


def segment_command(slides: list[Path], out_dir: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "usnet_wsi", "segment", *map(str, slides), "-o", str(out_dir)]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.device:
        cmd += ["--device", args.device]
    if args.tta != "none":
        cmd += ["--tta", args.tta]
    return cmd


def run_segment(cmd: list[str], what: str) -> float:
    """Run segment; return its wall time; BenchmarkError with its stderr tail on failure."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        shown = shlex.join(cmd[:5] + ["..."] + cmd[-4:]) if len(cmd) > 12 else shlex.join(cmd)
        raise BenchmarkError(f"segment failed on {what} (exit {proc.returncode}):\n  {shown}\n{tail}")
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
    """Remove earlier outputs (and any resume journal) for NAME so segment starts afresh."""
    for path in [*out_dir.glob(f"{name}.*"), *out_dir.glob(f".{name}.*")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ----------------------------------------------------------------------------- evaluation

def outlines_of(geojson: Path) -> list[np.ndarray]:
    """Exterior ring of every predicted nucleus (its largest part)."""
    shapes = load_geojson(geojson)
    return [max(parts, key=lambda p: len(p[0]))[0] for parts in shapes.nuclei]


def fragment_counts(geojson: Path, gt_labels: np.ndarray, mpp: float) -> dict:
    """Box fragments among the predicted and the ground-truth nuclei of one image."""
    h, w = gt_labels.shape
    kwargs = {"min_side_px": min_side_px(mpp), "frame": (0.0, 0.0, float(w), float(h))}
    pred = outlines_of(geojson)
    gt = label_outlines(gt_labels)
    return {"pred_nuclei": len(pred), "pred_fragments": count_box_fragments(pred, **kwargs),
            "gt_nuclei": len(gt), "gt_fragments": count_box_fragments(gt, **kwargs)}


def evaluate_image(geojson: Path, ds: Dataset, name: str, mpp: float, size_wh: tuple[int, int]) -> dict:
    """Counts against labels/NAME.png and, where present, annotations/NAME.xml; fragments."""
    out = {}
    pred, gt, notes = read_pair(geojson, ds.labels(name))
    out["labels_png"] = (image_counts(pred.labels, gt.labels, pred.scores, mpp), notes)
    out["fragments"] = fragment_counts(geojson, gt.labels, mpp)
    xml = ds.folder / "annotations" / f"{name}.xml"
    if xml.is_file():
        pred, gt, notes = read_pair(geojson, xml, region_l0=(0, 0, *size_wh))
        out["xml"] = (image_counts(pred.labels, gt.labels, pred.scores, mpp), notes)
    return out


def run_dataset(ds: Dataset, names: list[str], args: argparse.Namespace, bundle: str) -> dict:
    """Slides, one segment call, evaluation: the dataset's records and its segment wall time."""
    work = args.work / (bundle if args.tta == "none" else f"{bundle}-tta-{args.tta}") / ds.key
    out_dir = work / "out"
    mpps = {n: true_mpp(ds, n) for n in names}
    slides = {n: work / "slides" / f"{n}.svs" for n in names}
    sizes = {n: write_slide(ds.image(n), slides[n], mpps[n][0]) for n in names}
    cmd = segment_command(list(slides.values()), out_dir, args)
    seconds = None
    if not args.reuse:
        out_dir.mkdir(parents=True, exist_ok=True)
        for n in names:
            clear_outputs(out_dir, n)
        print(f"{ds.key}: segment {len(names)} slides -> {out_dir}", file=sys.stderr, flush=True)
        seconds = run_segment(cmd, f"{ds.key} ({len(names)} slides)")
    records = []
    for n in names:
        geojson, record = find_outputs(out_dir, n)
        records.append({"name": n, "mpp": mpps[n][0], "mpp_source": mpps[n][1], "run": record,
                        "segment_seconds": (record.get("timings_s") or {}).get("total"),
                        "results": evaluate_image(geojson, ds, n, mpps[n][0], sizes[n])})
    return {"records": records, "segment_wall_seconds": seconds,
            "segment_command": "usnet-wsi " + shlex.join(
                segment_command([Path("SLIDE...")], Path("OUT"), args)[3:])}


# ----------------------------------------------------------------------------- summaries

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


def per_100(fragments: int, nuclei: int) -> float | None:
    return 100.0 * fragments / nuclei if nuclei else None


def _with_rates(c: dict) -> dict:
    return {**c, "pred_per_100": per_100(c["pred_fragments"], c["pred_nuclei"]),
            "gt_per_100": per_100(c["gt_fragments"], c["gt_nuclei"])}


def fragment_summary(records: list[dict]) -> dict:
    """Box fragments per image, pooled (from summed counts) and the mean of per-image rates."""
    per_image = {r["name"]: _with_rates(r["results"]["fragments"]) for r in records}
    keys = ("pred_nuclei", "pred_fragments", "gt_nuclei", "gt_fragments")
    pooled = _with_rates({k: sum(c[k] for c in per_image.values()) for k in keys})
    mean = {}
    for rate in ("pred_per_100", "gt_per_100"):
        values = [c[rate] for c in per_image.values() if c[rate] is not None]
        mean[rate] = float(np.mean(values)) if values else None
    return {"per_image": per_image, "pooled": pooled, "mean": mean}


def weights_of(records: list[dict], config: dict) -> dict:
    used = {(r["run"].get("weights") or {}).get("sha256") for r in records} - {None}
    names = {(r["run"].get("weights") or {}).get("name") for r in records} - {None}
    sha = ", ".join(sorted(used)) or config.get("weights_sha256")
    return {"name": ", ".join(sorted(names)) or config.get("name") or "unknown",
            "sha256": sha or "unknown",
            "sha256_source": "segment run.json" if used else
                             ("bundle config.json" if sha else "not found: no run.json, no bundle")}


def dataset_report(ds: Dataset, names: list[str], source: str, result: dict, config: dict) -> dict:
    records = result["records"]
    trained = sorted(set(names) & set(config.get("train_images") or []))
    return {
        "title": ds.title, "data": str(ds.folder), "n_images": len(names), "images_source": source,
        "images_in_bundle_training_set": trained,
        "segment_command": result["segment_command"],
        "segment_wall_seconds": result["segment_wall_seconds"],
        "images": [{k: r[k] for k in ("name", "mpp", "mpp_source", "segment_seconds")}
                   for r in records],
        "ground_truth": summaries(records),
        "fragments": fragment_summary(records),
    }


def report(runs: dict[str, tuple[Dataset, list[str], str, dict]], config: dict, bundle: str,
           argv: list[str], args: argparse.Namespace, seconds: float) -> dict:
    records = [r for _, _, _, res in runs.values() for r in res["records"]]
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([Path(sys.executable).name, "benchmarks/accuracy.py", *argv]),
        "bundle": bundle + ("" if args.tta == "none" else f"-tta-{args.tta}"),
        "tta": args.tta,
        "reused_outputs": bool(args.reuse),
        "weights": weights_of(records, config),
        "run_seconds": round(seconds, 1),
        "datasets": {key: dataset_report(ds, names, source, res, config)
                     for key, (ds, names, source, res) in runs.items()},
        "definitions": {**DEFINITIONS, "box_fragments": FRAGMENT_DEFINITION},
    }


# ----------------------------------------------------------------------------- output

def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _row(label: str, m: dict) -> str:
    return f"| {label} | " + " | ".join(_fmt(m[k]) for k in METRIC_KEYS) + " |"


def summary_lines(rep: dict) -> list[str]:
    """One row per dataset and averaging (labels/NAME.png ground truth)."""
    lines = ["| dataset | images | | AJI | PQ | Dice | Det F1 | box fragments / 100 nuclei "
             "(ground truth's own) |", "|---|---|---|---|---|---|---|---|"]
    for key, d in rep["datasets"].items():
        s, f = d["ground_truth"]["labels_png"], d["fragments"]
        for label, m, fr in (("mean over images", s, f["mean"]), ("pooled", s["pooled"], f["pooled"])):
            lines.append(f"| {key} | {d['n_images']} | {label} | " + " | ".join(
                _fmt(m[k]) for k in ("aji", "pq", "dice", "det_f1"))
                + f" | {_fmt(fr['pred_per_100'], 2)} ({_fmt(fr['gt_per_100'], 2)}) |")
    return lines


def fragment_lines(f: dict) -> list[str]:
    lines = ["| image | predicted nuclei | box fragments | per 100 | GT nuclei | GT box fragments "
             "| per 100 |", "|---|---|---|---|---|---|---|"]
    for name, c in [*f["per_image"].items(), ("**all images (pooled)**", f["pooled"])]:
        lines.append(f"| {name} | {c['pred_nuclei']} | {c['pred_fragments']} | "
                     f"{_fmt(c['pred_per_100'], 2)} | {c['gt_nuclei']} | {c['gt_fragments']} | "
                     f"{_fmt(c['gt_per_100'], 2)} |")
    m = f["mean"]
    lines.append(f"| **mean over images** | | | {_fmt(m['pred_per_100'], 2)} | | | "
                 f"{_fmt(m['gt_per_100'], 2)} |")
    return lines


def dataset_lines(key: str, d: dict) -> list[str]:
    mpps = sorted({f"{i['mpp']:.4g} um/px ({i['mpp_source']})" for i in d["images"]})
    wall = d["segment_wall_seconds"]
    lines = [f"## {key}: {d['title']}", "",
             f"- data: `{d['data']}`; resolution: {'; '.join(mpps)}",
             f"- images ({d['n_images']}): {d['images_source']}",
             "- images in the bundle's training set: "
             + (", ".join(d["images_in_bundle_training_set"]) or "none"),
             f"- one call for all of them: `{d['segment_command']}`"
             + (f", {wall:.0f} s wall time" if wall is not None else " (outputs reused)"),
             "- used: " + ", ".join(i["name"] for i in d["images"]), ""]
    titles = {"labels_png": "Ground truth: labels/NAME.png (instance label maps)",
              "xml": "Ground truth: annotations/NAME.xml (original ImageScope polygons, where present)"}
    for kind, summary in d["ground_truth"].items():
        lines += [f"### {titles[kind]}", "", "| image | " + " | ".join(HEADERS) + " |",
                  "|---" * (len(HEADERS) + 1) + "|"]
        lines += [_row(name, m) for name, m in summary["per_image"].items()]
        lines += [_row("**mean over images**", summary), _row("**pooled**", summary["pooled"]), ""]
    return lines + ["### Box-shaped fragments", "", *fragment_lines(d["fragments"]), ""]


def markdown(rep: dict) -> str:
    w = rep["weights"]
    lines = [f"# usnet-wsi accuracy report: {rep['bundle']}", "",
             f"- date (UTC): {rep['date_utc']}",
             f"- made by: `{rep['command']}` ({rep['run_seconds']:.0f} s in all)",
             "- each image written as a pyramidal SVS slide at its true mpp, then segmented by "
             "`usnet-wsi segment`, one call per dataset"
             + (" (outputs reused, segment not rerun)" if rep["reused_outputs"] else ""),
             f"- weights: {w['name']}, sha256 `{w['sha256']}` (source: {w['sha256_source']})",
             "- every dataset is reported on its own; ground truth labels/NAME.png", "",
             "## Summary", "", *summary_lines(rep), "",
             "In brackets: the same count on the ground-truth outlines, which have no refiner "
             "crops: what the definition finds in the annotations themselves.", ""]
    for key, d in rep["datasets"].items():
        lines += dataset_lines(key, d)
    lines += ["## Definitions", "", "Computed by `usnet_wsi.metrics` (same as `usnet-wsi evaluate`) "
              "and `usnet_wsi.fragments`; mean = mean of per-image values, pooled = from counts "
              "summed over a dataset's images.", ""]
    lines += [f"- **{k}**: {v}" for k, v in rep["definitions"].items()]
    return "\n".join(lines) + "\n"


def write_results(rep: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"accuracy-{rep['bundle']}.json", folder / f"accuracy-{rep['bundle']}.md"
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(rep, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(markdown(rep), encoding="utf-8")
    return paths


def print_table(rep: dict) -> None:
    for key, d in rep["datasets"].items():
        for kind, summary in d["ground_truth"].items():
            print(f"\n{key} / {kind}: {summary['n_images']} images")
            print(f"{'image':<26}" + "".join(f"{h:>10}" for h in HEADERS))
            rows = [*summary["per_image"].items(), ("mean", summary), ("pooled", summary["pooled"])]
            for name, m in rows:
                print(f"{name:<26}" + "".join(f"{_fmt(m[k]):>10}" for k in METRIC_KEYS))
    print(f"\n{rep['bundle']}")
    print("\n".join(summary_lines(rep)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t0 = time.monotonic()
    try:
        config, config_path = bundle_config(args.weights)
        bundle = bundle_name(config, config_path, args.weights)
        datasets = available(args, datasets_from(args))
        plan = (explicit_images(args.names, datasets) if args.names
                else validation_images(config, datasets))
        runs = {ds.key: (ds, *plan[ds.key], run_dataset(ds, plan[ds.key][0], args, bundle))
                for ds in datasets if ds.key in plan}
    except (BenchmarkError, UsnetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rep = report(runs, config, bundle, argv, args, time.monotonic() - t0)
    print_table(rep)
    paths = write_results(rep, args.results)
    print(f"\nwrote {paths[1]} and {paths[0].name} ({rep['run_seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
