"""Refinement geometry (context boxes, 48x48 crops, pasting back), the refiner, per-tile
instances and in-memory image prediction."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Sequence

import numpy as np
import pytest
import torch
from scipy import ndimage

from tiny import tiny_model
from usnet_wsi.anchors import make_anchors
from usnet_wsi.decode import detect_boxes
from usnet_wsi.instances import (InstanceBatch, _cut_off, _refine_on_cpu, batch_instances,
                                 mask_quality, paint_masks)
from usnet_wsi.model.bundle import Thresholds
from usnet_wsi.model.refine import (RefineNet, context_boxes, crop_resize, paste_mask,
                                    paste_masks, sample_crops)
from usnet_wsi.model.spec import recipe_spec
from usnet_wsi.model.usnet import USNet
from usnet_wsi.predict import ModelPredictor, predict_image



def tile_anchors(model: USNet, x: torch.Tensor) -> torch.Tensor:
    """The anchor grid of the model's feature maps for tiles of x's side."""
    return make_anchors(replace(model.spec, input_size=x.shape[-1]))


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

def test_crop_resize_gives_the_same_samples_however_the_crops_are_grouped() -> None:
    """Many crops per image (one sampling call per image, crops in any image order) and one
    crop at a time (one call over a padded grid) give bitwise the same crops, and autograd
    reaches the images through both."""
    g = torch.Generator().manual_seed(3)
    imgs = torch.rand((3, 4, 64, 70), generator=g)
    xy = torch.rand((40, 2), generator=g) * 50
    crops = context_boxes(torch.cat([xy, xy + torch.rand((40, 2), generator=g) * 20 + 3], 1),
                          1.5, 64)
    image = torch.randint(0, 3, (40,), generator=g)
    image[image == 1] = 0                                     # image 1 holds no crop
    many = crop_resize(imgs, image, crops, 48)
    one_by_one = torch.cat([crop_resize(imgs, image[i:i + 1], crops[i:i + 1], 48)
                            for i in range(40)])
    assert many.shape == (40, 4, 48, 48)
    assert torch.equal(many, one_by_one)
    src = imgs.clone().requires_grad_(True)
    crop_resize(src, image, crops, 48).sum().backward()
    assert src.grad[0].abs().sum() > 0 and src.grad[1].abs().sum() == 0



@pytest.mark.parametrize("split", [1, 2, 3])
def test_sample_crops_gives_the_crops_of_crop_resize_in_the_refiners_layout(split: int) -> None:
    """The inference sampler, from separate maps in either layout, cut into any number of
    parts per image, gives exactly crop_resize's crops of the concatenated maps, converted
    to the requested dtype, in channels-last layout and in the input order of the crops."""
    g = torch.Generator().manual_seed(5)
    rgb = torch.rand((3, 3, 64, 70), generator=g).contiguous(memory_format=torch.channels_last)
    probs = torch.softmax(torch.randn((3, 3, 64, 70), generator=g), dim=1)
    xy = torch.rand((41, 2), generator=g) * 50
    crops = context_boxes(torch.cat([xy, xy + torch.rand((41, 2), generator=g) * 20 + 3], 1),
                          1.5, 64)
    image = torch.randint(0, 3, (41,), generator=g)
    image[image == 1] = 0                                     # image 1 holds no crop
    want = crop_resize(torch.cat([rgb, probs], 1), image, crops, 48)
    for dtype in (torch.float32, torch.bfloat16):
        got = sample_crops([rgb, probs], image, crops, 48, dtype, split=split)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want.to(dtype))
    ordered = torch.argsort(image, stable=True)
    assert torch.equal(sample_crops([rgb, probs], image[ordered], crops[ordered], 48,
                                    torch.float32, split), want[ordered])
    assert sample_crops([rgb], image[:0], crops[:0], 48, torch.float32).shape == (0, 3, 48, 48)


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


@pytest.mark.parametrize("n", [1, 2, 64, 65, 130])
def test_the_chunked_cpu_refiner_equals_one_call(n: int) -> None:
    torch.manual_seed(n)
    net = RefineNet(recipe_spec("default")).eval().to(memory_format=torch.channels_last)
    x = torch.randn(n, 6, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        one_call = net(torch.cat([x, x]) if n == 1 else x)[:n, 0]
        assert torch.equal(_refine_on_cpu(net, x), one_call)


def test_a_lower_mask_threshold_gives_larger_masks() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 48, 48) * 3
    crops = torch.tensor([[0.0, 0, 30, 30], [5, 5, 45, 25], [0, 0, 48, 48]])
    at_half = paste_masks(logits, crops, 48)
    assert torch.equal(paste_masks(logits, crops, 48, 0.0), at_half)
    lower = paste_masks(logits, crops, 48, -1.0)
    assert bool((lower | at_half).eq(lower).all()) and lower.sum() > at_half.sum()


# ---------------------------------------------------------------- tile instances

def random_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def run_model(model: USNet, tiles: np.ndarray):
    with torch.no_grad():
        x = model.normalise(torch.from_numpy(tiles))
        return x, model(x)


def sequential_reference(model: USNet, x, out, thr: Thresholds, region=None) -> list[np.ndarray]:
    """The instance step written the slow, obvious way: per tile, per detection, one mask
    after the other (gathered crops, F.interpolate paste, edge check, best-first painting that
    keeps the largest connected part of the free pixels)."""
    size, anchors = x.shape[-1], tile_anchors(model, x)
    inp = torch.cat([x, model.seg_probs(out.seg_logits)], 1)
    result = []
    for i in range(x.shape[0]):
        b, s = detect_boxes(out.conf_logits[i], out.loc[i], anchors, thr.score, thr.nms,
                            thr.top_k, size)
        if region is not None:
            c = (b[:, :2] + b[:, 2:]) / 2
            m = 6.0
            ok = ((c[:, 0] >= region[0] - m) & (c[:, 0] < region[2] + m)
                  & (c[:, 1] >= region[1] - m) & (c[:, 1] < region[3] + m))
            b, s = b[ok], s[ok]
        refined = []
        for box, score in zip(b, s):
            crop = context_boxes(box[None], model.spec.refine_context, size)
            x0, y0, x1, y1 = (int(v) for v in crop[0].tolist())
            t = (torch.arange(48) + 0.5) / 48
            gx = (2 * (x0 + t * (x1 - x0)) / size - 1)[None, :].expand(48, -1)
            gy = (2 * (y0 + t * (y1 - y0)) / size - 1)[:, None].expand(-1, 48)
            patch = torch.nn.functional.grid_sample(
                inp[i:i + 1], torch.stack([gx, gy], -1)[None], padding_mode="border",
                align_corners=False)
            logit = model.refiner(patch)[0, 0].detach()
            refined.append((float(score), (x0, y0, x1, y1), logit))
        if thr.quality_weight > 0 or thr.final_score > 0:
            refined = rerank_reference(refined, thr)
        labels = np.zeros((size, size), np.int32)
        n_kept = 0
        for _, (x0, y0, x1, y1), logit in refined:
            mask = (torch.nn.functional.interpolate(logit[None, None], size=(y1 - y0, x1 - x0),
                                                    mode="bilinear", align_corners=False)[0, 0]
                    > 0).numpy()
            if truncated_reference(mask, (x0, y0, x1, y1), size, thr.max_edge_fraction):
                continue
            window = labels[y0:y1, x0:x1]
            free = mask & (window == 0)
            parts, n_parts = ndimage.label(free)
            if n_parts == 0:
                continue
            free = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
            if free.sum() < max(thr.min_area_px, thr.keep_fraction * int(mask.sum())):
                continue
            n_kept += 1
            window[free] = n_kept
        result.append(labels)
    return result


def rerank_reference(refined, thr: Thresholds):
    """Each detection's score mixed with its mask's mean foreground probability, one by one;
    those under `final_score` dropped; best first (ties keep detection order)."""
    w, out = thr.quality_weight, []
    for score, crop, logit in refined:
        fg = logit > 0
        q = float(torch.sigmoid(logit)[fg].mean()) if fg.any() else 0.0
        mixed = max(score, 1e-6) ** (1 - w) * max(q, 1e-6) ** w
        if mixed >= thr.final_score:
            out.append((mixed, crop, logit))
    return sorted(out, key=lambda r: -r[0])


def truncated_reference(mask, crop, size, max_fraction) -> bool:
    x0, y0, x1, y1 = crop
    sides = [(mask[0], y0 > 0), (mask[-1], y1 < size), (mask[:, 0], x0 > 0),
             (mask[:, -1], x1 < size)]
    inner = [side for side, inside in sides if inside]
    total = sum(len(side) for side in inner)
    return total > 0 and sum(int(side.sum()) for side in inner) > max_fraction * total


class DiscRefiner(torch.nn.Module):
    """A refiner whose mask is a centred disc with a radius set by the crop's content: some
    discs stay inside their crop, some are cut off by it (for the edge rule)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
        dist = torch.hypot(yy - 23.5, xx - 23.5)
        radius = 8 + 30 * torch.frac((x[:, 0].mean(dim=(1, 2)) * 50).abs())
        return (radius[:, None, None] - dist)[:, None]


