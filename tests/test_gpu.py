"""CUDA path (marked `gpu`: deselected by default; run with `pytest -m gpu` on a CUDA machine)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from usnet_wsi.cli import main

pytestmark = pytest.mark.gpu

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "example.svs"


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _segment(tmp_path: Path, device: str, *extra: str) -> dict:
    out = tmp_path / device.replace(":", "")
    res = CliRunner().invoke(main, ["segment", str(EXAMPLE), "-o", str(out), "--device", device,
                                    "--json", "-q", *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "example.run.json").read_text())


def test_cuda_and_cpu_find_the_same_nuclei(tmp_path: Path) -> None:
    gpu, cpu = _segment(tmp_path, "cuda"), _segment(tmp_path, "cpu")
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    n_gpu, n_cpu = gpu["counts"]["nuclei"], cpu["counts"]["nuclei"]
    assert n_cpu > 0 and abs(n_gpu - n_cpu) <= max(3, 0.02 * n_cpu)   # AMP changes few nuclei


def test_cuda_output_does_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    """Byte-identical GeoJSON across batch sizes on the GPU too (every network and refiner
    call has one shape there: `predict.CUDA_PART_TILES`)."""
    runs = {bs: _segment(tmp_path / f"b{bs}", "cuda", "--batch-size", str(bs))
            for bs in ("1", "3", "8", "16")}
    assert runs["8"]["counts"]["nuclei"] > 0
    texts = {bs: (tmp_path / f"b{bs}" / "cuda" / "example.geojson").read_bytes() for bs in runs}
    assert len(set(texts.values())) == 1


def test_predictor_runs_the_network_in_half_precision_on_cuda() -> None:
    from usnet_wsi.predict import load_predictor
    pred = load_predictor(None, "cuda")
    seen: list[torch.dtype] = []
    pred.model.unet.register_forward_hook(lambda m, i, out: seen.append(out[0].dtype))
    rng = np.random.default_rng(0)
    size = pred.tile_px
    tiles = rng.integers(120, 230, (2, size, size, 3), dtype=np.uint8)
    found = pred.predict(tiles)
    assert len(found) == 2 and found.labels.shape == (2, size, size)
    assert pred.amp and seen == [torch.float16]
    assert next(pred.model.parameters()).is_cuda


def test_a_training_step_on_cuda_runs_in_bf16_and_moves_the_weights(tmp_path: Path) -> None:
    from tests.test_training_data import tiny_batch, tiny_setup
    from usnet_wsi.anchors import make_anchors
    from usnet_wsi.training.loop import TrainConfig, make_optimizers, train_step
    from usnet_wsi.training.precision import resolve_train_precision
    dev = torch.device("cuda")
    precision = resolve_train_precision("auto", dev)
    native = torch.cuda.get_device_capability(dev)[0] >= 8 or bool(torch.version.hip)
    assert precision == ("bf16" if native else "fp32")
    model, _ = tiny_setup("default", seed=0)
    model = model.to(dev)
    opts = make_optimizers(model, "default")
    seen: list[torch.dtype] = []
    model.unet.enc[0][0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = model.unet.enc[0][0].weight.detach().clone()
    cfg = TrainConfig(out=tmp_path / "b", batch_size=2, refine_per_image=4, precision=precision)
    parts = train_step(model, tiny_batch(model, seed=1), make_anchors(model.spec).to(dev), opts,
                       cfg, np.random.default_rng(2), dev)
    assert all(np.isfinite(v) for v in parts.values()), parts
    assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
    after = model.unet.enc[0][0].weight
    assert after.dtype == torch.float32 and not torch.equal(before, after.detach())
