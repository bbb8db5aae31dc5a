"""A tiny US-Net with random weights for fast tests of the model's plumbing."""

from __future__ import annotations

from typing import Any

import torch

from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.model.usnet import USNet

TINY = dict(base_width=2, max_width=8, head_width=8, refine_width=4)


def tiny_model(seed: int = 0, **spec: Any) -> USNet:
    """Random weights (seeded); the refiner leans to 'nucleus' so that masks are not empty.
    `spec` overrides ModelSpec fields (e.g. input_size, halo_px)."""
    torch.manual_seed(seed)
    model = USNet(ModelSpec(**{**TINY, **spec})).eval()
    with torch.no_grad():
        model.refiner.c4.bias.fill_(2.0)
    return model