@pytest.mark.parametrize("thr, discs", [
    (Thresholds(score=0.0, top_k=30, nms=0.3, max_edge_fraction=1.0), False),
    (Thresholds(score=0.0, top_k=60, nms=0.6, keep_fraction=0.8, min_area_px=30,
                max_edge_fraction=0.4), True),
    (Thresholds(score=0.0, top_k=60, nms=0.6, max_edge_fraction=0.4, quality_weight=0.7,
                final_score=0.1), True),
    (Thresholds(score=0.0, top_k=30, nms=0.3, max_edge_fraction=1.0, quality_weight=1.0),
     False),
])
def test_batch_instances_equal_one_by_one_painting(thr: Thresholds, discs: bool) -> None:
    model = tiny_model()
    if discs:
        model.refiner = DiscRefiner()
    x, out = run_model(model, random_tiles(3, 128, seed=4))
    got = batch_instances(model, x, out, tile_anchors(model, x), thr)
    want = sequential_reference(model, x, out, thr)
    assert got.counts.tolist() == [int(w.max()) for w in want] and got.counts.sum() >= 6
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got.labels[i], w)
        scores = got.scores[i, :got.counts[i]]
        assert list(scores) == sorted(scores, reverse=True) and (0 <= scores).all()


def test_mask_quality_is_the_mean_foreground_probability() -> None:
    crisp = torch.full((48, 48), -10.0)
    crisp[10:30, 10:30] = 10.0
    faint = torch.where(crisp > 0, torch.tensor(0.2), torch.tensor(-0.2))
    q = mask_quality(torch.stack([crisp, faint, torch.full((48, 48), -1.0)]))
    assert q[0] > 0.99 and abs(float(q[1]) - float(torch.sigmoid(torch.tensor(0.2)))) < 1e-6
    assert q[2] == 0


