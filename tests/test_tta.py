"""Test-time flips: the anchor permutation, exact mirror-equivariance, and the CLI option."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny import TINY, tiny_model
from usnet_wsi.anchors import make_anchors
from usnet_wsi.config import SegmentConfig
from usnet_wsi.errors import UsageError
from usnet_wsi.model.bundle import Thresholds
from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.predict import ModelPredictor
from usnet_wsi.tta import TTA_MODES, FlipTTA, anchor_permutation

SPEC = dict(base_width=4, convs_per_block=1, input_size=128, halo_px=16)


@pytest.mark.parametrize("tile", [128, 556, 300])
@pytest.mark.parametrize("dims", [(3,), (2,), (2, 3)])
def test_anchor_permutation_maps_each_anchor_to_its_mirror_image(tile, dims) -> None:
    spec = ModelSpec(**{**TINY, "input_size": tile, "halo_px": 16})
    anchors = make_anchors(spec).double()
    perm = anchor_permutation(spec, tile, dims)
    mirrored = anchors.clone()
    if 3 in dims:
        mirrored[:, [0, 2]] = tile - anchors[:, [2, 0]]
    if 2 in dims:
        mirrored[:, [1, 3]] = tile - anchors[:, [3, 1]]
    torch.testing.assert_close(mirrored, anchors[perm], rtol=0, atol=1e-4)
    assert torch.equal(perm[perm], torch.arange(len(perm)))          # an involution


def test_flip_tta_outputs_are_exactly_mirror_equivariant() -> None:
    model = tiny_model(**SPEC).to(memory_format=torch.channels_last)     # as the predictor runs it
    cl = torch.channels_last
    x = torch.randn(2, 3, 128, 128).contiguous(memory_format=cl)
    tta = FlipTTA(model.spec, 128, "flip", torch.device("cpu"))
    perm = anchor_permutation(model.spec, 128, (3,))
    with torch.no_grad():
        a, b = tta(model, x), tta(model, torch.flip(x, (3,)).contiguous(memory_format=cl))
    assert torch.equal(torch.flip(b.seg_logits, (3,)), a.seg_logits)
    assert torch.equal(b.conf_logits[:, perm], a.conf_logits)
    assert torch.equal(b.loc[:, perm] * torch.tensor([-1.0, 1, 1, 1]), a.loc)


def test_flips_tta_is_the_mean_of_the_mapped_back_outputs() -> None:
    model = tiny_model(1, **SPEC)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        got = FlipTTA(model.spec, 128, "flips", torch.device("cpu"))(model, x)
        seg = [model(x).seg_logits]
        for dims in TTA_MODES["flips"]:
            seg.append(torch.flip(model(torch.flip(x, dims)).seg_logits, dims))
    torch.testing.assert_close(got.seg_logits, torch.stack(seg).mean(0))
    assert not torch.allclose(got.seg_logits, seg[0])                  # it did average


def test_predictor_with_tta_finds_mirror_images_of_its_nuclei() -> None:
    model = tiny_model(2, **SPEC)
    thr = Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0)
    pred = ModelPredictor(model, thr, torch.device("cpu"), tta="flip", precision="fp32")
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    a = pred.predict(tiles)
    b = pred.predict(np.ascontiguousarray(tiles[:, :, ::-1]))
    assert a.counts.sum() > 0
    np.testing.assert_array_equal(np.sort(a.scores, axis=1), np.sort(b.scores, axis=1))
    assert ((a.labels > 0) == (b.labels[:, :, ::-1] > 0)).mean() > 0.99
    plain = ModelPredictor(model, thr, torch.device("cpu"), precision="fp32").predict(tiles)
    assert not np.array_equal(plain.labels, a.labels)


def test_tta_choice_is_validated_and_part_of_the_output_identity(tmp_path) -> None:
    with pytest.raises(UsageError, match="--tta"):
        SegmentConfig(out_dir=tmp_path, tta="rot90")
    from usnet_wsi.outputs import identity_changes

    assert identity_changes({"tile_px": None}, {"tile_px": None, "tta": "none"}) == []
    assert identity_changes({"tile_px": None}, {"tile_px": None, "tta": "flip"}) == \
        ["tta: none -> flip"]
    assert json.dumps(SegmentConfig(out_dir=tmp_path, tta="flips").to_dict()["tta"]) == '"flips"'
