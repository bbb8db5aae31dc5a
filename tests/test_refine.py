"""Refinement geometry (context boxes, 48x48 crops, pasting back), the refiner, per-tile
instances and in-memory image prediction."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pytest
import torch
from scipy import ndimage

from usnet_wsi.anchors import make_anchors
from usnet_wsi.decode import detect_boxes
from usnet_wsi.instances import TileNuclei, tile_instances
from usnet_wsi.model.bundle import Thresholds
from usnet_wsi.model.refine import RefineNet, context_boxes, crop_resize, paste_mask
from usnet_wsi.model.spec import ModelSpec, recipe_spec
from usnet_wsi.model.usnet import USNet
from usnet_wsi.predict import ModelPredictor, predict_image

TINY = dict(base_width=2, max_width=8, head_width=8, refine_width=4)


def boxes(*rows: Sequence[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- context boxes

@pytest.mark.parametrize("box, context, expected", [
    ((10, 10, 30, 30), 1.5, (5, 5, 35, 35)),          # centre 20, half side 20 * 1.5 / 2
    ((10, 20, 30, 60), 1.5, (5, 10, 35, 70)),          # each side scaled on its own
    ((10.3, 10.3, 20.6, 20.6), 1.0, (10, 10, 21, 21)), # outward rounding keeps the whole box
    ((50, 50, 51, 51), 1.5, (47, 47, 54, 54)),         # sides below 4 px count as 4
])
def test_context_boxes_scale_about_the_centre(box, context, expected) -> None:
    got = context_boxes(boxes(box), context, 100)
    assert got.tolist() == [list(map(float, expected))]


@pytest.mark.parametrize("box, expected", [
    ((0, 0, 10, 10), (0, 0, 15, 15)),                  # top-left corner: clipped at 0
    ((92, 95, 100, 100), (88, 92, 100, 100)),          # bottom-right corner: clipped at 100
    ((-10, -10, -2, -2), (0, 0, 2, 2)),                # centre -6, half side 8: reaches x = 2
    ((-30, -30, -20, -20), (0, 0, 1, 1)),              # wholly outside: 1-px box at the edge
])
def test_context_boxes_at_the_image_edge_are_clipped(box, expected) -> None:
    assert context_boxes(boxes(box), 2.0, 100).tolist() == [list(map(float, expected))]


def test_context_boxes_are_valid_and_contain_their_box() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand((500, 2), generator=g) * 140 - 20
    wh = torch.rand((500, 2), generator=g) * 60 + 0.5
    b = torch.cat([xy, xy + wh], dim=1)
    b = b[(b[:, 2] > 0) & (b[:, 3] > 0) & (b[:, 0] < 100) & (b[:, 1] < 100)]   # meets the image
    c = context_boxes(b, 1.5, 100)
    assert torch.equal(c, c.round())
    assert (c[:, :2] >= 0).all() and (c[:, 2:] <= 100).all() and (c[:, 2:] > c[:, :2]).all()
    inside = b.clamp(0, 100)
    assert (c[:, :2] <= inside[:, :2]).all() and (c[:, 2:] >= inside[:, 2:]).all()


# ---------------------------------------------------------------- crop / paste

def test_crop_resize_samples_pixel_centres() -> None:
    """On a ramp image (value = pixel index) output sample j of a crop [x0, x1) sits at
    x0 + (j + 0.5) * (x1 - x0) / out in pixel-edge coordinates, i.e. holds that minus 0.5."""
    h, w = 90, 80
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = torch.from_numpy(np.stack([xs, ys]))[None]
    crop = boxes((10, 20, 34, 68))
    got = crop_resize(img, torch.tensor([0]), crop, 48)[0]
    t = (np.arange(48) + 0.5) / 48
    want_x = 10 + t * 24 - 0.5
    want_y = 20 + t * 48 - 0.5
    np.testing.assert_allclose(got[0].numpy(), np.broadcast_to(want_x, (48, 48)), atol=1e-4)
    np.testing.assert_allclose(got[1].numpy(), np.broadcast_to(want_y[:, None], (48, 48)),
                               atol=1e-4)


def test_crop_resize_reads_the_indexed_image() -> None:
    imgs = torch.stack([torch.full((2, 20, 20), 1.0), torch.full((2, 20, 20), 7.0)])
    got = crop_resize(imgs, torch.tensor([1, 0, 1]), boxes((0, 0, 5, 5), (3, 3, 9, 12),
                                                           (10, 10, 20, 20)), 48)
    assert got.shape == (3, 2, 48, 48)
    assert got[:, 0, 0, 0].tolist() == [7.0, 1.0, 7.0]
    assert crop_resize(imgs, torch.zeros(0, dtype=torch.long), torch.zeros((0, 4)), 48).shape \
        == (0, 2, 48, 48)


def ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("cx, cy, rx, ry", [
    (80.0, 120.0, 15.0, 22.0),     # crop ~ 45 x 66 px: resampled down to 48
    (40.0, 50.0, 6.0, 5.0),        # crop ~ 18 x 15 px: resampled up to 48
    (4.0, 100.0, 12.0, 10.0),      # cut by the left edge: crop clipped at x = 0
    (195.0, 196.0, 9.0, 9.0),      # bottom-right corner
])
def test_crop_to_48_and_paste_back_reproduces_the_region(cx, cy, rx, ry) -> None:
    mask = ellipse(200, 200, cx, cy, rx, ry)
    ys, xs = np.nonzero(mask)
    box = boxes((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    crop = context_boxes(box, 1.5, 200)
    x0, y0, x1, y1 = (int(v) for v in crop[0].tolist())
    assert x0 >= 0 and y0 >= 0 and x1 <= 200 and y1 <= 200
    m48 = crop_resize(torch.from_numpy(mask.astype(np.float32))[None, None], torch.tensor([0]),
                      crop, 48)[0, 0]
    pasted = paste_mask(m48 - 0.5, (x0, y0, x1, y1)).numpy()   # logit > 0  <=>  mask > 0.5
    assert pasted.shape == (y1 - y0, x1 - x0) and pasted.dtype == bool
    assert iou(pasted, mask[y0:y1, x0:x1]) > 0.9
    full = np.zeros_like(mask)
    full[y0:y1, x0:x1] = pasted
    assert iou(full, mask) > 0.9            # the crop holds the whole nucleus


# ---------------------------------------------------------------- refiner

@pytest.mark.parametrize("recipe, channels", [("default", 6), ("paper", 3)])
def test_refinenet_maps_crops_to_one_logit_map(recipe: str, channels: int) -> None:
    spec = recipe_spec(recipe)
    assert spec.refine_in_channels == channels
    net = RefineNet(spec).eval()
    x = torch.randn(5, channels, 48, 48)
    out = net(x)
    assert out.shape == (5, 1, 48, 48) and torch.isfinite(out).all()
    assert net(x[:0]).shape == (0, 1, 48, 48)
    with pytest.raises(RuntimeError):
        net(torch.randn(1, channels + 1, 48, 48))


# ---------------------------------------------------------------- tile instances

def tiny_model(seed: int = 0, **spec: Any) -> USNet:
    """Random weights; the refiner leans to 'nucleus' so masks are not empty."""
    torch.manual_seed(seed)
    model = USNet(ModelSpec(**TINY, **spec)).eval()
    with torch.no_grad():
        model.refiner.c4.bias.fill_(2.0)
    return model


def random_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def assert_valid_nuclei(tn: TileNuclei, size: int, thr: Thresholds) -> None:
    """Masks inside the tile, tight, one piece, large enough, and pairwise disjoint."""
    assert len(tn.masks) == len(tn.origins) == len(tn.scores)
    count = np.zeros((size, size), np.int32)
    for m, (x0, y0), s in zip(tn.masks, tn.origins, tn.scores):
        h, w = m.shape
        assert m.dtype == bool and 0 <= x0 and 0 <= y0 and x0 + w <= size and y0 + h <= size
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
        assert ndimage.label(m)[1] == 1 and m.sum() >= thr.min_area_px
        assert 0.0 <= s <= 1.0
        count[y0:y0 + h, x0:x0 + w] += m
    assert count.max() <= 1


def test_tile_instances_are_disjoint_and_come_from_detections() -> None:
    model = tiny_model(rescue_missed=False)
    thr = Thresholds(score=0.0, top_k=30, nms=0.3, max_edge_fraction=1.0)  # random refiner: no edge filter
    tiles = random_tiles(2, 300)
    anchors = make_anchors(model.spec)
    with torch.no_grad():
        x = model.normalise(torch.from_numpy(tiles))
        out = model(x)
    result = tile_instances(model, x, out, anchors, thr)
    assert len(result) == 2 and max(len(t) for t in result) >= 2
    for i, tn in enumerate(result):
        assert_valid_nuclei(tn, 300, thr)
        det_b, det_s = detect_boxes(out.conf_logits[i], out.loc[i], anchors, 0.0, 0.3, 30, 300)
        crops = context_boxes(det_b, model.spec.refine_context, 300).numpy()
        for m, (x0, y0), s in zip(tn.masks, tn.origins, tn.scores):
            h, w = m.shape
            hosts = [j for j, (a, b, c, d) in enumerate(crops)
                     if a <= x0 and b <= y0 and x0 + w <= c and y0 + h <= d
                     and abs(float(det_s[j]) - float(s)) < 1e-6]
            assert hosts, "each mask lies in the crop of the detection whose score it carries"
        assert list(tn.scores) == sorted(tn.scores, reverse=True)


def test_tile_instances_with_rescued_components_stay_disjoint() -> None:
    model = tiny_model(seed=1, input_size=128)
    tiles = random_tiles(2, 128, seed=1)
    with torch.no_grad():
        x = model.normalise(torch.from_numpy(tiles))
        out = model(x)
    counts = {}
    for rescue_prob in (1.0, 0.0):          # 1.0: nothing passes; 0.0: every uncovered pixel
        thr = Thresholds(score=0.0, top_k=10, rescue_prob=rescue_prob, rescue_min_area_px=20)
        result = tile_instances(model, x, out, make_anchors(model.spec), thr)
        for tn in result:
            assert_valid_nuclei(tn, 128, thr)
        counts[rescue_prob] = [len(tn) for tn in result]
    assert all(a > b for a, b in zip(counts[0.0], counts[1.0]))


# ---------------------------------------------------------------- predict_image

class DarkBlobPredictor:
    """Finds dark connected components of each tile, whole or cut by the tile edge; score =
    darkness. Stands in for a perfect model so that predict_image's tiling is what is tested."""

    name, sha256, device, mpp = "dark-blobs", "", "cpu", 0.25

    def __init__(self, tile_px: int, halo_px: int) -> None:
        self.tile_px, self.halo_px = tile_px, halo_px
        self.calls = 0

    def predict(self, tiles: np.ndarray, meta: Sequence[Any]) -> list[TileNuclei]:
        assert tiles.shape[1:] == (self.tile_px, self.tile_px, 3) and tiles.dtype == np.uint8
        self.calls += len(tiles)
        out = []
        for tile in tiles:
            grey = tile.min(axis=2)
            lab, _ = ndimage.label(grey < 128)
            masks, origins, scores = [], [], []
            for i, sl in enumerate(ndimage.find_objects(lab), start=1):
                m = lab[sl] == i
                masks.append(m)
                origins.append((sl[1].start, sl[0].start))
                scores.append(1 - grey[sl][m].mean() / 255)
            out.append(TileNuclei(masks, np.array(origins, np.int64).reshape(-1, 2),
                                  np.array(scores, np.float32)))
        return out