def test_a_final_score_drops_the_least_certain_masks() -> None:
    model = tiny_model()
    model.refiner = DiscRefiner()
    x, out = run_model(model, random_tiles(3, 128, seed=4))
    anchors = tile_anchors(model, x)
    base = Thresholds(score=0.0, top_k=60, nms=0.6, max_edge_fraction=1.0, quality_weight=0.5)
    everything = batch_instances(model, x, out, anchors, base)
    cut = float(np.nanmedian(everything.scores))
    fewer = batch_instances(model, x, out, anchors, replace(base, final_score=cut))
    assert 0 < fewer.counts.sum() < everything.counts.sum()
    assert np.nanmin(fewer.scores) >= round(cut, 5)


def test_only_detections_the_tile_can_own_are_refined() -> None:
    model = tiny_model(seed=1)
    thr = Thresholds(score=0.0, top_k=60, nms=0.5, max_edge_fraction=1.0)
    x, out = run_model(model, random_tiles(2, 128, seed=5))
    anchors = tile_anchors(model, x)
    region = (40.0, 30.0, 90.0, 100.0)
    got = batch_instances(model, x, out, anchors, thr, torch.tensor([region, region]))
    want = sequential_reference(model, x, out, thr, region)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got.labels[i], w)
    everything = batch_instances(model, x, out, anchors, thr)
    assert 0 < got.counts.sum() < everything.counts.sum()
    whole = torch.tensor([(0.0, 0.0, 128.0, 128.0)] * 2)
    np.testing.assert_array_equal(batch_instances(model, x, out, anchors, thr, whole).labels,
                                  everything.labels)


