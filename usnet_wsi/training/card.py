"""MODEL_CARD.md text for a trained bundle."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from typing import Any

import torch

from usnet_wsi.model.bundle import Thresholds
from usnet_wsi.model.spec import ModelSpec

CHOICES = """\
## Choices where the paper is silent (each configurable in config.json `spec`)
- "Block size 4": read as the channel width of the first U-Net block (`base_width`), doubling at
  each of the six down-sampling levels up to `max_width`. The paper recipe uses 4 -> 128; the
  default recipe uses 8 -> 128 (a judgement call for a CPU budget: twice the full-resolution
  width at about 4x that level's cost; not compared against 4 on validation). Two 3x3 conv + BN
  + ReLU per block (`convs_per_block`).
- Levels: 300 -> 150 -> 75 -> 38 -> 19 -> 10 -> 5 px (ceil-mode 2x max-pooling), bottleneck at
  5 px, bilinear up-sampling with skip concatenation. The detector reads the *decoder* maps of
  38, 19 and 10 px (RetinaNet reads top-down features; the paper's figure is not explicit).
- Anchors: base sides 24, 48, 96 px on the three maps, scales 0.8 and 1.2, height/width ratios 1
  and 0.75: 4 per cell, 7620 in all, covering about 19-115 px (the paper's 20-128 px range).
  Matching: IoU >= 0.5 positive, < 0.4 negative, every nucleus also takes its best anchor.
  Box coding: SSD (cx, cy, w, h) offsets with variances 0.1 / 0.2.
- Focal loss gamma = 2; eta from the segmentation output thresholded at 0.5 (eq. 4), a class that
  is never predicted counts as one pixel. L_conf normalised by the number of positive anchors.
- Refinement: box scaled 1.5x about its centre, cropped with bilinear sampling to 48x48; four conv
  layers (48 px conv, pool, 24 px conv, upsample + skip conv, 1x1 conv); BCE + Dice loss on
  jittered ground-truth boxes, trained jointly with US-Net (Adam 1e-3).
- Default-recipe improvements over the paper: (1) three segmentation classes (background,
  interior, boundary) with an extra cross-entropy term, which separates touching nuclei; (2) the
  refiner also sees the segmentation probabilities; (3) segmentation components that no detection
  covers were refined and kept ("rescue"); measured through `segment` it gave no accuracy
  (AJI 0.6050 with, 0.6056 without) and inference no longer does it; (4) Adam
  (lr 1e-3, cosine decay) for the U-Net instead of SGD lr 1e-4 (chosen for a CPU budget of
  about 1.5 hours). None of the four was ablated on validation within this budget: the paper
  recipe is implemented and unit-tested but was not trained to convergence here.
  `--recipe paper` turns all four off.
- Instances: masks painted in score order, no overlaps; a mask that keeps less than half of its
  area is dropped. Score and NMS thresholds tuned on the validation split (thresholds.json).
"""


_KNOWN_DATA = {
    "monuseg": ("MoNuSeg 2018 training images (Kumar et al., IEEE TMI 2017/2019; TCGA H&E, "
                "7 organs, 1000x1000 at 0.2527 um/px)",
                "CC BY-NC-SA 4.0 (non-commercial, share-alike), inherited from MoNuSeg"),
    "consep": ("CoNSeP training tiles (Graham et al., HoVer-Net, Medical Image Analysis 2019; "
               "colorectal adenocarcinoma, University Hospitals Coventry and Warwickshire)",
               "CoNSeP's research terms (TIA Centre, University of Warwick): research, "
               "non-commercial use"),
}


def data_text(info: dict[str, Any]) -> str:
    """What the bundle was trained on and the license that follows from it."""
    folders = info.get("datasets") or ["monuseg"]
    known = [v for k, v in _KNOWN_DATA.items() if any(k in f.lower() for f in folders)]
    unknown = [f for f in folders if not any(k in f.lower() for k in _KNOWN_DATA)]
    parts = [d for d, _ in known] + [f"the annotated images in `{f}`" for f in unknown]
    terms = [t for _, t in known] + (["the terms of the user's own data"] if unknown else [])
    init = info.get("init_bundle")
    start = (f" Fine-tuned from `{init['name']}` (SHA-256 {init['sha256'][:12]}...), whose "
             "training data and license carry over." if init else "")
    return (f"Trained on {'; '.join(parts)}.{start} **License: {'; plus '.join(terms)}.** "
            "Weights inherit the terms of all their training data.")


def hardware(device: torch.device) -> str:
    """What a run used: the GPU's name on CUDA, else the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def model_card(name: str, spec: ModelSpec, thr: Thresholds, metrics: dict[str, float],
               state: Any, cfg: Any, info: dict[str, Any] | None,
               device: torch.device = torch.device("cpu")) -> str:
    """The bundle's MODEL_CARD.md; `device`: what the model was trained on."""
    info = info or {}
    hw = hardware(device)
    arith = "bf16 autocast" if cfg.precision == "bf16" else "fp32"
    val = ", ".join(info.get("validation_images", [])) or "none"
    mtxt = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (none) | |"
    return f"""# {name}

US-Net (Xu et al., arXiv 1902.00125) nuclei detector + segmenter + 48x48 refiner for H&E at
{spec.mpp} um/px (40x), recipe `{spec.recipe}`. Written by `usnet-wsi train`.

## Data and license
{data_text(info)} Training images: {len(info.get('train_images', []))}.
Validation split (never trained on): {val}.

## Validation (per-image mean over the validation images, in-memory tiling)
| metric | value |
|---|---|
{mtxt}

The slide-level numbers (each validation image written as a pyramidal slide and run through
`usnet-wsi segment`, per dataset) are in benchmarks/results/accuracy-{name}.md.

## Training
Epochs completed: {state.epoch} (of {cfg.epochs}); steps: {state.step}; batch size
{cfg.batch_size}; time: {state.elapsed_s / 60:.1f} min on {hw} ({arith}, torch {torch.__version__}).
Command: `{info.get('command', 'usnet-wsi train')}`

## Thresholds (tuned on validation)
```json
{json.dumps(asdict(thr), indent=2)}
```

## Architecture
```json
{json.dumps(spec.to_dict(), indent=2)}
```

{CHOICES}"""
