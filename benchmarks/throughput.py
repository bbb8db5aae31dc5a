"""Throughput on real tissue: forward-only vs end to end, per stage, and the pipeline's ceiling.

The slide: the MoNuSeg validation images of the weights bundle (real H&E, 1000 x 1000 px each)
laid out as a mosaic (repeated with flips to `--repeat` copies) and written as a pyramidal SVS
at the images' own resolution (0.2527 um/px), so it is read, resampled and tiled like any slide.

Each measurement runs in its own subprocess (clean memory and thread state):

- forward: the predictor's network forward pass alone (same model, layout, precision and
  parts of a batch as `segment` uses) on the slide's planned tissue tiles, read beforehand;
  tiles/s; run before and after the end-to-end run, the faster counts;
- e2e: `segment_slide` on the slide, with wall time, seconds per stage, tiles/s, tissue MP/s
  (level-0 megapixels of the tile cores) and peak RSS of the main process plus its workers;
- replay (`--workers` 1 and 2): the same run with a predictor that returns outputs recorded
  from the real model instantly: the ceiling of everything around the network.

    python benchmarks/throughput.py [--repeat 2] [--batch-size 8] [--workers 2] [--device cpu]

Prints a table and writes benchmarks/results/throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "monuseg-train"
WORK = REPO / "benchmarks" / "work" / "throughput"
RESULTS = REPO / "benchmarks" / "results"
MPP = 0.2527


# ----------------------------------------------------------------------------- the slide

def mosaic(names: list[str], repeat: int) -> np.ndarray:
    """The validation images side by side, 3 per row, `repeat` times (flipped copies)."""
    imgs = [tifffile.imread(DATA / "images" / f"{n}.tif")[..., :3] for n in names]
    tiles = []
    for k in range(repeat):
        tiles += [np.ascontiguousarray(im[::-1] if k % 2 else im[:, ::-1] if k else im)
                  for im in imgs]
    while len(tiles) % 3:
        tiles.append(np.full_like(tiles[0], 240))
    rows = [np.concatenate(tiles[i:i + 3], axis=1) for i in range(0, len(tiles), 3)]
    return np.concatenate(rows, axis=0)


def make_slide(args: argparse.Namespace) -> Path:
    from usnet_wsi.model.bundle import load_bundle
    from usnet_wsi.pyramid import write_pyramidal_tiff
    path = WORK / f"mosaic-x{args.repeat}.svs"
    if path.exists():                  # made before (or brought along to a machine without data)
        return path
    names = [n for n in load_bundle(args.weights).config.get("validation_images") or []
             if (DATA / "images" / f"{n}.tif").is_file()]     # its MoNuSeg validation images
    if not names:
        raise SystemExit(f"the validation images of the bundle are not in {DATA}/images, and "
                         f"there is no {path.relative_to(REPO)} made from them")
    WORK.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(path, mosaic(names, args.repeat), MPP, kind="svs",
                         compression="jpeg", quality=90)
    return path


# ----------------------------------------------------------------------------- measurements

def _rss_peak_mib() -> float:
    """Peak resident memory of this process plus its live children (VmHWM), MiB: the CPU-stage
    workers, not the writer process of `--workers` >= 1, which has ended by then
    (`benchmarks/large_slide.py` samples it while it runs)."""
    pids = ["self"] + [str(p.pid) for p in multiprocessing.active_children()]
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _plan(slide_path: Path, predictor):
    from usnet_wsi.config import SlideOptions
    from usnet_wsi.console import Reporter
    from usnet_wsi.pipeline import find_tissue, plan_slide
    from usnet_wsi.slide import open_slide
    slide = open_slide(slide_path, None, Reporter(0, "none"))
    tissue = find_tissue(slide)
    return slide, plan_slide(slide, SlideOptions(), tissue, predictor.tile_px,
                             predictor.halo_px, predictor.mpp)


def measure_forward(opts: dict) -> dict:
    import torch
    from usnet_wsi.predict import batch_parts, load_predictor
    pred = load_predictor(opts["weights"], opts["device"], opts["tile_px"])
    slide, plan = _plan(Path(opts["slide"]), pred)
    size = (plan.tile_px, plan.tile_px)
    tiles = np.stack([slide.read_region(t.read_l0, size) for t in plan.tiles])
    bs, model, dev = opts["batch_size"], pred.model, pred.torch_device
    with torch.inference_mode():
        def run() -> None:
            for i in range(0, len(tiles), bs):
                batch = tiles[i:i + bs]
                for part in batch_parts(len(batch), plan.tile_px, dev.type):   # as predict
                    x = model.normalise(torch.from_numpy(batch[part]).to(dev))
                    with torch.autocast(dev.type, enabled=pred.amp):
                        model(x.contiguous(memory_format=torch.channels_last))
            if dev.type == "cuda":
                torch.cuda.synchronize()
        run_batches = tiles[:2 * bs]
        for i in range(0, len(run_batches), bs):   # warm-up
            model(model.normalise(torch.from_numpy(run_batches[i:i + bs]).to(dev))
                  .contiguous(memory_format=torch.channels_last))
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    return {"tiles": len(tiles), "wall_s": wall, "tiles_per_s": len(tiles) / wall,
            "tile_px": plan.tile_px, "halo_px": plan.halo_px}


class ReplayPredictor:
    """Returns recorded outputs instantly (keyed by tile index): the pipeline without a model.
    Tiles recorded unpainted are handed out unpainted where the engine asks (CPU-stage
    workers paint them), as the real predictor does."""

    defers_painting = True

    def __init__(self, recorded: dict, meta: dict) -> None:
        self.recorded = recorded
        for k, v in meta.items():
            setattr(self, k, v)

    def predict(self, tiles, meta=None, regions=None, paint=True):
        from usnet_wsi.instances import InstanceBatch, TileInstances
        from usnet_wsi.painting import TileMasks, UnpaintedBatch
        found = [self.recorded[t.index] for t in meta]
        if not paint and all(isinstance(f, TileMasks) for f in found):
            return UnpaintedBatch(found)
        return InstanceBatch.from_tiles([TileInstances(*f.paint(), f.detected)
                                         if isinstance(f, TileMasks) else f for f in found])


class RecordingPredictor:
    """Wraps the real predictor and keeps each tile's output (painted or not, as the engine
    asked for it)."""

    def __init__(self, inner) -> None:
        self.inner, self.recorded = inner, {}
        for k in ("name", "sha256", "device", "tile_px", "halo_px", "mpp", "precision",
                  "defers_painting"):
            setattr(self, k, getattr(inner, k, False))

    def predict(self, tiles, meta=None, regions=None, paint=True):
        from usnet_wsi.painting import UnpaintedBatch
        found = self.inner.predict(tiles, meta, regions, **({} if paint else {"paint": False}))
        for i, t in enumerate(meta):
            self.recorded[t.index] = (found.tiles[i] if isinstance(found, UnpaintedBatch)
                                      else found.tile(i))
        return found


def _segment(slide: Path, predictor, opts: dict, out: Path) -> dict:
    from usnet_wsi.config import SegmentConfig
    from usnet_wsi.console import Reporter
    from usnet_wsi.engine import cpu_pool
    from usnet_wsi.pipeline import segment_slide
    cfg = SegmentConfig(out_dir=out, batch_size=opts["batch_size"], workers=opts["workers"],
                        device=opts["device"], overwrite=True)
    cpu_pool(cfg.workers)                           # started once per process, like a CLI run
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = segment_slide(slide, cfg, predictor, Reporter(0, "none"))
    wall = time.perf_counter() - t0
    run = json.loads((out / f"{res.name}.run.json").read_text())
    core_mp = sum(run["plan"]["core_size_l0"] ** 2 for _ in range(res.tiles)) / 1e6
    t = run["timings_s"]
    streaming = wall - t.get("tissue_and_plan", 0.0) - t.get("finish", 0.0)
    return {"wall_s": wall, "tiles": res.tiles, "nuclei": res.nuclei,
            "tiles_per_s": res.tiles / wall, "tissue_mp_per_s": core_mp / wall,
            "streaming_tiles_per_s": res.tiles / streaming, "tissue_mp": core_mp,
            "timings_s": t, "rss_peak_mib": _rss_peak_mib(), "device": run["device"],
            "precision": run["model"].get("precision"), "workers": cfg.workers}


def measure_e2e(opts: dict) -> dict:
    from usnet_wsi.predict import load_predictor
    pred = RecordingPredictor(load_predictor(opts["weights"], opts["device"], opts["tile_px"]))
    result = _segment(Path(opts["slide"]), pred, opts, WORK / "out-e2e")
    meta = {k: getattr(pred, k) for k in ("name", "sha256", "device", "tile_px", "halo_px",
                                          "mpp")}
    with open(WORK / "recorded.pkl", "wb") as f:
        pickle.dump({"recorded": pred.recorded, "meta": meta}, f)
    return result


def measure_replay(opts: dict) -> dict:
    with open(WORK / "recorded.pkl", "rb") as f:
        rec = pickle.load(f)
    pred = ReplayPredictor(rec["recorded"], rec["meta"])
    return _segment(Path(opts["slide"]), pred, opts, WORK / f"out-replay-{opts['workers']}")


MODES = {"forward": measure_forward, "e2e": measure_e2e, "replay": measure_replay}


def in_subprocess(mode: str, opts: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", mode, json.dumps(opts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def table(r: dict) -> str:
    f, e = r["forward"], r["e2e"]
    rows = [("tile / halo px", f"{r['tile_px']} / {r['halo_px']}"),
            ("forward only", f"{f['tiles_per_s']:.1f} tiles/s ({f['tiles']} tiles)"),
            ("end to end", f"{e['tiles_per_s']:.1f} tiles/s, {e['tissue_mp_per_s']:.2f} "
                           f"tissue MP/s, {e['nuclei']} nuclei, {e['wall_s']:.1f} s "
                           f"(precision {e['precision']}, --workers {e['workers']})"),
            ("  while streaming", f"{e['streaming_tiles_per_s']:.1f} tiles/s (without the "
                                  "per-slide thumbnail, plan and finish)"),
            ("e2e / forward-only wall", f"{r['ratio_e2e_to_forward']:.2f}"),
            ("peak RSS (main + workers)", f"{e['rss_peak_mib']:.0f} MiB")]
    rows += [(f"  {k} s", f"{v:.2f}") for k, v in e["timings_s"].items()]
    for w, rep in sorted(r["replay"].items()):
        rows.append((f"replay, --workers {w}", f"{rep['tiles_per_s']:.1f} tiles/s, "
                                               f"{rep['tissue_mp_per_s']:.2f} tissue MP/s; "
                                               f"{rep['streaming_tiles_per_s']:.1f} tiles/s "
                                               "while streaming"))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=2, help="copies of the 6 images in the mosaic")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None,
                   help="CPU-stage processes for e2e (default: segment's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default=None)
    p.add_argument("--tile-px", type=int, default=None,
                   help="inference tile side (default: the bundle's)")
    p.add_argument("--one", nargs=2, metavar=("MODE", "OPTS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        from usnet_wsi.allocator import keep_freed_memory
        keep_freed_memory()                      # as the command-line interface does
        print(json.dumps(MODES[args.one[0]](json.loads(args.one[1]))))
        return 0
    slide = make_slide(args)
    opts = {"slide": str(slide), "weights": args.weights, "device": args.device,
            "batch_size": args.batch_size, "workers": args.workers, "tile_px": args.tile_px}
    # forward-only before and after the end-to-end run; the faster one counts (the machine may
    # be busy with something else during one of them; the faster forward is the stricter ratio)
    first = in_subprocess("forward", opts)
    result = {"e2e": in_subprocess("e2e", opts)}
    second = in_subprocess("forward", opts)
    result["forward"] = max(first, second, key=lambda r: r["tiles_per_s"])
    result["forward_runs_tiles_per_s"] = [first["tiles_per_s"], second["tiles_per_s"]]
    result["replay"] = {w: in_subprocess("replay", {**opts, "workers": w}) for w in (1, 2)}
    result["ratio_e2e_to_forward"] = (result["forward"]["tiles_per_s"]
                                      / result["e2e"]["tiles_per_s"])
    result["tile_px"], result["halo_px"] = result["forward"]["tile_px"], result["forward"]["halo_px"]
    result.update({"slide": slide.name, "settings": opts, "date": datetime.now(timezone.utc)
                   .isoformat(timespec="seconds"), "machine": platform.processor() or
                   platform.machine(), "cpus": multiprocessing.cpu_count()})
    print(table(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    tile = f"-{args.tile_px}" if args.tile_px else ""
    out = RESULTS / f"throughput-{args.device.split(':')[0]}{tile}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
