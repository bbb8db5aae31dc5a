"""Training with --ema: the weight average is what is validated, saved and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.test_train_loop import _tiny_bundle, tiny_image
from usnet_wsi.console import Reporter
from usnet_wsi.model.bundle import load_bundle
from usnet_wsi.training.checkpoint import load_checkpoint
from usnet_wsi.training.ema import WeightAverage
from usnet_wsi.training.loop import TrainConfig, checkpoint_dir, make_optimizers, train


def test_the_average_moves_by_one_minus_the_decay_and_copies_integer_buffers() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(net, 0.9)
    start = {k: v.clone() for k, v in avg.model.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].num_batches_tracked.fill_(7)
    avg.update(net, step=0)
    got, now = avg.model.state_dict(), net.state_dict()
    for k, v in got.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * start[k] + 0.1 * now[k])
        else:
            assert int(v) == 7
    assert not any(p.requires_grad for p in avg.model.parameters())


def test_from_random_weights_the_decay_ramps_up() -> None:
    avg = WeightAverage(nn.Linear(2, 2), 0.998, warmup=True)
    rates = [avg.rate(t) for t in (0, 10, 100, 10_000)]
    assert rates == sorted(rates) and rates[0] == pytest.approx(0.1) and rates[-1] == 0.998
    assert WeightAverage(nn.Linear(2, 2), 0.998).rate(0) == 0.998
    with pytest.raises(ValueError):
        WeightAverage(nn.Linear(2, 2), 1.0)


def test_training_with_ema_saves_the_average_and_resumes_it(tmp_path: Path) -> None:
    init = _tiny_bundle(tmp_path / "init")
    cfg = TrainConfig(out=tmp_path / "avg", epochs=1, batch_size=2, init=init, name="avg",
                      ema=0.5)
    out = train(cfg, [tiny_image(0), tiny_image(1)], [tiny_image(2)], Reporter(0))
    saved = load_bundle(out).state
    ck = load_file(str(checkpoint_dir(out) / "state.safetensors"))
    trained = {k[6:]: v for k, v in ck.items() if k.startswith("model.")}
    average = {k[4:]: v for k, v in ck.items() if k.startswith("ema.")}
    assert set(average) == set(trained) == set(saved)
    floats = [k for k in saved if saved[k].is_floating_point()]
    assert all(torch.equal(saved[k], average[k]) for k in saved)        # the average is kept
    assert sum(not torch.equal(average[k], trained[k]) for k in floats) > len(floats) // 2
    assert json.loads((out / "config.json").read_text())["train"]["ema"] == 0.5
    # resuming restores the average as well as the weights
    model = load_bundle(init).build_model()
    avg = WeightAverage(model, 0.5)
    load_checkpoint(checkpoint_dir(out), model, make_optimizers(model, "default"), avg.model)
    assert all(torch.equal(avg.model.state_dict()[k], average[k]) for k in average)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


def test_a_decay_of_one_or_more_is_a_usage_error(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from usnet_wsi.cli import main
    res = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--ema", "1"])
    assert res.exit_code == 2 and "--ema" in res.output
