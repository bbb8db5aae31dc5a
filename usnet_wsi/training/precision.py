"""Mixed precision for training: bfloat16 autocast where the device computes it natively.

Under bf16 autocast the convolutions and matrix products of the forward pass (and so of the
backward pass) run in bfloat16, while the weights (batch-norm statistics included), the
optimizer state and the losses stay in float32. bfloat16 has float32's exponent range, so no
loss scaling is needed. On a CPU with AVX512-BF16 or AMX a training step takes about 0.6x the time of float32.
"""

from __future__ import annotations

import torch

from usnet_wsi.errors import UsageError

TRAIN_PRECISIONS = ("auto", "bf16", "fp32")


def resolve_train_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 on CPUs with native bf16 arithmetic and on CUDA GPUs that support it
    (compute capability 8.0 and newer), fp32 elsewhere. 'bf16' and 'fp32' as given."""
    from usnet_wsi.predict import cpu_has_bf16
    if precision not in TRAIN_PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not a training precision",
                         f"use one of {', '.join(TRAIN_PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The context the forward passes of a training step run in."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
