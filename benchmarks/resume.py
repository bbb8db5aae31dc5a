"""What the resume journal costs, and what resuming saves, on the 8k synthetic slide.

One process runs `segment_slide` on the synthetic slide of benchmarks/large_slide.py
(default 8,000 x 8,000 px) alternately with the journal on (the default) and with its writes
switched off, `--repeats` times each, and reports the median wall time of both and their
ratio (the journal's cost), plus the time the journal's own writes took (run.json
`timings_s.journal`). Then it interrupts a run after half of the tiles (the model raises, as
when a device is lost) and times the re-run that resumes from the journal.

    python benchmarks/resume.py                      # 8k slide, oracle model
    python benchmarks/resume.py --model real         # the shipped model (slower; the
                                                     # journal's share is smaller)

On a busy machine wall times are noisy; the CPU time of the process and the journal's own
write time are the steadier figures. The oracle (tests/oracle.py: the true nuclei, no network) makes the rest of the run as fast as
it can be, so the journal's share measured with it is an upper bound. Prints a table and
writes JSON to benchmarks/results/resume-SIZE-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import large_slide  # noqa: E402


class _Lost(RuntimeError):
    pass


def make_predictor(args: argparse.Namespace):
    if args.model == "oracle":
        from oracle import OraclePredictor

        scene = large_slide.Scene(args.size, args.size, args.seed)
        return OraclePredictor(scene.nuclei_array(), scene.width, scene.height, 0.25, 300, 40,
                               check_pixels=False)
    from usnet_wsi.predict import load_predictor

    return load_predictor(args.weights, args.device)


class Interrupting:
    """The predictor until tile `stop_at`, then a lost device."""

    def __init__(self, inner, stop_at: int) -> None:
        self.inner, self.stop_at = inner, stop_at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, tiles, meta=None, regions=None):
        if meta[-1].index >= self.stop_at:
            raise _Lost("interrupted")
        return self.inner.predict(tiles, meta, regions)


def timed_run(slide: Path, out: Path, predictor, journal: bool, **cfg_kw) -> dict:
    from usnet_wsi.config import SegmentConfig
    from usnet_wsi.console import Reporter
    from usnet_wsi.journal import Journal
    from usnet_wsi.pipeline import segment_slide

    record, flush = Journal.record, Journal.flush
    if not journal:
        Journal.record = lambda self, result: None          # type: ignore[method-assign]
        Journal.flush = lambda self: None                   # type: ignore[method-assign]
    try:
        cfg = SegmentConfig(out_dir=out, overwrite=True, **cfg_kw)
        t0, c0 = time.perf_counter(), time.process_time()
        res = segment_slide(slide, cfg, predictor, Reporter(0, "none"))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        Journal.record, Journal.flush = record, flush
    run = json.loads((out / f"{res.name}.run.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "tiles": res.tiles, "nuclei": res.nuclei,
            "journal_s": run["timings_s"].get("journal", 0.0),
            "resumed_tiles": run["counts"]["resumed_tiles"]}


def journal_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*") if p.is_file())


def resume_case(slide: Path, out: Path, predictor, cfg_kw: dict, tiles: int) -> dict:
    from usnet_wsi.journal import journal_dir

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        timed_run(slide, out, Interrupting(predictor, tiles // 2), True, **cfg_kw)
    except _Lost:
        pass
    cut_s = time.perf_counter() - t0
    size = journal_bytes(journal_dir(out, slide.stem))
    again = timed_run(slide, out, predictor, True, **cfg_kw)
    return {"interrupted_run_s": cut_s, "journal_bytes_at_cut": size, **{
        f"resumed_{k}": v for k, v in again.items()}}


def measure(args: argparse.Namespace, slide: Path) -> dict:
    predictor = make_predictor(args)
    cfg_kw = {"batch_size": args.batch_size, "workers": args.workers}
    out = args.work / f"out-resume-{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    timed_run(slide, out, predictor, True, **cfg_kw)                 # warm-up
    runs: dict[str, list[dict]] = {"journal": [], "no_journal": []}
    for _ in range(args.repeats):                                    # interleaved: A B A B
        runs["journal"].append(timed_run(slide, out, predictor, True, **cfg_kw))
        runs["no_journal"].append(timed_run(slide, out, predictor, False, **cfg_kw))
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_s"] for r in v) for k, v in runs.items()}
    tiles = runs["journal"][0]["tiles"]
    resume = resume_case(slide, args.work / f"out-resume-cut-{args.model}", predictor, cfg_kw,
                         tiles)
    return {"tiles": tiles, "nuclei": runs["journal"][0]["nuclei"], "runs": runs,
            "median_wall_s": med, "journal_cost_ratio": med["journal"] / med["no_journal"],
            "median_cpu_s": cpu, "journal_cpu_ratio": cpu["journal"] / cpu["no_journal"],
            "journal_write_s_median": statistics.median(r["journal_s"] for r in runs["journal"]),
            "resume": resume, "device": getattr(predictor, "device", "cpu")}


def table(r: dict) -> str:
    m, res = r["median_wall_s"], r["resume"]
    rows = [
        ("slide", f"{r['size']} x {r['size']} px, {r['tiles']} tiles, {r['nuclei']} nuclei, "
                  f"{r['model']} model, {r['repeats']} runs each"),
        ("wall with journal (median)", f"{m['journal']:.2f} s"),
        ("wall without journal (median)", f"{m['no_journal']:.2f} s"),
        ("journal cost (wall)", f"{(r['journal_cost_ratio'] - 1) * 100:+.1f} %"),
        ("CPU time with / without", f"{r['median_cpu_s']['journal']:.2f} s / "
                                    f"{r['median_cpu_s']['no_journal']:.2f} s"),
        ("journal cost (CPU time)", f"{(r['journal_cpu_ratio'] - 1) * 100:+.1f} %"),
        ("journal writes (median)", f"{r['journal_write_s_median']:.3f} s "
                                    f"({r['journal_write_s_median'] / m['journal'] * 100:.1f} %)"),
        ("interrupted at half", f"after {res['interrupted_run_s']:.2f} s, journal "
                                f"{res['journal_bytes_at_cut'] / 2**20:.1f} MiB"),
        ("resumed run", f"{res['resumed_wall_s']:.2f} s, {res['resumed_resumed_tiles']} of "
                        f"{res['resumed_tiles']} tiles from the journal"),
    ]
    return large_slide.aligned(rows)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8000, help="slide side in level-0 px")
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--model", choices=("oracle", "real"), default="oracle")
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=large_slide.WORK)
    p.add_argument("--results", type=Path, default=large_slide.RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    slide, _ = large_slide.ensure_slide(args)
    result = {"size": args.size, "model": args.model, "repeats": args.repeats,
              "batch_size": args.batch_size, "workers": args.workers,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              **measure(args, slide)}
    large_slide.write_result(args.results / f"resume-{args.size}-{args.model}.json", result,
                             table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