def test_results_do_not_depend_on_the_batch_size() -> None:
    model = tiny_model(seed=3, input_size=128, halo_px=16)
    pred = ModelPredictor(model, Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0),
                          torch.device("cpu"))
    tiles = random_tiles(5, 128, seed=6)
    whole = pred.predict(tiles)
    for size in (1, 2, 3):
        parts = [pred.predict(tiles[i:i + size]) for i in range(0, 5, size)]
        np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), whole.labels)
        for p, i in zip(parts, range(0, 5, size)):
            n = p.scores.shape[1]
            np.testing.assert_array_equal(p.scores, whole.scores[i:i + size, :n])


def test_a_cpu_batch_runs_in_parts_with_the_same_results(monkeypatch) -> None:
    import usnet_wsi.predict as predict_module
    model = tiny_model(seed=3, input_size=128, halo_px=16)
    pred = ModelPredictor(model, Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0),
                          torch.device("cpu"))
    tiles = random_tiles(5, 128, seed=6)
    whole = pred.predict(tiles)
    monkeypatch.setattr(predict_module, "CPU_PART_PX", 2 * 128 * 128)
    assert [(p.start, p.stop) for p in predict_module.batch_parts(5, 128, "cpu")] == [(0, 3),
                                                                                     (3, 5)]
    split = pred.predict(tiles)
    np.testing.assert_array_equal(split.labels, whole.labels)
    np.testing.assert_array_equal(split.counts, whole.counts)
    np.testing.assert_array_equal(split.detected, whole.detected)
    np.testing.assert_array_equal(split.scores, whole.scores[:, :split.scores.shape[1]])
    assert np.isnan(whole.scores[:, split.scores.shape[1]:]).all()


@pytest.mark.parametrize("n, part_px", [(5, None), (5, 2 * 128 * 128), (1, None)])
def test_masks_painted_tile_by_tile_equal_the_painted_batch(monkeypatch, n, part_px) -> None:
    """What the engine's CPU-stage workers paint (predict(paint=False), then each tile's masks)
    is the batch's label maps and scores, also where the batch runs in parts or is one tile."""
    import usnet_wsi.predict as predict_module
    from usnet_wsi.painting import UnpaintedBatch
    if part_px:
        monkeypatch.setattr(predict_module, "CPU_PART_PX", part_px)
    model = tiny_model(seed=3, input_size=128, halo_px=16)
    thr = Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0, quality_weight=0.5)
    pred = ModelPredictor(model, thr, torch.device("cpu"))
    tiles = random_tiles(n, 128, seed=6)
    regions = np.tile(np.array([[8, 8, 120, 120]], np.float32), (n, 1))
    whole = pred.predict(tiles, None, regions)
    deferred = pred.predict(tiles, None, regions, paint=False)
    assert isinstance(deferred, UnpaintedBatch) and len(deferred) == n
    np.testing.assert_array_equal(deferred.detected, whole.detected)
    for i, masks in enumerate(deferred.tiles):
        labels, scores = masks.paint()
        np.testing.assert_array_equal(labels, whole.labels[i])
        np.testing.assert_array_equal(scores, whole.scores[i, :whole.counts[i]])
    assert whole.counts.sum() >= 2 * n and len(np.unique(whole.scores[0, :whole.counts[0]])) > 1


