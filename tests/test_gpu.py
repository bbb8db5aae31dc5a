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


def _segment(tmp_path: Path, device: str) -> dict:
    out = tmp_path / device.replace(":", "")
    res = CliRunner().invoke(main, ["segment", str(EXAMPLE), "-o", str(out), "--device", device,
                                    "--json", "-q"])
    assert res.exit_code == 0, res.output
    return json.loads((out / "example.run.json").read_text())


def test_cuda_and_cpu_find_the_same_nuclei(tmp_path: Path) -> None:
    gpu, cpu = _segment(tmp_path, "cuda"), _segment(tmp_path, "cpu")
    assert "cuda" in json.dumps(gpu).lower()
    n_gpu, n_cpu = gpu["counts"]["nuclei"], cpu["counts"]["nuclei"]
    assert n_cpu > 0 and abs(n_gpu - n_cpu) <= max(3, 0.02 * n_cpu)   # AMP changes few nuclei


def test_predictor_runs_amp_on_cuda() -> None:
    from usnet_wsi.predict import load_predictor
    pred = load_predictor(None, "cuda")
    tiles = np.full((2, 300, 300, 3), 230, np.uint8)
    assert len(pred.predict(tiles, [None, None])) == 2
    assert next(pred.model.parameters()).is_cuda
