"""What `segment --tta` costs: end-to-end time on the real-tissue mosaic of
benchmarks/throughput.py with --tta none, flip and flips, interleaved `--repeats` times in one
process (the machine's load changes between runs; the median and the ratio to `none` count).

    python benchmarks/tta_cost.py [--repeats 2] [--device cpu]

Prints a table and writes benchmarks/results/tta-cost-DEVICE.json. The accuracy each mode
gives is measured by benchmarks/levers.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import throughput  # noqa: E402

MODES = ("none", "flip", "flips")


def run(slide: Path, predictor, args: argparse.Namespace, out: Path) -> dict:
    t0 = time.process_time()
    result = throughput._segment(slide, predictor, {"batch_size": args.batch_size,
                                                     "workers": 0, "device": args.device}, out)
    return {**result, "cpu_s": time.process_time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2, help="copies of the images in the mosaic")
    args = p.parse_args(argv)
    from usnet_wsi.allocator import keep_freed_memory
    from usnet_wsi.predict import load_predictor

    keep_freed_memory()                          # as the command-line interface does

    slide = throughput.make_slide(argparse.Namespace(repeat=args.repeat, weights=None))
    preds = {m: load_predictor(None, args.device, tta=m) for m in MODES}
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for m in MODES:
            runs[m].append(run(slide, preds[m], args, throughput.WORK / f"out-tta-{m}"))
    med = {m: statistics.median(r["wall_s"] for r in v) for m, v in runs.items()}
    cpu = {m: statistics.median(r["cpu_s"] for r in v) for m, v in runs.items()}
    result = {"slide": slide.name, "tiles": runs["none"][0]["tiles"], "device": args.device,
              "median_wall_s": med, "median_cpu_s": cpu,
              "wall_ratio_to_none": {m: med[m] / med["none"] for m in MODES},
              "cpu_ratio_to_none": {m: cpu[m] / cpu["none"] for m in MODES},
              "nuclei": {m: runs[m][0]["nuclei"] for m in MODES}, "runs": runs}
    for m in MODES:
        print(f"--tta {m:<6} wall {med[m]:7.1f} s (x{med[m] / med['none']:.2f})  "
              f"CPU {cpu[m]:7.1f} s (x{cpu[m] / cpu['none']:.2f})  "
              f"{result['nuclei'][m]} nuclei")
    dest = REPO / "benchmarks" / "results" / f"tta-cost-{args.device.split(':')[0]}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {dest.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