@pytest.mark.parametrize("workers", [0, 1])
def test_the_device_thread_leaves_painting_to_the_cpu_stage(monkeypatch, workers) -> None:
    """The engine asks the model for unpainted masks with or without workers: the masks are
    painted in the CPU stage (the calling thread for --workers 0), never in the device thread,
    and the nuclei are those of the batch painted on the device."""
    import usnet_wsi.painting as painting
    from usnet_wsi.engine import EngineSettings, StageTimes, tile_results
    from usnet_wsi.predict import ImageReader
    from usnet_wsi.tiling import plan_tiles
    model = tiny_model(seed=3, input_size=128, halo_px=16)
    pred = ModelPredictor(model, Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0),
                          torch.device("cpu"))
    painted_in: set[str] = set()
    real_paint = painting.TileMasks.paint

    def watched(self):
        painted_in.add(threading.current_thread().name)
        return real_paint(self)

    monkeypatch.setattr(painting.TileMasks, "paint", watched)
    image = random_tiles(1, 300, seed=2)[0]
    plan = plan_tiles((0, 0, 300, 300), pred.mpp, pred.mpp, 128, 16)

    def nuclei(settings: EngineSettings) -> list:
        results = tile_results(ImageReader(image), plan, pred, settings, StageTimes())
        return [(r.tile.index, n.score, n.polygon_l0.wkt) for r in results for n in r.nuclei]

    got = nuclei(EngineSettings(batch_size=3, workers=workers))
    if workers == 0:
        assert painted_in == {threading.current_thread().name}
    else:
        assert painted_in == set()        # painted in the worker processes
    monkeypatch.setattr(type(pred), "defers_painting", False)   # painted on the device
    assert nuclei(EngineSettings(batch_size=3)) == got and len(got) > 0


@pytest.mark.parametrize("n", range(1, 20))
def test_batch_parts_cover_the_batch_without_lone_tiles(n: int) -> None:
    from usnet_wsi.predict import CUDA_PART_TILES, batch_parts
    for tile_px, device in ((556, "cpu"), (300, "cpu"), (1024, "cpu"), (556, "cuda")):
        parts = batch_parts(n, tile_px, device)
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        sizes = [p.stop - p.start for p in parts]
        if device == "cuda":        # fixed parts, the last one padded by the predictor
            assert all(s == CUDA_PART_TILES for s in sizes[:-1]) and sizes[-1] <= CUDA_PART_TILES
            continue
        assert max(sizes) - min(sizes) <= 1 and (n == 1 or min(sizes) >= 2)
        per = max(2, 4 * 556 * 556 // tile_px ** 2)
        assert max(sizes) <= per + 1          # one more where a lone tile was avoided


@pytest.mark.parametrize("n", [1, 3, 8, 11])
def test_the_gpus_fixed_shapes_give_the_batchs_own_results(monkeypatch, n: int) -> None:
    """The GPU policy, run on the CPU (whose results do not depend on the batch shape): parts
    of CUDA_PART_TILES tiles, the last padded with copies of its last tile, and the refiner's
    crops in padded chunks of one size, give the results of the batch run as it is."""
    import usnet_wsi.instances as instances
    import usnet_wsi.predict as predict_module
    model = tiny_model(seed=3, input_size=128, halo_px=16)
    pred = ModelPredictor(model, Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0),
                          torch.device("cpu"))
    tiles = random_tiles(n, 128, seed=6)
    regions = np.tile(np.array([[8, 8, 120, 120]], np.float32), (n, 1))
    whole = pred.predict(tiles, None, regions, paint=False)
    calls: list[tuple[int, int]] = []
    real_predict = ModelPredictor._predict

    def on_gpu_policy(self, part, reg, paint):
        calls.append((len(part), self.part_tiles(len(part))))
        return real_predict(self, part, reg, paint)

    monkeypatch.setattr(ModelPredictor, "_predict", on_gpu_policy)
    monkeypatch.setattr(ModelPredictor, "part_tiles",
                        lambda self, k: predict_module.CUDA_PART_TILES)
    real_parts = predict_module.batch_parts
    monkeypatch.setattr(predict_module, "batch_parts", lambda k, px, dev: real_parts(k, px, "cuda"))
    monkeypatch.setattr(instances, "_refine_on_cpu",
                        lambda refiner, p: instances._refine_fixed_chunks(refiner, p, 16))
    fixed = pred.predict(tiles, None, regions, paint=False)
    part = predict_module.CUDA_PART_TILES
    assert [c[1] for c in calls] == [part] * len(calls) and sum(c[0] for c in calls) == n
    assert [c[0] for c in calls] == [min(part, n - a) for a in range(0, n, part)]
    assert len(fixed) == n
    np.testing.assert_array_equal(fixed.detected, whole.detected)
    for a, b in zip(fixed.tiles, whole.tiles):
        (la, sa), (lb, sb) = a.paint(), b.paint()
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(sa, sb)
    assert sum(len(t.paint()[1]) for t in whole.tiles) >= 2 * n


