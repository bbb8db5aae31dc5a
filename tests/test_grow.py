"""Growing a trained US-Net wider (usnet_wsi.model.grow) and `train --base-width`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import tiny_model
from usnet_wsi.console import Reporter
from usnet_wsi.errors import UsageError
from usnet_wsi.model.grow import widen


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out.seg_logits, out.conf_logits, out.loc


@pytest.mark.parametrize("training", [False, True])
def test_a_wider_network_computes_the_same(training: bool) -> None:
    model = tiny_model(seed=1, input_size=96, halo_px=16).train(training)
    grown = widen(model, 3).train(training)
    assert grown.spec.base_width == 3 and grown.spec.width(0) == 3
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
    x = torch.rand(2, 3, 96, 96)
    for a, b in zip(_outputs(model, x), _outputs(grown, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_copies_get_unequal_shares_so_training_separates_them() -> None:
    grown = widen(tiny_model(seed=2), 4, seed=5)
    first = grown.unet.enc[1][0].weight            # reads level 0: 2 old + 2 copied channels
    shares = first.abs().sum(dim=(0, 2, 3))
    assert len(set(shares.tolist())) == 4


def test_narrower_is_refused_and_the_same_width_is_a_copy() -> None:
    model = tiny_model(seed=3)
    with pytest.raises(UsageError, match="narrower"):
        widen(model, 1)
    same = widen(model, model.spec.base_width)
    for k, v in model.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]), k


def test_training_from_a_bundle_with_a_larger_base_width(tmp_path: Path) -> None:
    from test_train_loop import _tiny_bundle, tiny_image
    from usnet_wsi.model.bundle import load_bundle
    from usnet_wsi.training.loop import TrainConfig, initial_model, train
    init = _tiny_bundle(tmp_path / "init")
    cfg = TrainConfig(out=tmp_path / "wide", epochs=1, batch_size=2, init=init, name="wide",
                      base_width=3)
    before = load_bundle(init).build_model().eval()
    start = initial_model(cfg, Reporter(0)).eval()
    x = torch.rand(2, 3, 128, 128)
    for a, b in zip(_outputs(before, x), _outputs(start, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    out = train(cfg, [tiny_image(0), tiny_image(1)], [tiny_image(2)], Reporter(0))
    assert load_bundle(out).spec.base_width == 3
    resumed = TrainConfig(out=tmp_path / "wide", epochs=2, batch_size=2, name="wide",
                          resume=True)          # the checkpoint knows its architecture
    data = [tiny_image(0), tiny_image(1)]
    assert load_bundle(train(resumed, data, [tiny_image(2)], Reporter(0))).spec.base_width == 3
