"""An exponential moving average of the weights (Polyak averaging), validated and saved in
place of the raw weights when training with `--ema`.

On a few dozen annotated images the raw weights wander from one epoch to the next (validation AJI
moves by a few hundredths between validations); their running average is smoother and usually a
little better than any single epoch's weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """`model` holds the average of every parameter and floating-point buffer (batch-norm
    statistics included) of the trained model; integer buffers are copied. The average starts
    from the model's weights: with `--init` the bundle's, which are worth keeping in it. From
    random weights (`warmup`) the decay ramps up as (1 + t) / (10 + t) over the first steps t,
    so that the random start does not linger in the average."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def rate(self, step: int) -> float:
        """The decay used after optimizer step `step` (counted over the whole training,
        resumed runs included)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s current weights (after optimizer step `step`)."""
        weight = 1.0 - self.rate(step)
        theirs = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                v.lerp_(theirs[k], weight)
            else:
                v.copy_(theirs[k])