def test_cut_off_masks_are_flagged() -> None:
    win = torch.zeros((4, 20, 20), dtype=torch.bool)
    win[0, 5:15, 5:15] = True                      # well inside its crop
    win[1] = True                                  # fills the crop: a cut-off piece
    win[2, 5:15, 0:10] = True                      # touches only its left side ...
    win[3, 5:15, 0:10] = True
    crops = torch.tensor([[100, 100, 120, 120], [100, 100, 120, 120],
                          [0, 100, 20, 120],       # ... which is the tile edge: fine
                          [10, 100, 30, 120]], dtype=torch.float32)
    assert _cut_off(win, crops, 300, 0.3).tolist() == [False, True, False, False]
    assert _cut_off(win, crops, 300, 0.1).tolist() == [False, True, False, True]
    full = torch.ones((1, 300, 300), dtype=torch.bool)   # crop = the whole tile
    assert not _cut_off(full, torch.tensor([[0.0, 0, 300, 300]]), 300, 0.3)


def test_paint_masks_gives_pixels_to_the_best_score() -> None:
    a, b = np.ones((4, 4), bool), np.ones((4, 4), bool)
    tile = paint_masks([a, b], [(0, 0), (2, 2)], [0.5, 0.9], 8)
    assert tile.scores.tolist() == pytest.approx([0.9, 0.5])
    assert (tile.labels[2:6, 2:6] == 1).all() and (tile.labels[0:2, 0:4] == 2).all()


# ---------------------------------------------------------------- predict_image

class DarkBlobPredictor:
    """Finds dark connected components of each tile, whole or cut by the tile edge; score =
    darkness. Stands in for a perfect model so that predict_image's tiling is what is tested."""

    name, sha256, device, mpp = "dark-blobs", "", "cpu", 0.25

    def __init__(self, tile_px: int, halo_px: int) -> None:
        self.tile_px, self.halo_px = tile_px, halo_px
        self.calls = 0

    def predict(self, tiles: np.ndarray, meta=None, regions=None) -> InstanceBatch:
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
            out.append(paint_masks(masks, origins, scores, self.tile_px))
        return InstanceBatch.from_tiles(out)


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
    assert present <= set(scores) == set(range(1, len(scores) + 1))
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    again, _ = predict_image(pred, rgb, batch_size=1, workers=2)
    np.testing.assert_array_equal(again, labels)


