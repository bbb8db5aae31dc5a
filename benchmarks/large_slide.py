"""Time and peak memory of `segment` on a large synthetic slide (default 40,000 x 40,000 px).

1. Writes an Aperio-style pyramidal SVS (JPEG tiles, levels /1 /4 /16 /64) tile by tile from
   a generator, so the slide never sits in memory: glass, a tissue rectangle with a glass hole,
   dark nuclei on a jittered grid inside the tissue (known places).
2. Runs `usnet_wsi.pipeline.segment_slide` on it in a fresh child process, with the oracle model
   (tests/oracle.py: the true nuclei, so the run measures reading, tiling, post-processing,
   merge and writers, not the network) or the real model (`--model real`).
3. Samples the resident memory of the child and its worker processes (VmRSS summed, every
   0.1 s) and reads the child's own peak (ru_maxrss);
   prints a table and writes JSON to benchmarks/results/.

    python benchmarks/large_slide.py                       # 40k x 40k, oracle
    python benchmarks/large_slide.py --size 4000           # quick check
    python benchmarks/large_slide.py --model real --device cuda --batch-size 32 --workers 8

The slide is kept in benchmarks/work/ (not committed) and reused when its parameters match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "large_slide"
RESULTS = REPO / "benchmarks" / "results"
TILE = 512
LEVELS = (1, 4, 16, 64)
GLASS, TISSUE, NUCLEUS = (243, 241, 245), (226, 160, 196), (82, 42, 128)
SPACING, RADIUS = 48, 9.0


# ----------------------------------------------------------------------------- the scene

class Scene:
    """Tissue rectangle with a glass hole; nuclei on a jittered grid inside the tissue."""

    def __init__(self, width: int, height: int, seed: int = 0) -> None:
        self.width, self.height = width, height
        self.tissue = (int(0.08 * width), int(0.10 * height), int(0.92 * width),
                       int(0.90 * height))
        self.hole = (int(0.40 * width), int(0.40 * height), int(0.60 * width),
                     int(0.60 * height))
        rng = np.random.default_rng(seed)
        ny, nx = height // SPACING, width // SPACING
        jitter = rng.uniform(-SPACING / 6, SPACING / 6, size=(2, ny, nx))
        self.cx = (np.arange(nx) + 0.5) * SPACING + jitter[0]
        self.cy = (np.arange(ny)[:, None] + 0.5) * SPACING + jitter[1]
        self.ry = RADIUS * rng.uniform(0.65, 1.0, size=(ny, nx))
        self.angle = rng.uniform(-90, 90, size=(ny, nx))
        self.valid = self._in_tissue(self.cx, self.cy, margin=RADIUS + 1)
        self.noise = rng.integers(-8, 9, size=(TILE, TILE, 1), dtype=np.int16)

    def _in_tissue(self, x: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
        t, h = self.tissue, self.hole
        inside = (x >= t[0] + margin) & (x < t[2] - margin) & (y >= t[1] + margin) & \
                 (y < t[3] - margin)
        in_hole = (x >= h[0] - margin) & (x < h[2] + margin) & (y >= h[1] - margin) & \
                  (y < h[3] + margin)
        return inside & ~in_hole

    def nuclei_array(self) -> np.ndarray:
        """(N, 5): cx, cy, rx, ry, angle_deg of the true nuclei (tests/oracle.py format)."""
        cx, cy = self.cx[self.valid], self.cy[self.valid]
        return np.stack([cx, cy, np.full(cx.shape, RADIUS), self.ry[self.valid],
                         self.angle[self.valid]], axis=1)

    def paint_tile(self, x0: int, y0: int, d: int) -> np.ndarray:
        """uint8 (TILE, TILE, 3) of level `d` (downsample) at level-d pixel (x0, y0)."""
        from skimage.draw import ellipse

        xs = (np.arange(x0, x0 + TILE) + 0.5) * d          # level-0 sample points
        ys = (np.arange(y0, y0 + TILE) + 0.5) * d
        tissue = self._in_tissue(xs[None, :], ys[:, None], margin=0)
        img = np.empty((TILE, TILE, 3), np.uint8)
        img[:] = GLASS
        if tissue.any():
            pink = np.clip(np.array(TISSUE, np.int16) + self.noise, 0, 255).astype(np.uint8)
            img[tissue] = pink[tissue]
        if d > 4:
            return img
        j0 = max(0, int((x0 * d - 2 * SPACING) // SPACING))
        j1 = min(self.valid.shape[1], int(((x0 + TILE) * d + 2 * SPACING) // SPACING) + 1)
        i0 = max(0, int((y0 * d - 2 * SPACING) // SPACING))
        i1 = min(self.valid.shape[0], int(((y0 + TILE) * d + 2 * SPACING) // SPACING) + 1)
        for i in range(i0, i1):
            for j in range(j0, j1):
                if not self.valid[i, j]:
                    continue
                rr, cc = ellipse((self.cy[i, j] + 0.5) / d - 0.5 - y0,
                                 (self.cx[i, j] + 0.5) / d - 0.5 - x0,
                                 self.ry[i, j] / d, RADIUS / d, shape=(TILE, TILE),
                                 rotation=math.radians(self.angle[i, j]))
                img[rr, cc] = NUCLEUS
        return img


def write_slide(path: Path, scene: Scene, mpp: float) -> float:
    """Write the pyramid tile by tile; returns seconds."""
    import tifffile

    t0 = time.perf_counter()
    w, h = scene.width, scene.height
    tmp = path.with_name(path.name + ".tmp")
    desc0 = (f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB "
             f"Q=90|AppMag = {round(10 / mpp)}|MPP = {mpp}|Filename = large-synthetic")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, d in enumerate(LEVELS):
            lw, lh = -(-w // d), -(-h // d)
            tiles = (scene.paint_tile(x, y, d) for y in range(0, lh, TILE)
                     for x in range(0, lw, TILE))
            tw.write(tiles, shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE),
                     photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                     subfiletype=0 if k == 0 else 1, metadata=None,
                     description=desc0 if k == 0 else "Aperio Image Library v12.0.0\r\nlevel")
    os.replace(tmp, path)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the child run

def _rss_mib() -> float:
    """Resident memory of this process plus its live children (CPU-stage workers, the writer),
    MiB."""
    import multiprocessing
    total = 0.0
    for pid in ["self"] + [str(p.pid) for p in multiprocessing.active_children()]:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total if total else math.nan


class RssSampler(threading.Thread):
    """Samples VmRSS every `every_s` seconds: (seconds since start, MiB)."""

    def __init__(self, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.every_s, self.t0 = every_s, time.perf_counter()
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, _rss_mib()))
            self.stop.wait(self.every_s)

    def peak(self, after_s: float = 0.0) -> float:
        return max((m for t, m in self.samples if t >= after_s), default=math.nan)

    def timeline(self, points: int = 60) -> list[tuple[float, float]]:
        step = max(1, len(self.samples) // points)
        return [(round(t, 1), round(m)) for t, m in self.samples[::step]]


def child(opts: dict) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    from usnet_wsi.config import SegmentConfig
    from usnet_wsi.console import Reporter
    from usnet_wsi.pipeline import segment_slide

    scene = Scene(opts["size"], opts["size"], opts["seed"])
    if opts["model"] == "oracle":
        from oracle import OraclePredictor

        predictor = OraclePredictor(scene.nuclei_array(), scene.width, scene.height,
                                    opts["model_mpp"], opts["tile_px"], opts["halo_px"],
                                    check_pixels=False)
    else:
        from usnet_wsi.predict import load_predictor

        predictor = load_predictor(opts["weights"], opts["device"])
    n_true = int(scene.valid.sum())
    del scene
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = SegmentConfig(out_dir=out, batch_size=opts["batch_size"], workers=opts["workers"],
                        device=opts["device"], overwrite=True)
    baseline = _rss_mib()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    res = segment_slide(opts["slide"], cfg, predictor, Reporter(1, "plain"))
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    run = json.loads((out / f"{res.name}.run.json").read_text())
    stream_from = run["timings_s"].get("tissue_and_plan", 0.0) + 0.5
    return {"wall_s": wall, "tiles": res.tiles, "nuclei": res.nuclei, "true_nuclei": n_true,
            "rss_before_segment_mib": baseline, "rss_peak_sampled_mib": sampler.peak(),
            "rss_peak_streaming_mib": sampler.peak(stream_from),
            "rss_timeline_s_mib": sampler.timeline(),
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "timings_s": run["timings_s"], "device": run["device"],
            "weights": run["weights"], "output_bytes": _sizes(out, res.name)}


def _sizes(out: Path, name: str) -> dict[str, int]:
    sizes = {}
    for p in out.glob(f"{name}.*"):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        sizes[p.name] = sum(f.stat().st_size for f in files)
    return sizes


# ----------------------------------------------------------------------------- main

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=40000, help="slide side in level-0 px")
    p.add_argument("--mpp", type=float, default=0.25, help="slide um/px")
    p.add_argument("--model", choices=("oracle", "real"), default="oracle")
    p.add_argument("--weights", default=None, help="bundle for --model real")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tile-px", type=int, default=300, help="oracle tile side (model px)")
    p.add_argument("--halo-px", type=int, default=40, help="oracle halo (model px)")
    p.add_argument("--model-mpp", type=float, default=0.25, help="oracle resolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ensure_slide(args: argparse.Namespace) -> tuple[Path, float | None]:
    """The slide for these parameters (reused if present); (path, seconds to write or None)."""
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"synthetic-{args.size}-mpp{args.mpp:g}-seed{args.seed}.svs"
    if path.is_file():
        return path, None
    print(f"writing {path.name} ...", file=sys.stderr, flush=True)
    return path, write_slide(path, Scene(args.size, args.size, args.seed), args.mpp)


def table(r: dict) -> str:
    c = r["run"]
    rows = [("slide", f"{r['size']} x {r['size']} px at {r['mpp']} um/px "
                      f"({r['slide_bytes'] / 2**20:.0f} MiB on disk)"),
            ("model", f"{r['model']} on {c['device']}, batch {r['batch_size']}, "
                      f"workers {r['workers']}"),
            ("write slide", "reused" if r["write_slide_s"] is None else f"{r['write_slide_s']:.1f} s"),
            ("segment wall", f"{c['wall_s']:.1f} s ({c['tiles'] / max(c['wall_s'], 1e-9):.1f} tiles/s)"),
            ("tiles", str(c["tiles"])),
            ("nuclei", f"{c['nuclei']} (true {c['true_nuclei']})"),
            ("RSS before segment", f"{c['rss_before_segment_mib']:.0f} MiB"),
            ("RSS peak", f"{max(c['rss_peak_sampled_mib'], c['ru_maxrss_mib']):.0f} MiB"),
            ("RSS peak streaming", f"{c['rss_peak_streaming_mib']:.0f} MiB (after thumbnail, "
                                   "tissue and plan)"),
            ("stages (s)", ", ".join(f"{k} {v:.1f}" for k, v in c["timings_s"].items())),
            ("outputs", ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in c["output_bytes"].items()))]
    return aligned(rows)


def aligned(rows: list[tuple[str, str]]) -> str:
    """Two columns, the first padded to its widest entry."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        from usnet_wsi.allocator import keep_freed_memory
        keep_freed_memory()                      # as the command-line interface does
        print(json.dumps(child(json.loads(args.child))))
        return 0
    slide, write_s = ensure_slide(args)
    opts = {"slide": str(slide), "out": str(args.work / f"out-{args.model}"), "size": args.size,
            "seed": args.seed, "model": args.model, "weights": args.weights,
            "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
            "tile_px": args.tile_px, "halo_px": args.halo_px, "model_mpp": args.model_mpp}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(opts)],
                          stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode:
        print(f"segment failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    result = {"size": args.size, "mpp": args.mpp, "model": args.model,
              "batch_size": args.batch_size, "workers": args.workers,
              "slide_bytes": slide.stat().st_size, "write_slide_s": write_s,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "run": json.loads(proc.stdout.strip().splitlines()[-1])}
    write_result(args.results / f"large_slide-{args.size}-{args.model}.json", result,
                 table(result))
    return 0


def write_result(dest: Path, result: dict, text: str) -> None:
    """The JSON result file, and the table on stdout."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"written {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")


if __name__ == "__main__":
    sys.exit(main())
