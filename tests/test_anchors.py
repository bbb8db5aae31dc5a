"""Anchor grid, box coding and matching."""

import math

import pytest
import torch

from usnet_wsi.anchors import box_iou, decode, encode, feature_sizes, make_anchors, match
from usnet_wsi.decode import detect_boxes, nms
from usnet_wsi.model.spec import ModelSpec, recipe_spec


def test_paper_grid_has_7620_anchors():
    for recipe in ("default", "paper"):
        spec = recipe_spec(recipe)
        assert feature_sizes(300, spec.det_levels) == [38, 19, 10]
        assert make_anchors(spec).shape == (7620, 4)
        assert (38 ** 2 + 19 ** 2 + 10 ** 2) * spec.anchors_per_location == 7620


def test_hand_computed_table_on_tiny_configuration():
    # 8 px input, one level at 2x down-sampling -> 4x4 cells of 2 px; one base size 2.
    spec = ModelSpec(input_size=8, det_levels=(2,), anchor_sizes=(2.0,), anchor_scales=(1.0, 2.0),
                     anchor_ratios=(1.0, 0.5))
    a = make_anchors(spec)
    assert a.shape == (2 * 2 * 4, 4)
    # cell (row 0, col 0) centre (2, 2); shapes (w, h): (2,2), (2,1), (4,4), (4,2)
    expected = torch.tensor([[1, 1, 3, 3], [1, 1.5, 3, 2.5], [0, 0, 4, 4], [0, 1, 4, 3]])
    assert torch.allclose(a[:4], expected)
    # the next cell is one column to the right (centre x = 6)
    assert torch.allclose(a[4], torch.tensor([5.0, 1.0, 7.0, 3.0]))
    # row 1 starts at index 8 with centre y = 6
    assert torch.allclose(a[8], torch.tensor([1.0, 5.0, 3.0, 7.0]))


def test_anchor_sizes_cover_20_to_128_px():
    a = make_anchors(recipe_spec("default"))
    side = torch.sqrt((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))
    assert 15 <= side.min() <= 20 and 100 <= side.max() <= 128


def test_encode_decode_round_trip():
    anchors = torch.tensor([[10.0, 10, 30, 30], [0, 0, 50, 40]])
    gt = torch.tensor([[12.0, 8, 35, 29], [5, 5, 45, 30]])
    assert torch.allclose(decode(encode(gt, anchors), anchors), gt, atol=1e-4)


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))


def test_match_gives_every_small_nucleus_an_anchor():
    anchors = make_anchors(recipe_spec("default"))
    gt = torch.tensor([[100.0, 100, 110, 110], [200, 50, 260, 100]])  # a 10 px nucleus too
    labels, idx = match(gt, anchors)
    for g in range(2):
        assert ((labels == 1) & (idx == g)).any()
    labels, _ = match(torch.zeros((0, 4)), anchors)
    assert (labels == 0).all()


def test_perfect_outputs_decode_to_the_ground_truth_boxes():
    spec = recipe_spec("default")
    anchors = make_anchors(spec)
    gt = torch.tensor([[20.0, 20, 44, 40], [100, 120, 130, 150], [200, 200, 260, 270]])
    labels, idx = match(gt, anchors)
    logits = torch.where(labels == 1, 8.0, -8.0)
    loc = encode(gt[idx], anchors)
    boxes, scores = detect_boxes(logits, loc, anchors, 0.5, 0.4, size=300)
    assert boxes.shape[0] == 3
    assert torch.allclose(boxes[torch.argsort(boxes[:, 0])], gt, atol=1e-3)


def test_nms_suppresses_overlaps_and_keeps_order():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    keep = nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.5)
    assert keep.tolist() == [1, 2]
    assert math.isclose(float(box_iou(boxes[:1], boxes[1:2])), 81 / 119, rel_tol=1e-5)


def _greedy_reference(boxes, scores, thr):
    order = torch.argsort(scores, descending=True, stable=True)
    over = box_iou(boxes[order], boxes[order]) > thr
    keep = []
    for i in range(len(order)):
        if not any(over[j, i] for j in keep):
            keep.append(i)
    return order[torch.tensor(keep, dtype=torch.long)]


def test_nms_paths_equal_the_one_by_one_greedy_loop():
    from usnet_wsi.decode import _greedy_keep_loop, greedy_keep_rounds
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        n = int(torch.randint(1, 120, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 80
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], 1)
        scores, thr = torch.rand(n, generator=g), float(torch.rand(1, generator=g))
        want = _greedy_reference(boxes, scores, thr)
        assert torch.equal(nms(boxes, scores, thr), want)
        order = torch.argsort(scores, descending=True, stable=True)
        over = box_iou(boxes[order], boxes[order]) > thr
        assert torch.equal(order[greedy_keep_rounds(over)], want)      # the device path
        assert torch.equal(order[_greedy_keep_loop(over)], want)


def test_batched_detection_equals_one_image_at_a_time():
    from usnet_wsi.decode import detect
    from usnet_wsi.model.spec import ModelSpec
    anchors = make_anchors(ModelSpec(input_size=128))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, anchors.shape[0], generator=g) * 3
    loc = torch.randn(3, anchors.shape[0], 4, generator=g) * 0.5
    dets = detect(logits, loc, anchors, 0.6, 0.4, 200, 128)
    for i in range(3):
        b, s = detect_boxes(logits[i], loc[i], anchors, 0.6, 0.4, 200, 128)
        assert torch.equal(dets.boxes[dets.image == i], b) and len(b) > 3
        assert torch.equal(dets.scores[dets.image == i], s)
        assert (s[:-1] >= s[1:]).all()


def test_outputs_for_another_tile_size_are_refused():
    from usnet_wsi.decode import detect
    anchors = make_anchors(ModelSpec(input_size=128))
    small = make_anchors(ModelSpec(input_size=96))
    logits, loc = torch.zeros(1, small.shape[0]), torch.zeros(1, small.shape[0], 4)
    with pytest.raises(ValueError, match="another tile size"):
        detect(logits, loc, anchors, 0.5, 0.4, 100, 128)


def test_equal_scores_are_taken_in_anchor_order():
    """Scores of a low-precision network tie often; among equal scores the candidate with the
    lower anchor index comes first (and wins the greedy NMS), whatever order the anchors'
    scores are given in: the result is that of the greedy loop over (score desc, index)."""
    from usnet_wsi.decode import detect
    anchors = make_anchors(ModelSpec(input_size=128))
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 4, (1, anchors.shape[0]), generator=g).float()  # 4 levels: ties
    loc = torch.randn(1, anchors.shape[0], 4, generator=g) * 0.3
    dets = detect(logits, loc, anchors, 0.6, 0.4, 10_000, 128)
    scores = torch.sigmoid(logits[0])
    boxes = decode(loc[0], anchors).clamp(0, 128)
    ok = (scores >= 0.6) & ((boxes[:, 2:] - boxes[:, :2]) > 2).all(1)
    cand = torch.nonzero(ok).flatten()                       # ascending anchor index
    order = cand[torch.argsort(scores[cand], descending=True, stable=True)]
    want = order[_greedy_reference(boxes[order], torch.arange(len(order), 0, -1).float(), 0.4)]
    assert len(want) > 5 and torch.equal(dets.boxes, boxes[want])