@pytest.mark.parametrize("grouped", [True, False])
def test_window_ranges_per_mask_match_a_plain_min_and_max(grouped: bool) -> None:
    from usnet_wsi.painting import _dense_ids, _group_ranges
    rng = np.random.default_rng(int(grouped))
    owner = np.repeat(rng.permutation(40) * 3 + 5, rng.integers(1, 30, 40))  # sparse mask ids
    if not grouped:
        owner = rng.permutation(owner)
    row, col = rng.integers(0, 500, len(owner)), rng.integers(0, 900, len(owner))
    ids = _dense_ids(owner)
    assert np.array_equal(ids, np.unique(owner, return_inverse=True)[1])
    (y0, y1), (x0, x1) = _group_ranges(ids, int(ids.max()) + 1, row, col)
    for k, mask in enumerate(np.unique(owner)):
        sel = owner == mask
        assert (y0[k], y1[k], x0[k], x1[k]) == (row[sel].min(), row[sel].max(),
                                                col[sel].min(), col[sel].max())


def test_predict_image_is_the_same_when_the_workers_paint() -> None:
    """With CPU-stage workers the model's masks are painted in the workers (each tile's own);
    the segmentation is the same as painting the batch in the calling thread."""
    model = tiny_model(seed=2, input_size=128, halo_px=16)
    # scores ranked with the mask quality: they differ between nuclei (the random detector's
    # alone are all alike)
    thr = Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0, quality_weight=0.5)
    pred = ModelPredictor(model, thr, torch.device("cpu"))
    rgb = random_tiles(1, 200, seed=3)[0][:150]
    inline, inline_scores = predict_image(pred, rgb, batch_size=3, workers=0)
    workers, worker_scores = predict_image(pred, rgb, batch_size=3, workers=1)
    np.testing.assert_array_equal(workers, inline)
    assert worker_scores == inline_scores and len(set(inline_scores.values())) >= 2


def test_seg_agreement_is_each_masks_mean_foreground_probability() -> None:
    from usnet_wsi.instances import _agreement, _Masks
    fg = torch.zeros((2, 4, 4))
    fg[0, 0, :2] = torch.tensor([0.2, 0.6])
    fg[1, 3, 3] = 0.9
    # mask 0: pixels (0,0,0), (0,0,1); mask 1: pixel (1,3,3); mask 2: empty
    owner = torch.tensor([0, 0, 1])
    flat = torch.tensor([0, 1, 16 + 15])
    masks = _Masks(owner, flat, torch.bincount(owner, minlength=3), torch.ones(3, dtype=bool))
    assert torch.allclose(_agreement(masks, fg), torch.tensor([0.4, 0.9, 0.0], dtype=torch.double))


def test_masks_the_segmentation_map_disagrees_with_are_dropped(monkeypatch) -> None:
    """seg_agreement 1 drops every mask (a softmax foreground is below 1), a value below every
    mask's agreement changes nothing, and the median agreement keeps fewer nuclei."""
    import usnet_wsi.instances as instances
    model = tiny_model(seed=3, input_size=128, halo_px=16)
    tiles = random_tiles(3, 128, seed=6)
    base = Thresholds(score=0.0, top_k=40, max_edge_fraction=1.0)
    seen: list[torch.Tensor] = []
    real = instances._agreement

    def recorded(masks, foreground):
        seen.append(real(masks, foreground))
        return seen[-1]

    monkeypatch.setattr(instances, "_agreement", recorded)

    def found(agreement: float) -> InstanceBatch:
        pred = ModelPredictor(model, replace(base, seg_agreement=agreement), torch.device("cpu"))
        return pred.predict(tiles)

    off, tiny, all_ = found(0.0), found(1e-9), found(1.0)
    assert off.counts.sum() > 5 and all_.counts.sum() == 0
    np.testing.assert_array_equal(tiny.labels, off.labels)
    median = float(torch.cat(seen).median())
    assert 0 < found(median).counts.sum() < off.counts.sum()