def test_predict_image_finds_every_nucleus_once_across_tile_borders() -> None:
    h, w, r = 130, 150, 5
    rgb = np.full((h, w, 3), 255, np.uint8)
    truth = []
    rng = np.random.default_rng(4)
    for cy in range(8, h - 4, 16):           # centres on and beside the core borders (40, 80 ..)
        for cx in range(8, w - 4, 16):
            disc = ellipse(h, w, cx + 0.5, cy + 0.5, r, r)
            value = int(rng.integers(0, 120))
            rgb[disc] = value
            truth.append((disc, 1 - value / 255))
    pred = DarkBlobPredictor(tile_px=64, halo_px=12)     # halo > disc diameter
    labels, scores = predict_image(pred, rgb, batch_size=4)
    assert pred.calls == 4 * 4                            # ceil(130/40) x ceil(150/40) tiles
    assert labels.shape == (h, w) and labels.dtype == np.uint32
    assert len(scores) == len(truth)
    for disc, score in truth:
        found = np.unique(labels[disc])
        assert len(found) == 1 and found[0] > 0
        assert (labels == found[0]).sum() == disc.sum()
        assert scores[int(found[0])] == pytest.approx(score, abs=1e-6)


def test_predict_image_with_a_random_model_gives_a_consistent_label_map() -> None:
    model = tiny_model(seed=2, input_size=128, halo_px=16)
    thr = Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0)  # random detector and refiner
    pred = ModelPredictor(model, thr, torch.device("cpu"))
    rgb = random_tiles(1, 200, seed=3)[0][:150]
    labels, scores = predict_image(pred, rgb, batch_size=3)
    assert labels.shape == (150, 200) and labels.dtype == np.uint32
    present = set(np.unique(labels).tolist()) - {0}
    assert len(present) >= 2
    assert present == set(scores) == set(range(1, len(scores) + 1))
    ordered = [scores[k] for k in sorted(scores)]
    assert ordered == sorted(ordered, reverse=True)       # painted best first
    assert all(0.0 <= s <= 1.0 for s in ordered)


def test_masks_cut_off_by_their_crop_border_are_flagged() -> None:
    from usnet_wsi.instances import truncated
    inner = np.zeros((20, 20), bool)
    inner[5:15, 5:15] = True                       # a nucleus well inside its crop
    assert not truncated(inner, (100, 100, 120, 120), 300, 0.3)
    full = np.ones((20, 20), bool)                 # fills the crop: a piece of a larger nucleus
    assert truncated(full, (100, 100, 120, 120), 300, 0.3)
    # the same full mask against the tile edge on every side is not "cut off by the crop"
    assert not truncated(np.ones((300, 300), bool), (0, 0, 300, 300), 300, 0.3)
    # touching only the tile edge (left) while inside elsewhere
    edge = np.zeros((20, 20), bool)
    edge[5:15, 0:10] = True
    assert not truncated(edge, (0, 100, 20, 120), 300, 0.3)
    assert truncated(edge, (10, 100, 30, 120), 300, 0.1)    # 10 of 80 border pixels
