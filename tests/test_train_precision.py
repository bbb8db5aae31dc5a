"""Training in bfloat16 autocast: when it is chosen, and that a step really runs in it."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training_data import tiny_batch, tiny_setup
from usnet_wsi import predict
from usnet_wsi.anchors import make_anchors
from usnet_wsi.errors import UsageError
from usnet_wsi.training.loop import TrainConfig, train_step
from usnet_wsi.training.precision import resolve_train_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(predict, "cpu_has_bf16", lambda: native)
    assert resolve_train_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_train_precision("fp32", CPU) == "fp32"
    assert resolve_train_precision("bf16", CPU) == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_asks_for_native_bf16_not_emulation(monkeypatch, native: bool) -> None:
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native or including_emulation         # emulation is always "supported"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: nullcontext())
    assert resolve_train_precision("auto", torch.device("cuda:0")) == ("bf16" if native else "fp32")
    assert asked == [False]


def test_unknown_precision_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="fp16"):
        resolve_train_precision("fp16", CPU)


def _step_dtypes(precision: str, tmp_path: Path) -> tuple[dict, dict, dict, dict]:
    """One train step; the output dtypes of a U-Net conv and of the refiner's last conv, the
    losses, and the weights before and after."""
    model, opts = tiny_setup("default", seed=0)
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen.setdefault(name, output.dtype)
        return hook

    model.unet.enc[0][0].register_forward_hook(record("unet"))
    model.refiner.c4.register_forward_hook(record("refiner"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(out=tmp_path / "b", batch_size=2, refine_per_image=4, precision=precision)
    parts = train_step(model, tiny_batch(model, seed=1), make_anchors(model.spec), opts, cfg,
                       np.random.default_rng(2), CPU)
    return seen, parts, before, model.state_dict()


def test_bf16_step_computes_in_bf16_and_keeps_fp32_weights(tmp_path: Path) -> None:
    seen, parts, before, after = _step_dtypes("bf16", tmp_path)
    assert seen == {"unet": torch.bfloat16, "refiner": torch.bfloat16}
    assert set(parts) == {"conf", "loc", "seg", "ce", "ref"}
    assert all(np.isfinite(v) and v > 0 for k, v in parts.items() if k != "loc"), parts
    for name in ("unet.enc.0.0.weight", "head.cls.0.weight", "refiner.c4.weight"):
        assert after[name].dtype == torch.float32
        assert torch.isfinite(after[name]).all()
        assert not torch.equal(before[name], after[name]), name


def test_fp32_step_stays_in_fp32_and_bf16_differs_from_it(tmp_path: Path) -> None:
    seen32, parts32, _, after32 = _step_dtypes("fp32", tmp_path)
    _, parts16, _, after16 = _step_dtypes("bf16", tmp_path)
    assert seen32 == {"unet": torch.float32, "refiner": torch.float32}
    # the same step in two arithmetics: close losses, but not the same numbers
    for k in ("conf", "seg", "ce", "ref"):
        assert parts16[k] == pytest.approx(parts32[k], rel=0.05), k
    assert not torch.equal(after16["unet.enc.0.0.weight"], after32["unet.enc.0.0.weight"])
