"""What a training step of `usnet-wsi train` costs: fp32 against bf16 autocast (`--precision`).

Starts from the shipped bundle (as a fine-tune with `--init` does) and times training steps as
`train` runs them: a batch of 8 windows made (augmentation, anchor matching), then forward,
losses, backward and optimizer, on the MoNuSeg training images when they are found (`--data`),
else on synthetic discs. The two arithmetics are interleaved in one process in blocks of
`--steps` steps, `--rounds` times (the machine's load changes; the medians and their ratio
count). The allocator settings of the command-line interface are applied.

    python benchmarks/train_speed.py [--rounds 3] [--steps 6] [--device cpu]

Prints a table and writes benchmarks/results/train-speed-DEVICE.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "monuseg-train"
PRECISIONS = ("fp32", "bf16")


def training_images(folder: Path, n: int) -> list:
    """Up to n annotated images at the model's resolution: MoNuSeg when found, else discs."""
    import numpy as np

    from usnet_wsi.training.data import Annotated
    if folder.is_dir():
        from usnet_wsi.cli.train import load_datasets

        class Quiet:
            def info(self, msg: str) -> None:
                pass
        return load_datasets([(folder, 0.2527)], "default", Quiet())[:n]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[:600, :600]
        lab = np.zeros((600, 600), np.int32)
        for k, (y, x) in enumerate(rng.integers(12, 588, (150, 2))):
            lab[(yy - y) ** 2 + (xx - x) ** 2 < 64] = k + 1
        rgb = np.where(lab[..., None] > 0, [90, 60, 150], [230, 170, 200]).astype(np.uint8)
        out.append(Annotated(f"synthetic{i}", rgb, lab))
    return out


VARIANTS = ("fp32", "bf16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="steps per block")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from usnet_wsi.allocator import keep_freed_memory
    from usnet_wsi.anchors import make_anchors
    from usnet_wsi.model.bundle import load_bundle
    from usnet_wsi.predict import cpu_has_bf16, resolve_device
    from usnet_wsi.training.batches import epoch_windows, make_batch
    from usnet_wsi.training.loop import TrainConfig, make_optimizers, train_step

    keep_freed_memory()                          # as the command-line interface does
    dev = resolve_device(args.device)
    bundle = load_bundle(None)
    data = training_images(args.data, 8)
    rng = np.random.default_rng(0)
    anchors = make_anchors(bundle.spec)
    base = bundle.build_model().to(dev).train()
    runs = {}
    for name in VARIANTS:
        model = copy.deepcopy(base)
        runs[name] = {"model": model, "opts": make_optimizers(model, "default", 0.3),
                      "cfg": TrainConfig(out=REPO, precision=name), "step_s": []}

    def windows() -> list:
        wins = []
        while len(wins) < 8 * args.steps:
            wins += epoch_windows(data, rng)
        return wins[:8 * args.steps]

    def block(name: str) -> list[float]:
        r, wins, times = runs[name], windows(), []
        for i in range(0, len(wins), 8):
            t = time.perf_counter()
            b = make_batch(data, wins[i:i + 8], bundle.spec, anchors, rng)
            train_step(r["model"], b, anchors.to(dev), r["opts"], r["cfg"], rng, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return times

    wins = windows()
    t0 = time.perf_counter()
    for i in range(0, len(wins), 8):
        make_batch(data, wins[i:i + 8], bundle.spec, anchors, rng)
    make_s = (time.perf_counter() - t0) / (len(wins) // 8)
    for name in VARIANTS:                        # warm-up: first-call costs, allocator growth
        block(name)
    for _ in range(args.rounds):
        for name in VARIANTS:
            runs[name]["step_s"] += block(name)
    med = {name: statistics.median(runs[name]["step_s"]) for name in VARIANTS}
    first = VARIANTS[0]
    result = {"device": str(dev), "native_bf16_cpu": cpu_has_bf16(),
              "torch_threads": torch.get_num_threads(), "weights": bundle.name,
              "data": args.data.name if args.data.is_dir() else "synthetic discs",
              "batch_size": 8, "make_batch_s": make_s, "median_step_s": med,
              "ratio_to_first": {name: med[name] / med[first] for name in VARIANTS},
              "step_s": {name: runs[name]["step_s"] for name in VARIANTS}}
    print(f"{'precision':<10} {'s/step (median)':>16} {'ratio':>6} {'steps':>6}")
    for name in VARIANTS:
        print(f"{name:<10} {med[name]:>16.3f} {med[name] / med[first]:>6.2f} "
              f"{len(runs[name]['step_s']):>6}")
    print(f"of which making a batch of 8 windows: {make_s:.3f} s")
    dest = REPO / "benchmarks" / "results" / f"train-speed-{dev.type}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {dest.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
