"""Ablation of post-processing levers on the validation images, one change at a time.

Loads a weights bundle and the validation images of MoNuSeg and CoNSeP (the bundle's
`validation_images`, or those of usnet-v2-ft1 for a bundle trained on MoNuSeg alone, so that
bundles are compared on the same images), and scores the bundle's own thresholds and each
variant (thresholds, or test-time flips) through the instance path `segment` uses (`usnet_wsi.training.validate`: engine,
instance step, merge; per-image means per dataset).

    python benchmarks/levers.py [--weights BUNDLE] [--only NAME ...]

Prints a table and writes benchmarks/results/levers-BUNDLE.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data"
SETS = (("monuseg-train", 0.2527), ("consep-train", 0.25))
SPLIT_FROM = REPO / "weights" / "usnet-v2-ft1" / "config.json"

VARIANTS: dict[str, dict] = {
    "bundle thresholds": {},
    "quality rank w=0.5": {"quality_weight": 0.5},
    "quality rank w=0.5, final>=0.45": {"quality_weight": 0.5, "final_score": 0.45},
    "quality rank w=0.5, final>=0.55": {"quality_weight": 0.5, "final_score": 0.55},
    "quality rank w=1, final>=0.7": {"quality_weight": 1.0, "final_score": 0.7},
    "cut-off pieces: max_edge_fraction 0.15": {"max_edge_fraction": 0.15},
    "keep_fraction 0.6": {"keep_fraction": 0.6},
    "keep_fraction 0.4": {"keep_fraction": 0.4},
    "keep_fraction 0.3": {"keep_fraction": 0.3},
    "mask threshold 0.4": {"mask_threshold": 0.4},
    "mask threshold 0.3": {"mask_threshold": 0.3},
    "mask threshold 0.2": {"mask_threshold": 0.2},
    "mask threshold 0.6": {"mask_threshold": 0.6},
    "score 0.4": {"score": 0.4},
    "score 0.35": {"score": 0.35},
    "score 0.5": {"score": 0.5},
    "score 0.55": {"score": 0.55},
    "score 0.5, top_k 30000": {"score": 0.5, "top_k": 30000},
    "score 0.55, top_k 30000": {"score": 0.55, "top_k": 30000},
    "score 0.6, top_k 30000": {"score": 0.6, "top_k": 30000},
    "seg_agreement 0 (off)": {"seg_agreement": 0.0},
    "seg_agreement 0.4": {"seg_agreement": 0.4},
    "score 0.4 (seg_agreement as bundled)": {"score": 0.4},
    "score 0.35 (seg_agreement as bundled)": {"score": 0.35},
    "score 0.4, seg_agreement 0.4": {"score": 0.4, "seg_agreement": 0.4},
    "nms 0.5": {"nms": 0.5},
    "min_area_px 20": {"min_area_px": 20},
    "top_k 2000": {"top_k": 2000},
    "top_k 4000": {"top_k": 4000},
    "top_k 30000 (no limit at 556 px)": {"top_k": 30000},
    "--tta flip": {"tta": "flip"},
    "--tta flips": {"tta": "flips"},
}


class _Quiet:
    def info(self, msg: str) -> None:
        pass


def validation_set(config: dict) -> list:
    """The validation images (resampled to the model's resolution), tagged by dataset."""
    from usnet_wsi.cli.train import load_datasets

    names = set(config.get("validation_images") or [])
    split_names = set(json.loads(SPLIT_FROM.read_text()).get("validation_images") or [])
    if not any(n.startswith("train_") for n in names):
        names |= {n for n in split_names if n.startswith("train_")}
    folders = [(DATA / d, mpp) for d, mpp in SETS if (DATA / d).is_dir()]
    if not folders:
        raise SystemExit(f"no validation data under {DATA}")
    every = load_datasets(folders, config.get("spec", {}).get("recipe", "default"), _Quiet())
    return [a for a in every if a.name in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="bundle folder (default: the shipped one)")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = p.parse_args(argv)
    import torch

    from usnet_wsi.model.bundle import load_bundle
    from usnet_wsi.training.validate import validate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = load_bundle(args.weights)
    model = bundle.build_model()
    data = validation_set(bundle.config)
    counts = {d: sum(a.dataset == d for a in data) for d, _ in SETS}
    rows = {}
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        tta = change.get("tta", "none")
        thr = replace(bundle.thresholds, **{k: v for k, v in change.items() if k != "tta"})
        t0 = time.perf_counter()
        m = validate(model, data, thr, torch.device("cpu"),
                     tile_px=bundle.config.get("inference_tile_px"), tta=tta)
        rows[name] = {"change": change, "metrics": m, "seconds": time.perf_counter() - t0}
        print(_line(name, m), flush=True)
    dest = REPO / "benchmarks" / "results" / f"levers-{bundle.name}.json"
    earlier = json.loads(dest.read_text()) if dest.exists() else {}
    if earlier.get("sha256") == bundle.sha256:          # --only: keep the other variants
        rows = {**earlier.get("variants", {}), **rows}
    out = {"weights": bundle.name, "sha256": bundle.sha256, "images": counts,
           "thresholds": asdict(bundle.thresholds), "variants": rows}
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {dest.relative_to(REPO)}")
    return 0


def _line(name: str, m: dict) -> str:
    parts = [f"{name:<42}"]
    for ds in ("monuseg-train", "consep-train"):
        parts.append(" ".join(f"{m.get(f'{ds}/{k}', float('nan')):.4f}"
                              for k in ("aji", "pq", "dice", "det_f1")))
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
