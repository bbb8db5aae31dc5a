"""Time and peak memory of `LabelZarrWriter` for slides of growing width.

For each width (default 10,000 / 40,000 / 100,000 px, 4,096 rows) and each nucleus count,
random nuclei (rotated ellipses, 5-14 px radii, 33 vertices) are streamed in row-major order
through `add`, with `complete_above` every `--horizon-every` nuclei, then `close()`:

- wall_s, cpu_s: best of `--repeat` runs, no tracing; CPU time (all threads of the process)
  is the steadier number on a shared machine;
- level0_only_*: the same with `min_level_px` above the slide size (no pyramid levels), so
  cpu_s - level0_only_cpu_s is what building the pyramid costs;
- peak_mib: tracemalloc peak of a separate run (numpy, zarr and shapely allocations included);
- band_mib: for comparison, one full-width band of `chunk_px` rows of uint32;
- chunks: stored chunk objects at level 0 and at all levels.

Each case runs for every `--band-chunks` value (level-0 chunk rows per band): with 2 or
more, a band's level-1 chunks are filled whole before they are written, so fewer pyramid
chunks are read back and rewritten, at the price of holding a band's nuclei longer.

    python benchmarks/zarr_writer.py
    python benchmarks/zarr_writer.py --widths 10000 100000 --nuclei 0 5000 --repeat 3

Prints a table and writes benchmarks/results/zarr_writer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import shapely
import zarr
from shapely import affinity
from shapely.geometry import Point

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from usnet_wsi.writers.zarr import LabelZarrWriter  # noqa: E402


def make_nuclei(width: int, height: int, n: int, seed: int) -> list[shapely.Polygon]:
    """n random rotated ellipses inside the slide, sorted by their top edge (row-major)."""
    rng = np.random.default_rng(seed)
    unit = Point(0.0, 0.0).buffer(1.0, quad_segs=8)
    polys = []
    for cx, cy, ax, ay, angle in zip(rng.uniform(15, width - 15, n),
                                     rng.uniform(15, height - 15, n), rng.uniform(5, 14, n),
                                     rng.uniform(5, 14, n), rng.uniform(0, 180, n)):
        ell = affinity.rotate(affinity.scale(unit, ax, ay, origin=(0, 0)), angle, origin=(0, 0))
        polys.append(affinity.translate(ell, cx, cy))
    polys.sort(key=lambda p: p.bounds[1])
    return polys


def write(path: Path, polys: list[shapely.Polygon], width: int, height: int, chunk_px: int,
          band_chunks: int, min_level_px: int, horizon_every: int) -> tuple[float, float]:
    """Stream the nuclei through the writer; returns (wall, CPU) seconds (CPU: all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with LabelZarrWriter(path, width, height, 0.25, 0.25, chunk_px=chunk_px,
                         band_chunks=band_chunks, min_level_px=min_level_px) as writer:
        for i, poly in enumerate(polys):
            writer.add(i + 1, poly, 0.9)
            if (i + 1) % horizon_every == 0 and i + 1 < len(polys):
                writer.complete_above(polys[i + 1].bounds[1])
    return time.perf_counter() - t0, time.process_time() - c0


def stored_chunks(path: Path) -> list[int]:
    """Number of stored chunk objects of each pyramid level."""
    group = zarr.open_group(path, mode="r")["labels/nuclei"]
    n_levels = len(group.attrs["ome"]["multiscales"][0]["datasets"])
    return [sum(1 for f in (path / f"labels/nuclei/{k}/c").rglob("*") if f.is_file())
            if (path / f"labels/nuclei/{k}/c").exists() else 0 for k in range(n_levels)]


def measure(width: int, n: int, band_chunks: int, args: argparse.Namespace, work: Path) -> dict:
    polys = make_nuclei(width, args.height, n, args.seed)
    run = dict(width=width, height=args.height, chunk_px=args.chunk_px, band_chunks=band_chunks,
               min_level_px=args.min_level_px, horizon_every=args.horizon_every)
    walls, level0 = [], []
    for i in range(args.repeat):
        walls.append(write(work / f"p{i}.zarr", polys, **run))
        level0.append(write(work / f"l{i}.zarr", polys, **{**run, "min_level_px": 10**9}))
    chunks = stored_chunks(work / "p0.zarr")
    tracemalloc.start()
    try:
        write(work / "traced.zarr", polys, **run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"width": width, "height": args.height, "nuclei": n, "band_chunks": band_chunks,
            "wall_s": min(w for w, _ in walls), "cpu_s": min(c for _, c in walls),
            "level0_only_wall_s": min(w for w, _ in level0),
            "level0_only_cpu_s": min(c for _, c in level0), "peak_mib": peak / 2**20,
            "band_mib": args.chunk_px * width * 4 / 2**20, "levels": len(chunks),
            "chunks_level0": chunks[0], "chunks_all_levels": sum(chunks),
            "chunks_level0_total": -(-args.height // args.chunk_px) * -(-width // args.chunk_px)}


COLUMNS = [  # header, width, how to show a row
    ("width", 8, lambda r: f"{r['width']}"),
    ("nuclei", 7, lambda r: f"{r['nuclei']}"),
    ("band", 4, lambda r: f"{r['band_chunks']}"),
    ("wall s", 7, lambda r: f"{r['wall_s']:.2f}"),
    ("cpu s", 6, lambda r: f"{r['cpu_s']:.2f}"),
    ("l0 cpu", 6, lambda r: f"{r['level0_only_cpu_s']:.2f}"),
    ("us/nuc", 6, lambda r: f"{1e6 * r['cpu_s'] / r['nuclei']:.0f}" if r["nuclei"] else "-"),
    ("peak MiB", 8, lambda r: f"{r['peak_mib']:.1f}"),
    ("band MiB", 8, lambda r: f"{r['band_mib']:.0f}"),
    ("chunks l0", 11, lambda r: f"{r['chunks_level0']}/{r['chunks_level0_total']}"),
    ("all lvls", 8, lambda r: f"{r['chunks_all_levels']}"),
]


def table(rows: list[dict]) -> str:
    head = " ".join(f"{name:>{w}}" for name, w, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    lines += [" ".join(f"{show(r):>{w}}" for _, w, show in COLUMNS) for r in rows]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[10_000, 40_000, 100_000])
    p.add_argument("--height", type=int, default=4096)
    p.add_argument("--nuclei", type=int, nargs="+", default=[0, 20_000])
    p.add_argument("--chunk-px", type=int, default=1024)
    p.add_argument("--band-chunks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--min-level-px", type=int, default=1024)
    p.add_argument("--horizon-every", type=int, default=500)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rows = []
    for width in args.widths:
        for n in args.nuclei:
            for band in args.band_chunks:
                with tempfile.TemporaryDirectory() as work:
                    rows.append(measure(width, n, band, args, Path(work)))
                print(f"done: width {width}, {n} nuclei, band_chunks {band}", file=sys.stderr,
                      flush=True)
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items() if k != "results"},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "zarr": zarr.__version__,
                          "numpy": np.__version__, "shapely": shapely.__version__},
              "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    dest = args.results / "zarr_writer.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"written {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
